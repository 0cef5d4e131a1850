"""Every registered command and subcommand answers `--help` with an example line, without importing torch.

One child interpreter walks the real command tree (as users get it, and again with the test-only commands)
and asks each command for help through the real entry point; torch must still be absent afterwards.
"""
import json
import os
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
