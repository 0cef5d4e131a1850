"""Defaults from a config file (issue 16): `$LDMTOOL_CONFIG`, else `$XDG_CONFIG_HOME/ldmtool/config.yaml`
(or `config.toml`, Python 3.11+), else `~/.config/ldmtool/config.yaml`.

    defaults:              # every command that has the option
      device: cpu
      output: ~/ldm-out
    superres:              # one command
      model: ~/models/bsr_sr.safetensors
      scale: 4
    train:                 # a command group: one section per subcommand
      autoencoder:
        device: cpu

Keys are option names (`max-memory` or `max_memory`, `format`, `model`, ...). The file only sets defaults:
the environment (`LDMTOOL_<COMMAND>_<OPTION>`, e.g. `LDMTOOL_SUPERRES_STEPS=50`) and the command line
override it, as Click's `default_map` and `auto_envvar_prefix` order them. A key or command the file
names but ldmtool does not have, or a value the option cannot take, is a usage error naming the file.
Nothing here imports torch.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import typer

from ldmtool.errors import UsageError

CONFIG_ENV = "LDMTOOL_CONFIG"
ENV_PREFIX = "LDMTOOL"
EVERY_COMMAND = "defaults"
_NAMES = ("config.yaml", "config.yml", "config.toml")
_MAX_BYTES = 1 << 20


def config_path() -> Optional[Path]:
    """The config file in effect, or None."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise UsageError(f"{CONFIG_ENV}={explicit}: no such config file")
        return path
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "ldmtool"
    found = [base / name for name in _NAMES if (base / name).exists()]
    if len(found) > 1:
        raise UsageError(f"{base}: both {found[0].name} and {found[1].name}; keep one config file")
    return found[0] if found else None


def read_config(path: Path) -> dict[str, Any]:
    """The config document: a mapping of sections (`defaults`, command names) to option values."""
    from ldmtool.io.files import read_text_file

    try:
        text = read_text_file(path, _MAX_BYTES)
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read the config file ({getattr(err, 'strerror', None) or err})") from None
    doc = _parse(path, text)
    if doc is None:
        return {}
    if not isinstance(doc, Mapping) or not all(isinstance(v, Mapping) or v is None for v in doc.values()):
        raise UsageError(f"{path}: the config file holds sections ('defaults:' or a command name) of option: value")
    return {str(section): dict(values or {}) for section, values in doc.items()}


def _parse(path: Path, text: str) -> Any:
    if path.suffix == ".toml":
        try:
            tomllib = importlib.import_module("tomllib")  # Python 3.11+
        except ImportError:
            raise UsageError(f"{path}: TOML config files need Python 3.11 or later; write config.yaml") from None
        try:
            return tomllib.loads(text)
        except (tomllib.TOMLDecodeError, RecursionError) as err:
            raise UsageError(f"{path}: not valid TOML ({' '.join(str(err).split())})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as err:
        raise UsageError(f"{path}: not valid YAML ({' '.join(str(err).split())[:200]})") from None


def default_map(group: Any, path: Path, tasks: set[str]) -> dict[str, dict[str, Any]]:
    """Click's `default_map` for the app's command `group` from the config file at `path`: per command,
    parameter name -> value, each checked against the option's type. The `defaults` section applies to
    the batch-run commands named in `tasks` (not to `replay -o` or `info`). A command group's section
    (`train`, `models`) holds one section per subcommand, nested as Click nests its default_map."""
    sections = read_config(path)
    commands = dict(group.commands)
    unknown = sorted(set(sections) - set(commands) - {EVERY_COMMAND})
    if unknown:
        raise UsageError(f"{path}: [{unknown[0]}] is not an ldmtool command (sections: {EVERY_COMMAND} or a "
                         "command name such as superres)")
    for key in sections.get(EVERY_COMMAND, {}):
        if not any(_parameter(commands[name], key) for name in tasks):
            raise UsageError(f"{path}: {key!r} in [{EVERY_COMMAND}] is not an option of any task command")
    result: dict[str, dict[str, Any]] = {}
    for name, command in commands.items():
        if _is_group(command):
            values = _group_defaults(path, command, sections.get(name, {}), name)
        else:
            every = sections.get(EVERY_COMMAND, {}) if name in tasks else {}
            values = {**_command_defaults(path, command, every, EVERY_COMMAND, strict=False),
                      **_command_defaults(path, command, sections.get(name, {}), name)}
        if values:
            result[name] = values
    return result


def _is_group(command: Any) -> bool:
    return isinstance(getattr(command, "commands", None), Mapping)


def _group_defaults(path: Path, group: Any, section: Mapping[str, Any], where: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, values in section.items():
        command = group.commands.get(key)
        if command is None or not (values is None or isinstance(values, Mapping)):
            raise UsageError(f"{path}: {key!r} in [{where}] is not a command of {where} (its section holds one "
                             f"section per subcommand: {', '.join(sorted(group.commands))})")
        nested = f"{where} {key}"
        chosen = dict(values or {})
        defaults = _group_defaults(path, command, chosen, nested) if _is_group(command) else \
            _command_defaults(path, command, chosen, nested)
        if defaults:
            result[key] = defaults
    return result


def _command_defaults(path: Path, command: Any, chosen: Mapping[str, Any], where: str,
                      strict: bool = True) -> dict[str, Any]:
    """Parameter name -> checked value; a key that is not an option of `command` is an error if `strict`."""
    values = {}
    for key, value in chosen.items():
        parameter = _parameter(command, key)
        if parameter is not None:
            values[parameter.name] = _checked(path, command, parameter, value)
        elif strict:
            raise UsageError(f"{path}: {key!r} in [{where}] is not an option of {where}")
    return values


def _parameter(command: Any, key: str) -> Any:
    option = "--" + str(key).lstrip("-").replace("_", "-")
    for parameter in getattr(command, "params", ()):
        if getattr(parameter, "param_type_name", "") == "option" and (option in parameter.opts or key == parameter.name):
            return parameter
    return None


def _checked(path: Path, command: Any, parameter: Any, value: Any) -> Any:
    if isinstance(value, str) and parameter.name in ("output", "model", "config"):
        value = os.path.expanduser(value)
    if isinstance(value, bool) and not getattr(parameter, "is_bool_flag", False):  # YAML's yes/no/on/off too
        raise UsageError(f"{path}: {parameter.opts[0]} = {value!r} for {command.name}: a yes/no value for an option "
                         "that takes a value (it would count as 1 or 0)")
    try:
        parameter.process_value(typer.Context(command), value)
    except Exception as err:  # click's BadParameter, or a pydantic-style coercion error
        message = getattr(err, "message", None) or str(err)
        raise UsageError(f"{path}: {parameter.opts[0]} = {value!r} for {command.name}: "
                         f"{' '.join(str(message).split())}") from None
    return value


def name_environment_variables(command: Any, ctx: Any) -> None:
    """Read an option from `LDMTOOL_<COMMAND>_<OPTION>` named after its flag (`LDMTOOL_TXT2IMG_FORMAT` for
    `--format`), as documented, where Click's own name follows the parameter (`..._FMT`, which keeps working)."""
    if ctx.auto_envvar_prefix is None:
        return
    for parameter in command.params:
        flags = [opt for opt in getattr(parameter, "opts", ()) if opt.startswith("--")]
        if getattr(parameter, "param_type_name", "") != "option" or parameter.envvar is not None or not flags:
            continue
        flag = flags[0][2:].replace("-", "_").upper()
        if flag != str(parameter.name).upper():
            parameter.envvar = f"{ctx.auto_envvar_prefix}_{flag}"


def show(json_out: bool = typer.Option(False, "--json", help="Print as one JSON object.")) -> None:
    """Show the config file in effect and the defaults it gives each command."""
    import json

    from ldmtool.cli.app import app, task_commands

    path = config_path()
    defaults = default_map(typer.main.get_command(app), path, task_commands()) if path is not None else {}
    if json_out:
        typer.echo(json.dumps({"file": None if path is None else str(path), "defaults": defaults}))
        return
    typer.echo(f"config file: {path if path is not None else 'none'} (set {CONFIG_ENV} or write "
               f"$XDG_CONFIG_HOME/ldmtool/config.yaml)")
    for command, values in _flat_sections(defaults):
        typer.echo(f"{command}:")
        for name, value in values.items():
            typer.echo(f"  {name}: {value}")


def _flat_sections(defaults: Mapping[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """("train autoencoder", values) for a group's nested sections, so `config show` names each command."""
    flat: list[tuple[str, dict[str, Any]]] = []
    for name, values in defaults.items():
        nested = {k: v for k, v in values.items() if isinstance(v, Mapping)}
        plain = {k: v for k, v in values.items() if not isinstance(v, Mapping)}
        if plain:
            flat.append((prefix + name, plain))
        flat += _flat_sections(nested, f"{prefix}{name} ")
    return flat


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Defaults from the config file.\n\nExample: ldmtool config show", no_args_is_help=True)
    group.command("show", help=f"{show.__doc__}\n\nExample: ldmtool config show")(show)
    app.add_typer(group, name="config")
