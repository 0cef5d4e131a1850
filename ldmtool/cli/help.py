"""Plain-text `--help` for every command: the option groups of `ldmtool.options.PANEL_ORDER`, wrapped to the
terminal (at most 80 columns, also in a pipe), with metavars instead of type names and the examples last.

Typer's rich panels give each option four columns inside a box, so at 80 columns the help text gets about
20 characters and long values are cut with an ellipsis; in a pipe they add box characters and trailing
blanks. Click's two-column layout wraps every description in full, so `apply(app)` gives each command and
group of the app these classes, which lay the help out that way and keep Typer's panels as sections.
No torch, no rich.
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

try:  # Typer 0.29 carries its own copy of click; earlier versions use the click package
    from typer import _click as click
except ImportError:  # pragma: no cover - older Typer
    import click  # type: ignore[no-redef]

from ldmtool.options import PANEL_ORDER

ARGUMENTS = "Arguments"
OTHER = "Options"  # options without a panel (--help, --version, --install-completion)
SECTION_ORDER = (ARGUMENTS, *PANEL_ORDER, OTHER)
COMMANDS = "Commands"
COLUMN_MAX = 30  # widest first column (flags and metavar) before the help moves to the next line
SPACING = 2
_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH"}


def metavar(param: click.Parameter) -> str:
    """What an option's value or an argument is called in help: its declared metavar, else INT, FLOAT,
    TEXT or PATH from its type (never Python's type names)."""
    if param.metavar:
        return param.metavar
    if param.param_type_name == "argument":
        return (param.name or "arg").upper()
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None:  # older Typer: a click type ("integer range", "float", "path", "text", "choice")
        kind = getattr(getattr(param, "type", None), "name", "text")
        return {"integer": "INT", "float": "FLOAT", "path": "PATH"}.get(kind.split()[0], "TEXT")
    annotation = getattr(descriptor, "annotation", str)
    if getattr(descriptor, "is_choice", False):
        return "[" + "|".join(str(c) for c in descriptor.choices or ()) + "]"
    if getattr(descriptor, "is_path", False):
        return "PATH"
    if getattr(annotation, "__origin__", None) in (list, tuple):
        annotation = (getattr(annotation, "__args__", None) or (str,))[0]
    return _METAVARS.get(annotation, "TEXT")


def _first_column(param: click.Parameter) -> str:
    """`-o, --output PATH`, `--karras / --no-karras`, `INPUTS...`."""
    if param.param_type_name == "argument":
        return metavar(param) + ("..." if param.nargs != 1 else "")
    flag = getattr(param, "is_flag", False) or getattr(param, "count", False)
    value = "" if flag else f" {metavar(param)}"
    columns = [click.formatting.join_options(param.opts)[0] + value]
    if param.secondary_opts:
        columns.append(click.formatting.join_options(param.secondary_opts)[0])
    return " / ".join(columns)


def _second_column(param: click.Parameter, ctx: click.Context) -> str:
    """The help text with Typer's [default: ...; range; required] (a written-out default without the
    parentheses Typer puts around it)."""
    if getattr(param, "show_envvar", False):
        param.show_envvar = False  # type: ignore[attr-defined]  # LDMTOOL_<CMD>_<OPTION>: one rule, in the README
    record = param.get_help_record(ctx)
    text = record[1] if record else ""
    shown = getattr(param, "show_default", None)
    if isinstance(shown, str):
        text = text.replace(f"[default: ({shown})", f"[default: {shown}")
    return text


def _wrap(text: str, width: int) -> list[str]:
    """Lines at most `width` long, broken between words only (not at hyphens, which would split flags);
    a word longer than a whole line, the one exception, is split."""
    long_word = any(len(word) > width for word in text.split())
    return textwrap.wrap(text, width=width, break_on_hyphens=False, break_long_words=long_word) or [""]


def write_rows(formatter: click.HelpFormatter, rows: list[tuple[str, str]]) -> None:
    """Two columns: the first up to COLUMN_MAX wide (else the second starts on the next line)."""
    indent = " " * formatter.current_indent
    first_width = min(max(len(first) for first, _ in rows), COLUMN_MAX) + SPACING
    text_width = max(formatter.width - formatter.current_indent - first_width, 20)
    for first, second in rows:
        lines = _wrap(second, text_width) if second else []
        if len(first) + SPACING <= first_width and lines:
            formatter.write(f"{indent}{first:<{first_width}}{lines.pop(0)}\n")
        else:
            formatter.write(f"{indent}{first}\n")
        for line in lines:
            formatter.write(f"{indent}{' ' * first_width}{line}\n")


def _sections(command: click.Command, ctx: click.Context) -> list[tuple[str, list[tuple[str, str]]]]:
    """(section, rows) in SECTION_ORDER; a panel outside it (a mistake, see tests/test_help.py) comes last."""
    sections: dict[str, list[tuple[str, str]]] = {}
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        panel = ARGUMENTS if param.param_type_name == "argument" else getattr(param, "rich_help_panel", None) or OTHER
        sections.setdefault(panel, []).append((_first_column(param), _second_column(param, ctx)))
    rank = {name: index for index, name in enumerate(SECTION_ORDER)}
    return sorted(sections.items(), key=lambda item: rank.get(item[0], len(rank)))


def _split_examples(text: str) -> tuple[str, list[str]]:
    """The help text without its `Example: ...` paragraphs, and those examples' commands."""
    kept, examples = [], []
    for paragraph in text.strip().split("\n\n"):
        if paragraph.strip().startswith("Example:"):
            examples.append(" ".join(paragraph.strip()[len("Example:"):].split()))
        else:
            kept.append(paragraph)
    return "\n\n".join(kept), examples


def _write_examples(formatter: click.HelpFormatter, examples: list[str]) -> None:
    """Each example as a command to copy: wrapped between words, with shell continuations."""
    width = formatter.width - formatter.current_indent - 4
    for example in examples:
        formatter.write_paragraph()
        formatter.write_text("Example:")
        lines = [line.replace(_GLUE, " ") for line in _wrap(" ".join(_example_units(example)), width - 2)]
        text = " \\\n".join(lines[:1] + ["  " + line for line in lines[1:]])
        for line in text.splitlines():
            formatter.write(f"{' ' * (formatter.current_indent + 2)}{line}\n")


_GLUE = "\x00"  # joins the words of one unit of an example, so a line never ends between them


def _example_units(example: str) -> list[str]:
    """The example's words, a quoted string as one, and each option with its value (`-o out/`)."""
    words = re.findall(r"\"[^\"]*\"|'[^']*'|\S+", example)
    units: list[str] = []
    for word in words:
        if units and units[-1].startswith("-") and _GLUE not in units[-1] and not word.startswith("-"):
            units[-1] += _GLUE + word
        else:
            units.append(word.replace(" ", _GLUE))
    return units


def _short_help(command: click.Command) -> str:
    """A subcommand's first paragraph, in full (click would cut it at the column's width)."""
    text = command.short_help or _split_examples(command.help or "")[0]
    return " ".join(text.split("\n\n")[0].split())


def format_help(command: click.Command, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    command.format_usage(ctx, formatter)
    text, examples = _split_examples(command.help or "")
    if text:
        with formatter.indentation():
            for paragraph in text.split("\n\n"):
                formatter.write_paragraph()
                for line in _wrap(" ".join(paragraph.split()), formatter.width - formatter.current_indent):
                    formatter.write(f"{' ' * formatter.current_indent}{line}\n")
    for name, rows in _sections(command, ctx):
        with formatter.section(name):
            write_rows(formatter, rows)
    commands = _visible_commands(command, ctx)
    if commands:
        with formatter.section(COMMANDS):
            write_rows(formatter, [(name, _short_help(sub)) for name, sub in commands])
    if examples or command.epilog:
        _write_examples(formatter, examples)
        if command.epilog:
            formatter.write_paragraph()
            formatter.write_text(command.epilog)


def _visible_commands(command: click.Command, ctx: click.Context) -> list[tuple[str, click.Command]]:
    if not isinstance(command, TyperGroup):
        return []
    return [(name, sub) for name in command.list_commands(ctx)
            if (sub := command.get_command(ctx, name)) is not None and not sub.hidden]


def usage_pieces(command: click.Command, ctx: click.Context) -> list[str]:
    """`[OPTIONS] INPUTS...`: arguments named by their metavar, optional ones in brackets."""
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if param.param_type_name == "argument":
            name = _first_column(param)
            pieces.append(name if param.required else f"[{name}]")
    return pieces


class HelpCommand(TyperCommand):
    """A command whose help is `format_help` above (and whose closed stdout is one line, exit 3)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # Click would exit 1 without a word
            from ldmtool.runtime.report import closed_stdout

            raise closed_stdout() from None

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        format_help(self, ctx, formatter)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return usage_pieces(self, ctx)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from ldmtool.cli.user_config import name_environment_variables

        name_environment_variables(self, ctx)
        return super().parse_args(ctx, args)


class HelpGroup(TyperGroup):
    """A command group whose help is `format_help` above."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        format_help(self, ctx, formatter)


def apply(app: typer.Typer) -> None:
    """Give every command and group of `app` (and of its sub-apps) the classes above, unless they chose one."""
    if _unset(app.info.cls):
        app.info.cls = HelpGroup
    for info in app.registered_commands:
        if _unset(info.cls):
            info.cls = HelpCommand
    for group in app.registered_groups:
        if group.typer_instance is not None:
            apply(group.typer_instance)
        if _unset(group.cls):
            group.cls = HelpGroup


def _unset(value: Any) -> bool:
    """No class chosen: Typer's default, or its placeholder for one."""
    from typer.models import DefaultPlaceholder

    return value in (None, TyperCommand, TyperGroup) or isinstance(value, DefaultPlaceholder)

