"""`ldmtool semantic2img`: images from label maps (LDM semantic_synthesis256/512 and similar models)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import find_inputs, finish
from ldmtool.cli.shared import task_command
from ldmtool.options import ImageInputs, ModelChoice, SamplingChoice, Size

if TYPE_CHECKING:
    from ldmtool.runtime.jobs import RunOptions

EXAMPLE = "Example: ldmtool semantic2img maps/ --palette landscape.yaml --width 1024 --height 512 -o out/"

PaletteFile = Annotated[
    Optional[Path],
    typer.Option("--palette", help="YAML of class id → colour (\"#rrggbb\" or [r, g, b]) for colour label maps; "
                 "without it, pixel values are class ids.", rich_help_panel=opt.SAMPLING),
]


@task_command(model="default-semantic2img", seamless=True)
def semantic2img(
    inputs: opt.Inputs,
    palette: PaletteFile = None,
    *,
    size: Size,
    images: ImageInputs,
    run: "RunOptions", model: ModelChoice, sampling: SamplingChoice,
) -> None:
    """Generate images from label maps (index PNGs, or colour maps with --palette) at the map's size."""
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.semantic2img import Semantic2ImgTask
    from ldmtool.runtime.runner import run_task

    task = Semantic2ImgTask(Engine(model, sampling), palette=palette, width=size.width, height=size.height,
                            max_pixels=images.max_pixels)
    finish(run_task(task, find_inputs(inputs, recursive=images.recursive), run))


def register(app: typer.Typer) -> None:
    app.command("semantic2img", help=f"{semantic2img.__doc__}\n\n{EXAMPLE}")(semantic2img)
