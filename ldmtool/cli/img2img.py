"""`ldmtool img2img`: rework images or folders of images towards a prompt (SDEdit)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import find_inputs, finish
from ldmtool.cli.shared import task_command
from ldmtool.options import ControlInputs, ImageInputs, ModelChoice, SamplingChoice, TextPrompt

if TYPE_CHECKING:
    from ldmtool.runtime.jobs import RunOptions

EXAMPLE = ('Example: ldmtool img2img ./photos --prompt "an oil painting" --strength 0.6 -o out/\n\n'
           'Upscale by diffusion: ldmtool img2img ./photos --scale 2 --strength 0.3 -o big/')

Strength = Annotated[
    float,
    typer.Option("--strength", min=0.0, max=1.0,
                 help="How much to change: 0 keeps the image, 1 repaints it fully (the last strength×steps run).",
                 rich_help_panel=opt.SAMPLING),
]

Scale = Annotated[
    Optional[float],
    typer.Option("--scale", "-s", min=1.0,
                 help="Upscale by diffusion: resize by this factor (Lanczos), then rework at --strength in tiles, "
                      "in memory bounded by the tile (e.g. --scale 2 --strength 0.3).",
                 rich_help_panel=opt.SAMPLING),
]
UpscaleColourFix = Annotated[
    Optional[bool],
    typer.Option("--colour-fix/--no-colour-fix",
                 help="With --scale: keep the colour and brightness of the resized input, so the model adds only "
                      "detail (default: on).",
                 rich_help_panel=opt.SAMPLING),
]


@task_command(model="default-txt2img")
def img2img(
    inputs: opt.Inputs,
    *,
    text: TextPrompt,
    strength: Strength = 0.75,
    scale: Scale = None,
    colour_fix: UpscaleColourFix = None,
    refiner: opt.Refiner = None,
    refiner_at: opt.RefinerAt = None,
    images: ImageInputs,
    control: ControlInputs,
    run: "RunOptions", model: ModelChoice, sampling: SamplingChoice,
) -> None:
    """Transform images or folders of images towards a prompt (text or unconditional models)."""
    from ldmtool.pipelines.control import ControlRun
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.img2img import Img2ImgTask
    from ldmtool.pipelines.refiner import refiner_engine
    from ldmtool.runtime.runner import run_task

    task = Img2ImgTask(Engine(model, sampling), prompt=text.prompt, negative=text.negative,
                       strength=strength, max_pixels=images.max_pixels, scale=scale, colour_fix=colour_fix,
                       refiner=refiner_engine(model, sampling, refiner), refiner_at=refiner_at,
                       control=ControlRun(control))
    finish(run_task(task, find_inputs(inputs, recursive=images.recursive), run))


def register(app: typer.Typer) -> None:
    app.command("img2img", help=f"{img2img.__doc__}\n\n{EXAMPLE}")(img2img)
