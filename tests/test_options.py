"""Options are declared once (`ldmtool.options`): a field of a group is an option of every command that takes
the group, with the same flag, help and panel, and reaches the command as a field of its record.

The recipe of docs/ARCHITECTURE.md ("Adding an option") is checked here without touching the real code: a
child interpreter adds a field to a copy of `SamplingChoice` before the CLI is imported, the way the first
of the recipe's two edits would, and every task command then offers it.
"""
import inspect
import json
import os
import subprocess
import sys

import typer

from ldmtool.cli.shared import option_groups, task_command
from ldmtool.options import ImageInputs, RunChoice, SamplingChoice, TextPrompt, option_fields

ADD_A_SAMPLING_OPTION = r"""
import contextlib, dataclasses, inspect, io, json, sys
from typing import Optional
import ldmtool.options as options

# The recipe's first edit: a field of SamplingChoice with its flag, help and panel.
options.SamplingChoice = dataclasses.make_dataclass(
    "SamplingChoice",
    [("dummy", Optional[int], options.option("--dummy", help="A new sampling option.", panel=options.SAMPLING))],
    bases=(options.SamplingChoice,), frozen=True)

import typer, typer.main
from ldmtool.cli.app import app, main
from ldmtool.cli.shared import task_command

report = {}
clicks = typer.main.get_command(app).commands
for info in app.registered_commands:
    if "sampling" not in inspect.signature(getattr(info.callback, "__wrapped__", info.callback)).parameters:
        continue  # not a task command with a model
    command = clicks[info.name]
    (param,) = [p for p in command.params if p.name == "dummy"] or [None]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            main([command.name, "--help"])
        except SystemExit:
            pass
    report[command.name] = param and {"opts": param.opts, "help": param.help, "panel": param.rich_help_panel,
                                      "in_help": "--dummy" in out.getvalue()}

seen = {}

@task_command(model="default")
def probe(*, run, model, sampling):
    seen.update(record=sampling.dummy, cli=run.cli["dummy"])

probe_app = typer.Typer()
probe_app.command()(probe)
probe_app(["--dummy", "3"], standalone_mode=False)
print(json.dumps({"commands": report, "probe": seen, "torch": "torch" in sys.modules}))
"""


def test_a_new_sampling_field_is_an_option_of_every_task_command():
    env = dict(os.environ, COLUMNS="200", TERM="dumb")
    result = subprocess.run([sys.executable, "-c", ADD_A_SAMPLING_OPTION], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.splitlines()[-1])
    commands = answer["commands"]
    assert {"txt2img", "img2img", "inpaint", "superres", "sample", "semantic2img", "layout2img",
            "tile-synth"} <= set(commands)
    expected = {"opts": ["--dummy"], "help": "A new sampling option.", "panel": "Sampling", "in_help": True}
    assert {name: entry for name, entry in commands.items() if entry != expected} == {}
    assert answer["probe"] == {"record": 3, "cli": 3}  # in the record, and in the job's identity
    assert answer["torch"] is False


def _call(command, **given):
    """Call a decorated command the way Typer does: every parameter, its default unless given."""
    defaults = {name: p.default for name, p in inspect.signature(command).parameters.items()}
    return command(**{**defaults, **given})


def test_opt_in_groups_stand_where_the_command_names_them_and_arrive_as_records():
    seen = {}

    @task_command(model=None)
    def probe(first: int = 0, *, text: TextPrompt, images: ImageInputs, run=None):
        seen.update(first=first, text=text, images=images, cli=dict(run.cli))

    names = list(inspect.signature(probe).parameters)
    groups = [f.name for group in (TextPrompt, ImageInputs, RunChoice) for f in option_fields(group)]
    assert names == ["first", *groups]
    _call(probe, prompt="a fox", max_pixels=64)
    assert seen["text"] == TextPrompt(prompt="a fox")
    assert seen["images"] == ImageInputs(max_pixels=64)
    assert seen["cli"]["prompt"] == "a fox" and seen["cli"]["first"] == 0  # every option, by its name


def test_task_commands_default_their_model_and_offer_seamless_only_when_asked():
    @task_command(model="default-sample", seamless=True)
    def generator(*, run=None, model=None, sampling=None):
        return model, sampling

    @task_command(model="default-superres")
    def upscaler(*, run=None, model=None, sampling=None):
        return model, sampling

    model, sampling = _call(generator, seamless="x", steps=3)
    assert model.model == "default-sample" and model.use_ema
    assert sampling == SamplingChoice(seamless="x", steps=3)
    assert "seamless" not in inspect.signature(upscaler).parameters
    assert _call(upscaler, no_ema=True)[0].use_ema is False


def test_option_groups_serves_commands_other_than_task_commands():
    @option_groups
    def other(name: str = "x", *, text: TextPrompt):
        return name, text

    app = typer.Typer()
    app.command()(other)
    assert app(["--prompt", "p", "--negative", "n"], standalone_mode=False) == ("x", TextPrompt("p", "n"))


def test_option_metadata_is_kept_apart_from_typer_settings():
    (steps,) = [f for f in option_fields(SamplingChoice) if f.name == "steps"]
    assert steps.metadata["flags"] == ("--steps",) and steps.metadata["settings"] == {"min": 1}
    names = [f.name for f in option_fields(SamplingChoice)]
    assert "seamless" in names and "vae_tile" not in names  # vae_tile is no option
