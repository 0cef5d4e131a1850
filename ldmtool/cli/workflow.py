"""`ldmtool run WORKFLOW.yaml [INPUTS...]`: several commands in one process, each step's outputs the next
step's inputs, over one model cache (see `ldmtool/runtime/workflow.py` for the file format)."""
from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ldmtool.cli.options import Json, Quiet

if TYPE_CHECKING:
    from ldmtool.runtime.workflow import Step

EXAMPLE = "Example: ldmtool run examples/workflows/hires.yaml -o out/ --seed 7"
STEPS_FOLDER = "steps"
MANIFEST = "workflow.jsonl"


def run(
    workflow: Annotated[Path, typer.Argument(help="The workflow file (YAML: a list of steps).", show_default=False)],
    inputs: Annotated[Optional[list[str]], typer.Argument(help="The first step's inputs (files, folders, globs).",
                                                         show_default=False)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the last step's outputs; the steps "
                                         "before it write to OUTPUT/steps/NN-COMMAND/. Always a folder: a name "
                                         "with an image extension (out.png) is refused.")] = Path("workflow-out"),
    seed: Annotated[Optional[int], typer.Option("--seed", help="Every step's seed (later steps take each item's "
                                                "seed from its input; default: the seed an earlier run of the "
                                                "same workflow recorded in OUTPUT/workflow.jsonl, else a random "
                                                "one).")] = None,
    keep_steps: Annotated[bool, typer.Option("--keep-steps/--remove-steps", help="Keep the intermediate "
                                             "outputs (needed to resume without redoing steps, and to replay "
                                             "the last step).")] = True,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Run a workflow: steps of ldmtool commands chained in one process, resumable per step and item."""
    from ldmtool.cli.app import task_commands
    from ldmtool.runtime.cache import model_cache
    from ldmtool.runtime.seeds import RANDOM
    from ldmtool.runtime.workflow import read_workflow

    steps = read_workflow(workflow, task_commands())
    _refuse_an_image_name(output)
    folders = [output / STEPS_FOLDER / f"{number:02d}-{step.command}" for number, step in enumerate(steps, 1)]
    folders[-1] = output
    first_step = _first_step_id(steps[0], inputs or [])
    if seed is None or seed == RANDOM:
        seed = _adopted_seed(output, folders[0], steps[0], first_step)
    reporting = ["--json"] if json_out else ["--quiet"] if quiet else []
    argvs = [[*argv, *reporting] for argv in _step_argvs(workflow, steps, folders, list(inputs or []), seed)]
    _check_steps(workflow, steps, argvs)
    cache, code, records = model_cache(), 0, []
    for number, (step, folder, argv) in enumerate(zip(steps, folders, argvs), 1):
        loads, hits = len(cache.loads), cache.hits
        step_code = _run_step(argv, chained=number > 1)
        record = {"event": "workflow_step", "step": number, "command": step.command, "output": str(folder),
                  "exit_code": step_code, "models_loaded": cache.loaded_files(since=loads),
                  "cache_hits": cache.hits - hits, "seed": seed, "first_step": first_step}
        records.append(record)
        _note(record, output, json_out=json_out, quiet=quiet)
        code = max(code, step_code)
        if step_code not in (0, 1):  # 1: some items failed, the rest go on; anything else stops the chain
            break
        if step_code == 1 and number < len(steps) and not _holds_images(folder):
            print(f"ldmtool: error: {workflow}: step {number} ({step.command}) failed every item; the steps after "
                  "it have nothing to work on", file=sys.stderr)
            break
    if code == 0 and not keep_steps:
        shutil.rmtree(output / STEPS_FOLDER, ignore_errors=True)
    if json_out:
        print(json.dumps({"event": "summary", "workflow": str(workflow), "steps": len(records), "exit_code": code}),
              flush=True)
    raise typer.Exit(code)


def _refuse_an_image_name(output: Path) -> None:
    from ldmtool.errors import UsageError
    from ldmtool.io.images import is_image_path

    if is_image_path(output) and not output.is_dir():
        raise UsageError(f"-o {output}: a workflow writes a folder (its outputs, steps and record), not one image; "
                         "give -o a folder name")


def _step_argvs(workflow: Path, steps: list["Step"], folders: list[Path], inputs: list[str],
                seed: int) -> list[list[str]]:
    """Each step's command line: its inputs (the previous step's folder), options and output folder."""
    argvs, current = [], inputs
    for number, (step, folder) in enumerate(zip(steps, folders), 1):
        argv = [step.command, *current, *step.argv(workflow.parent, path_options(step.command)), "-o", str(folder)]
        if "seed" not in step.options:
            argv += ["--seed", str(seed)]
        if number < len(steps):
            argv.append("--no-gallery")  # a step folder is the next step's input, not something to browse
        argvs.append(argv)
        current = [str(folder)]
    return argvs


def _check_steps(workflow: Path, steps: list["Step"], argvs: list[list[str]]) -> None:
    """Every step's options parsed as its command parses them (unknown options, values of the wrong type or
    out of range) before the first step runs: a one-line UsageError naming the workflow and the step."""
    from ldmtool.cli.app import command_settings
    from ldmtool.errors import UsageError

    clicks = sys.modules[typer.BadParameter.__module__]  # click's exceptions, or those of the click typer vendors
    settings = command_settings()  # as the step will parse: the config file's defaults, LDMTOOL_<COMMAND>_<OPTION>
    for number, (step, argv) in enumerate(zip(steps, argvs), 1):
        try:
            _command(step.command).make_context(
                step.command, argv[1:], default_map=settings.get("default_map", {}).get(step.command),
                auto_envvar_prefix=f"{settings['auto_envvar_prefix']}_{step.command}")
        except clicks.UsageError as err:
            raise UsageError(f"{workflow}: step {number} ({step.command}): "
                             f"{' '.join(err.format_message().split())}") from None


def _command(name: str) -> Any:
    import typer.main

    from ldmtool.cli.app import app

    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]  # a group: the app's


def path_options(name: str) -> frozenset[str]:
    """The options of command `name` whose values name files or folders: typed Path, or shown as FILE
    (`--model NAME|FILE`, `--lora FILE[:W]`)."""
    command = _command(name)
    hints = inspect.signature(command.callback).parameters
    found: set[str] = set()
    for param in command.params:
        hint = str(hints[param.name].annotation) if param.name in hints else ""
        if "Path" in hint or "FILE" in (param.metavar or ""):
            found.update(flag[2:] for flag in param.opts if flag.startswith("--"))
    return frozenset(found)


def _first_step_id(step: "Step", inputs: list[str]) -> str:
    """What makes a rerun the same workflow run for its seed: the first step's command, options and inputs."""
    text = json.dumps([step.command, step.options, inputs], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _adopted_seed(output: Path, first_folder: Path, first: "Step", first_step: str) -> int:
    """The seed of a run without --seed, passed to every step as --seed so that a rerun's steps have the same
    command lines (and write the same bytes): that of the latest earlier run of this workflow into `output`
    (its first step the same), else that of a killed one found in the first step's folder, else a random one."""
    from ldmtool.io.manifest import MANIFEST_NAME, read_manifest
    from ldmtool.runtime.seeds import random_seed

    recorded = [record.get("seed") for record in read_manifest(output / MANIFEST)
                if record.get("first_step") == first_step]
    in_folder = [record.get("base_seed") for record in read_manifest(first_folder / MANIFEST_NAME)
                 if record.get("command") == first.command]
    seeds = [seed for seed in [*in_folder, *recorded] if isinstance(seed, int) and not isinstance(seed, bool)]
    return seeds[-1] if seeds else random_seed()


def _holds_images(folder: Path) -> bool:
    from ldmtool.io.images import is_image_path

    try:
        return any(is_image_path(path) and not path.name.startswith(".") for path in folder.iterdir())
    except OSError:
        return False


def _run_step(argv: list[str], *, chained: bool) -> int:
    """One step as its command line in this process (its own errors are one line on stderr): the exit code."""
    from ldmtool.cli.app import main
    from ldmtool.runtime.workflow import StepContext, running_step

    with running_step(StepContext(chained=chained)):
        try:
            main(argv)
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else 1
    return 0


def _note(record: dict[str, Any], output: Path, *, json_out: bool, quiet: bool) -> None:
    """The step's record: a line in OUTPUT/workflow.jsonl, a JSON event (--json) or a line on stderr."""
    _keep(record, output)
    if json_out:
        print(json.dumps(record), flush=True)
    elif not quiet:
        loaded = ", ".join(Path(path).name for path in record["models_loaded"]) or "none (cache)"
        print(f"ldmtool: step {record['step']} {record['command']}: exit {record['exit_code']}, models loaded: "
              f"{loaded}", file=sys.stderr)


def _keep(record: dict[str, Any], output: Path) -> None:
    """Append the record to OUTPUT/workflow.jsonl; FatalError (exit 3) when it cannot be written after a step
    that went on (a step that stopped the run, e.g. on an output folder it could not create, said why)."""
    from ldmtool.errors import FatalError

    try:
        output.mkdir(parents=True, exist_ok=True)
        with open(output / MANIFEST, "a", encoding="utf-8") as manifest:
            manifest.write(json.dumps(record) + "\n")
    except OSError as err:
        if record["exit_code"] in (0, 1):
            raise FatalError(f"{output / MANIFEST}: cannot record the workflow step ({err.strerror or err})") from None


def register(app: typer.Typer) -> None:
    app.command("run", help=f"{run.__doc__}\n\n{EXAMPLE}")(run)
