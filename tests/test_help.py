"""Every registered command and subcommand answers `--help` with an example line, without importing torch.

One child interpreter walks the real command tree (as users get it, and again with the test-only commands)
and asks each command for help through the real entry point; torch must still be absent afterwards.
"""
import json
import os
import re
import subprocess
import sys

import pytest

WALKER = r"""
import contextlib, io, json, sys
import typer.main
from ldmtool.cli.app import app, main

def walk(command, path):
    yield path
    if isinstance(getattr(command, "commands", None), dict):
        for name, sub in sorted(command.commands.items()):
            yield from walk(sub, path + [name])

report = {}
for path in walk(typer.main.get_command(app), []):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(path + ["--help"])
        except SystemExit as exit_:
            code = exit_.code
    lines = [line.strip(" │") for line in out.getvalue().splitlines()]
    report[" ".join(path) or "(root)"] = {
        "exit": code, "example": [l for l in lines if l.startswith("Example:")],
    }
print(json.dumps({"report": report, "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize("test_commands", ["0", "1"])
def test_every_command_has_help_with_an_example_and_no_torch(test_commands):
    env = dict(os.environ, LDMTOOL_TEST_COMMANDS=test_commands, COLUMNS="200", TERM="dumb")
    result = subprocess.run([sys.executable, "-c", WALKER], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.splitlines()[-1])
    report = answer["report"]
    assert "(root)" in report and "info" in report
    assert ("_invert" in report) == (test_commands == "1")
    failing = {name: entry for name, entry in report.items() if entry["exit"] not in (0, None)}
    assert not failing, f"--help failed for {sorted(failing)}"
    missing = sorted(name for name, entry in report.items() if not entry["example"] and name != "(root)")
    assert not missing, f"no 'Example:' line in --help of {missing}"
    assert answer["torch"] is False, "answering --help imported torch"


# -- help that reads at 80 columns and in a pipe (issue 16) ------------------------------------------------------

HELP_PAGES = r"""
import contextlib, io, json, sys
import typer.main
from ldmtool.cli.app import app, main

def walk(command, path):
    yield path
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from walk(sub, path + [name])

pages = {}
for path in walk(typer.main.get_command(app), []):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(path + ["--help"])
        except SystemExit:
            pass
    pages[" ".join(path) or "(root)"] = out.getvalue()
print(json.dumps(pages))
"""


def _pages_at_80_columns() -> dict[str, str]:
    """Every command's help through Typer's test runner, as in an 80-column terminal."""
    import typer.main
    from typer.testing import CliRunner

    from ldmtool.cli.app import app

    def walk(command, path):
        yield path
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    pages = {}
    runner = CliRunner()
    for path in walk(typer.main.get_command(app), []):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80, prog_name="ldmtool")
        assert result.exit_code == 0, result.output
        pages[" ".join(path) or "(root)"] = result.output
    return pages


def _pages_in_a_pipe() -> dict[str, str]:
    """Every command's help written to a pipe by a child interpreter that has no COLUMNS."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    result = subprocess.run([sys.executable, "-c", HELP_PAGES], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module", params=["terminal", "pipe"])
def pages(request) -> dict[str, str]:
    return _pages_at_80_columns() if request.param == "terminal" else _pages_in_a_pipe()


def _flat(page: str) -> str:
    return " ".join(page.split())


def _sections(page: str) -> list[str]:
    return [line[:-1] for line in page.splitlines() if re.fullmatch(r"[A-Z][\w &]*:", line)]


def _task_pages(pages: dict[str, str]) -> dict[str, str]:
    return {name: page for name, page in pages.items() if "--sampler" in page}


def test_help_lines_fit_80_columns_uncut(pages):
    assert {"(root)", "superres", "txt2img", "models list", "manifest merge", "info", "replay",
            "train diffusion"} <= set(pages)
    for name, page in pages.items():
        long = [line for line in page.splitlines() if len(line) > 80]
        assert not long, f"{name}: lines over 80 columns: {long}"
        assert "…" not in page, f"{name}: text cut with an ellipsis"
        assert not set("╭╮╰╯│") & set(page), f"{name}: box drawing in help"


def test_help_names_values_by_metavar_not_python_types(pages):
    for name, page in pages.items():
        leaked = re.findall(r"<(?:bool|str|int|float|path|list\[[^>]*|[a-z]+ range)>", page)
        assert not leaked, f"{name}: internal type names {leaked}"
    superres = _flat(pages["superres"])
    for shown in ("-s, --scale FLOAT", "--steps INT", "-o, --output PATH", "--sampler NAME", "INPUTS..."):
        assert shown in superres


def test_help_lists_every_sampler_and_format_in_full(pages):
    from ldmtool.diffusion.names import SAMPLER_NAMES

    task_pages = _task_pages(pages)
    assert {"txt2img", "img2img", "inpaint", "superres", "sample", "semantic2img", "layout2img",
            "tile-synth"} <= set(task_pages)
    for name, page in task_pages.items():
        flat = _flat(page)
        assert ", ".join(SAMPLER_NAMES) in flat, f"{name}: sampler list incomplete"
        assert "png, jpg, webp or tiff, or keep" in flat, name


def test_help_shows_defaults_including_output(pages):
    for name, page in _task_pages(pages).items():
        flat = _flat(page)
        assert "-o, --output PATH Output file (one input) or folder. [default: out/]" in flat, name
        assert "--quality INT JPEG/WebP quality. [default: 95; 1<=x<=100]" in flat, name


def test_help_keeps_literal_brackets(pages):
    assert "'ldmtool[ray]'" in _flat(pages["superres"])
    assert '("#rrggbb" or [r, g, b])' in _flat(pages["semantic2img"])
    assert not [name for name, page in pages.items() if "\\[" in page]


# The order of the option groups in every command's help (ldmtool.options.PANEL_ORDER, between the arguments and
# the options of no group such as --help).
SECTION_ORDER = ("Arguments", "Inputs", "Output", "Model", "Sampling", "Tiling & memory", "Training", "Run", "Options")


def test_option_groups_come_in_one_order_with_the_example_last(pages):
    from ldmtool.cli.help import SECTION_ORDER as declared

    assert declared == SECTION_ORDER
    rank = {section: index for index, section in enumerate(SECTION_ORDER)}
    for name, page in pages.items():
        sections = _sections(page)
        groups = [s for s in sections if s not in ("Commands", "Example")]
        assert all(s in rank for s in groups), f"{name}: a panel outside PANEL_ORDER: {groups}"
        assert groups == sorted(groups, key=rank.__getitem__), f"{name}: groups out of order: {groups}"
        if name != "(root)":
            assert sections[-1] == "Example", f"{name}: the example is not last: {sections}"
    for name, page in _task_pages(pages).items():
        assert [s for s in _sections(page) if s in ("Output", "Model", "Sampling", "Tiling & memory", "Run")] == [
            "Output", "Model", "Sampling", "Tiling & memory", "Run"], name


# -- shell completion ----------------------------------------------------------------------------------------------


def _complete(words: str) -> list[str]:
    """What bash completion offers for the command line `words` (the cursor after its last word)."""
    from typer.testing import CliRunner

    from ldmtool.cli.app import app

    env = {"_LDMTOOL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}
    result = CliRunner().invoke(app, [], env=env, prog_name="ldmtool")
    assert result.exit_code == 0, result.output
    return result.output.split()


def test_completion_offers_shipped_models_presets_and_samplers():
    from ldmtool.checkpoints.presets import preset_names, shipped_models
    from ldmtool.diffusion.names import SAMPLER_NAMES

    shipped = [m.name for m in shipped_models()]
    assert "default-superres" in shipped
    assert set(shipped) <= set(_complete("ldmtool superres --model "))
    assert _complete("ldmtool superres -m default-su") == ["default-superres"]
    assert _complete("ldmtool txt2img --sampler ") == list(SAMPLER_NAMES)
    assert _complete("ldmtool txt2img --sampler dpmpp") == ["dpmpp_2m", "dpmpp_2m_sde"]
    assert _complete("ldmtool superres --preset ") == preset_names()
    assert _complete("ldmtool models inspect --preset kl-f") == [n for n in preset_names() if n.startswith("kl-f")]
    assert _complete("ldmtool superres --format ") == ["png", "jpg", "webp", "tiff", "keep"]  # tiff, keep were missing
    assert _complete("ldmtool txt2img --control-mode ") == ["balanced", "control"]
    assert "superres" in _complete("ldmtool su")


COMPLETE_WITHOUT_TORCH = r"""
import contextlib, io, os, sys
os.environ.update({"_LDMTOOL_COMPLETE": "complete_bash", "COMP_WORDS": "ldmtool superres --model ",
                   "COMP_CWORD": "3"})
from ldmtool.cli.app import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main([])
    except SystemExit:
        pass
print(repr(out.getvalue()), "torch" in sys.modules)
"""


def test_completion_does_not_import_torch():
    result = subprocess.run([sys.executable, "-c", COMPLETE_WITHOUT_TORCH], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    offered, torch_loaded = result.stdout.strip().rsplit(" ", 1)
    assert "default-superres" in offered
    assert torch_loaded == "False"


@pytest.mark.parametrize("shell, marker, installed", [
    ("bash", "complete -o default -F _ldmtool_completion ldmtool", ".bash_completions/ldmtool.sh"),
    ("zsh", "compdef _ldmtool_completion ldmtool", ".zfunc/_ldmtool"),
    ("fish", "complete --command ldmtool", ".config/fish/completions/ldmtool.fish"),
])
def test_completion_scripts_for_bash_zsh_fish(tmp_path, shell, marker, installed):
    # Typer takes the shell as the options' value when it is told not to detect the shell it runs in.
    env = dict(os.environ, _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1", HOME=str(tmp_path))
    for option in ("--show-completion", "--install-completion"):
        result = subprocess.run([sys.executable, "-m", "ldmtool", option, shell], capture_output=True, text=True,
                                env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        if option == "--show-completion":
            assert marker in result.stdout and "_LDMTOOL_COMPLETE" in result.stdout
    assert "_LDMTOOL_COMPLETE" in (tmp_path / installed).read_text()
