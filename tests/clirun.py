"""Run the real `ldmtool` entry point in-process, so torch and the models load once per test session."""
from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

from ldmtool.cli.app import main


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def ensure_test_commands() -> None:
    """Register the test-only commands (`_invert`, ldmtool/cli/testing.py) once per process. Registering
    again, or calling `ldmtool.cli.app._register_commands()` again, would add every command a second time, and
    each later `main()` in the process would build all the copies (tests/conftest.py refuses that)."""
    from ldmtool.cli import testing
    from ldmtool.cli.app import app

    if "_invert" not in {command.name for command in app.registered_commands}:
        testing.register(app)


def run_cli(*args) -> CliResult:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(arg) for arg in args])
            code = 0
        except SystemExit as exit:
            code = exit.code or 0
    return CliResult(code, out.getvalue(), err.getvalue())
