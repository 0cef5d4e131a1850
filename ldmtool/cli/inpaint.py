"""`ldmtool inpaint`: repaint the white part of each image's mask."""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import find_inputs, finish
from ldmtool.cli.shared import task_command
from ldmtool.options import ControlInputs, ImageInputs, MaskInputs, ModelChoice, SamplingChoice, TextPrompt

if TYPE_CHECKING:
    from ldmtool.runtime.jobs import RunOptions

EXAMPLE = "Example: ldmtool inpaint photo.png photo_mask.png -o fixed.png   (folders: x.png pairs with x_mask.png)"

Grow = Annotated[int, typer.Option("--grow", min=0, help="Dilate the mask by N pixels first.",
                                   rich_help_panel=opt.SAMPLING)]
Feather = Annotated[int, typer.Option("--feather", min=0, help="Blend band in pixels at the mask edge; outside "
                                      "it the input is kept exactly (0 = hard edge).", rich_help_panel=opt.SAMPLING)]


@task_command(model="default-inpaint")
def inpaint(
    inputs: opt.Inputs,
    *,
    text: TextPrompt,
    mask: MaskInputs,
    grow: Grow = 0,
    feather: Feather = 4,
    colour_fix: opt.ColourFix = None,
    refiner: opt.Refiner = None,
    refiner_at: opt.RefinerAt = None,
    images: ImageInputs,
    control: ControlInputs,
    run: "RunOptions", model: ModelChoice, sampling: SamplingChoice,
) -> None:
    """Inpaint images: white mask pixels are repainted, black ones kept exactly."""
    from ldmtool.pipelines.control import ControlRun
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.inpaint import InpaintTask
    from ldmtool.pipelines.refiner import refiner_engine
    from ldmtool.runtime.runner import run_task

    task = InpaintTask(Engine(model, sampling), prompt=text.prompt or "", negative=text.negative or "", grow=grow,
                       feather=feather, invert_mask=mask.invert_mask, from_alpha=mask.mask_from_alpha,
                       max_pixels=images.max_pixels, colour_fix=colour_fix,
                       refiner=refiner_engine(model, sampling, refiner), refiner_at=refiner_at,
                       control=ControlRun(control))
    discovery = find_inputs(inputs, recursive=images.recursive, pair_masks=not mask.mask_from_alpha,
                            masks_dir=mask.masks)
    finish(run_task(task, discovery, run))


def register(app: typer.Typer) -> None:
    app.command("inpaint", help=f"{inpaint.__doc__}\n\n{EXAMPLE}")(inpaint)
