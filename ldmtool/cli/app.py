"""The `ldmtool` Typer app: one module per command, joined here.

This is the one place where an `LdmError` becomes a one-line message and an exit code. Command modules
import only typer and `ldmtool.cli.options`; torch is imported inside command bodies, so `--help` stays fast.
"""
from __future__ import annotations

import os
import sys

import typer

from ldmtool import __version__
from ldmtool.cli import help
from ldmtool.errors import EXIT_INTERRUPTED, LdmError

app = typer.Typer(
    name="ldmtool",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish); values: cli/complete.py
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ldmtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Latent diffusion models over folders of images.

    Example: ldmtool superres ./photos --scale 4 -o out/
    """


def _register_commands() -> None:
    """Attach every command module. Each module exposes `register(app)`."""
    from ldmtool.cli import commands

    for module in commands.modules():
        module.register(app)
    if os.environ.get("LDMTOOL_TEST_COMMANDS") == "1":
        from ldmtool.cli import testing

        testing.register(app)


_register_commands()
help.apply(app)  # plain help that wraps at 80 columns, options in PANEL_ORDER, examples last


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="ldmtool")
    except LdmError as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"ldmtool: error: {message}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:  # outside a batch run (which reports its own interruption)
        print("ldmtool: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
