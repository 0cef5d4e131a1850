"""The `ldmtool` Typer app: one module per command, joined here.

This is the one place where an `LdmError` becomes a one-line message and an exit code. Command modules
import only typer and `ldmtool.cli.options`; torch is imported inside command bodies, so `--help` stays fast.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, NoReturn

import typer

from ldmtool import __version__
from ldmtool.cli import help
from ldmtool.errors import EXIT_INTERRUPTED, EXIT_USAGE, LdmError

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
    help.apply(app)  # plain help that wraps at 80 columns, options in PANEL_ORDER, examples last


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: every way a command ends is one line on stderr (when it is an error) and
    an exit code (DESIGN.md §6); with `--json`, the last stdout line is always a `summary` event."""
    from ldmtool.runtime import report
    from ldmtool.runtime.watch import report_crashes

    report_crashes()  # a model file cut short under a run: SIGBUS says so on stderr (runtime/watch.py)
    clicks = sys.modules[typer.BadParameter.__module__]  # click's exceptions, or those of the click typer vendors
    no_args = getattr(clicks, "NoArgsIsHelpError", ())
    args = list(sys.argv[1:] if argv is None else argv)
    report.reset_final_event()
    try:
        with _sigterm_as_ctrl_c():
            code = app(args=args, prog_name="ldmtool", standalone_mode=False, **command_settings())
    except no_args as err:  # bare `ldmtool` or `ldmtool models`: the help, as with -h
        print(err.ctx.get_help(), file=sys.stderr)
        _end(args, EXIT_USAGE, None)
    except clicks.UsageError as err:  # unknown option, bad value, missing argument: one line, as for ours
        command = err.ctx.command_path if err.ctx else "ldmtool"
        _end(args, EXIT_USAGE, f"{_from_environment(err)}{' '.join(err.format_message().split())} (see '{command} -h')")
    except clicks.ClickException as err:
        _end(args, err.exit_code, " ".join(err.format_message().split()))
    except LdmError as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _end(args, err.exit_code, message)
    except (KeyboardInterrupt, typer.Abort):  # outside a batch run (which reports its own)
        _end(args, EXIT_INTERRUPTED, "interrupted")
    _end(args, code if isinstance(code, int) else 0, None)


@contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (a cron timeout, `kill`) stops any command as Ctrl-C does: temporary files are removed on the way
    out and the exit code is 130 (a batch run and a training loop refine this: see runtime/runner.py,
    train/common.py). Without it, a signal outside those (loading a model, `models convert`) ended the process
    with 143 and left its temporary files."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _from_environment(err: Any) -> str:
    """`NAME=VALUE: ` when the bad value came from an environment variable, not the command line (Click's
    message names the option alone, which the user did not type)."""
    param, ctx = getattr(err, "param", None), getattr(err, "ctx", None)
    if param is None or ctx is None or param.name is None:
        return ""
    source = ctx.get_parameter_source(param.name)
    if source is None or source.name != "ENVIRONMENT":
        return ""
    names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
    names.append(f"{ctx.auto_envvar_prefix}_{param.name.upper()}")
    found = next((name for name in names if os.environ.get(name)), None)
    return f"{found}={os.environ[found]!r}: " if found else "from the environment: "


def command_settings() -> dict[str, Any]:
    """Where options take their defaults from, besides the code: the config file, then `LDMTOOL_<COMMAND>_<OPTION>`
    environment variables (the command line wins over both)."""
    from ldmtool.cli import user_config

    settings: dict[str, Any] = {"auto_envvar_prefix": user_config.ENV_PREFIX}
    _CONFIG_DEFAULTS.clear()
    path = user_config.config_path()
    if path is not None:
        settings["default_map"] = user_config.default_map(typer.main.get_command(app), path, task_commands())
        _CONFIG_DEFAULTS.update(settings["default_map"])
    return settings


_CONFIG_DEFAULTS: dict[str, Any] = {}  # the config file's defaults of this invocation, per command
_TRUE = ("1", "true", "t", "yes", "y", "on")  # what Click's BOOL takes as true


def _end(args: list[str], code: int, message: str | None) -> NoReturn:
    from ldmtool.runtime import report

    if message is not None:
        print(f"ldmtool: error: {message}", file=sys.stderr)
    if _wants_json(args) and _is_task_command(args) and not report.final_event_sent():
        report.emit_final_event(sys.stdout, code, message)
    sys.exit(code)


def task_commands() -> set[str]:
    """The names of the batch-run commands (`superres`, `txt2img`, ...)."""
    from ldmtool.cli.shared import TASK_MARK

    return {str(command.name) for command in app.registered_commands if getattr(command.callback, TASK_MARK, False)}


def _is_task_command(args: list[str]) -> bool:
    name = next((arg for arg in args if not arg.startswith("-")), None)
    return name in task_commands()


def _wants_json(args: list[str]) -> bool:
    """`--json` on the command line, or from `LDMTOOL_<COMMAND>_JSON` or the config file."""
    from ldmtool.cli.user_config import ENV_PREFIX

    options = args[: args.index("--")] if "--" in args else args
    if "--json" in options:
        return True
    name = next((arg for arg in args if not arg.startswith("-")), "")
    prefix = f"{ENV_PREFIX}_{name.upper().replace('-', '_')}"
    value = os.environ.get(f"{prefix}_JSON") or os.environ.get(f"{prefix}_JSON_OUT")
    if value:
        return value.strip().lower() in _TRUE
    return bool(_CONFIG_DEFAULTS.get(name, {}).get("json_out"))
