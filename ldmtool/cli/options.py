"""Command-line options from the option groups of `ldmtool.options`, and the few options of their own.

`annotation(group, name)` is the Typer declaration of a group's field (type, flags, help, panel); the task
commands get whole groups through `ldmtool.cli.shared`, the other commands take single ones as the
aliases below. Names, defaults and help texts therefore stay identical across commands, which is what
scripts rely on.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ldmtool.cli.complete import COMPLETERS
from ldmtool.options import (
    MODEL as MODEL,
    OUTPUT as OUTPUT,  # the help panels, for the command modules' own options
    SAMPLING as SAMPLING,
    ImageInputs,
    ModelChoice,
    RunChoice,
    option_fields,
)


def annotation(group: type, name: str) -> Any:
    """`Annotated[type, typer.Option(...)]` for the option field `name` of `group`."""
    (field,) = [f for f in option_fields(group) if f.name == name]
    return _annotated(group, field)


def parameters(group: type, *, defaults: Optional[dict[str, Any]] = None,
               leave_out: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """The group's options as keyword-only parameters (what Typer reads); `defaults` overrides the group's
    own."""
    defaults = defaults or {}
    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=defaults.get(f.name, f.default),
                              annotation=_annotated(group, f))
            for f in option_fields(group) if f.name not in leave_out]


def _annotated(group: type, field: dataclasses.Field[Any]) -> Any:
    meta = field.metadata
    hint = _type_hints(group)[field.name]
    return Annotated[hint, typer.Option(*meta["flags"], help=meta["help"], rich_help_panel=meta["panel"],
                                        autocompletion=COMPLETERS.get(field.name), **meta["settings"])]


@functools.cache
def _type_hints(group: type) -> dict[str, Any]:
    """The group's field types, evaluated once (`--help` time: every command asks for the shared groups)."""
    return typing.get_type_hints(group)


Inputs = Annotated[
    list[str],
    typer.Argument(
        help="Image files, folders, globs, @list.txt files, or '-' to read paths from stdin.",
        show_default=False,
    ),
]
ColourFix = Annotated[
    Optional[bool],
    typer.Option("--colour-fix/--no-colour-fix",
                 help="Take the low frequencies (colour, brightness) from a classical estimate and only the detail "
                      "from the model: superres a bicubic upscale of the input, inpaint an OpenCV Telea fill of the "
                      "hole (default: the model config's ldmtool.colour_fix, else off).",
                 rich_help_panel=SAMPLING),
]
# The base -> refiner hand-off (txt2img, img2img, inpaint). --refiner-at defaults to None, not 0.8, so runs
# without a refiner keep their job identity.
Refiner = Annotated[
    Optional[Path],
    typer.Option("--refiner", help="Refiner checkpoint (e.g. SDXL refiner 1.0) that runs the last part of the "
                 "schedule from the model's latent (see --refiner-at).", rich_help_panel=MODEL),
]
RefinerAt = Annotated[
    Optional[float],
    typer.Option("--refiner-at", help="Where --refiner takes over, as a fraction of the schedule (default 0.8: "
                 "it runs the last 20%, as diffusers' denoising_end).", rich_help_panel=SAMPLING),
]

# Single options of the shared groups, for commands that take only some of them.
Json = annotation(RunChoice, "json_out")
Quiet = annotation(RunChoice, "quiet")
Recursive = annotation(ImageInputs, "recursive")
Config = annotation(ModelChoice, "config")
Preset = annotation(ModelChoice, "preset")
NoEma = annotation(ModelChoice, "no_ema")
Device = annotation(ModelChoice, "device")
Precision = annotation(ModelChoice, "precision")
