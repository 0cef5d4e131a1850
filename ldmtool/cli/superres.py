"""`ldmtool superres`: upscale images or folders with a latent super-resolution model."""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import find_inputs, finish
from ldmtool.cli.shared import task_command
from ldmtool.options import ImageInputs, ModelChoice, SamplingChoice, TextPrompt

if TYPE_CHECKING:
    from ldmtool.runtime.jobs import RunOptions

EXAMPLE = "Example: ldmtool superres ./photos --scale 4 -o out/"

Scale = Annotated[
    float,
    typer.Option("--scale", "-s", min=1.01, help="Upscale factor (any; the model's ×4 is chained, the rest resampled).",
                 rich_help_panel=opt.SAMPLING),
]
NoiseLevel = Annotated[
    Optional[int],
    typer.Option("--noise-level", min=0, help="SD x4 upscaler: noise added to the low-res image (default 20).",
                 rich_help_panel=opt.SAMPLING),
]

Consistency = Annotated[
    Optional[bool],
    typer.Option("--consistency/--no-consistency",
                 help="Back-project the output until area-downscaling it gives the input again: the model adds only "
                      "what the input cannot know. For clean downscaled images; off for noisy or JPEG inputs, whose "
                      "artefacts it would restore (default: the model config's ldmtool.consistency, else off).",
                 rich_help_panel=opt.SAMPLING),
]


@task_command(model="default-superres")
def superres(
    inputs: opt.Inputs,
    scale: Scale = 4.0,
    noise_level: NoiseLevel = None,
    colour_fix: opt.ColourFix = None,
    consistency: Consistency = None,
    *,
    text: TextPrompt,
    images: ImageInputs,
    run: "RunOptions", model: ModelChoice, sampling: SamplingChoice,
) -> None:
    """Upscale images or folders of images."""
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.superres import SuperresTask
    from ldmtool.runtime.runner import run_task

    task = SuperresTask(Engine(model, sampling), scale=scale, prompt=text.prompt or "", negative=text.negative or "",
                        noise_level=noise_level, max_pixels=images.max_pixels, colour_fix=colour_fix,
                        consistency=consistency)
    finish(run_task(task, find_inputs(inputs, recursive=images.recursive), run))


def register(app: typer.Typer) -> None:
    app.command("superres", help=f"{superres.__doc__}\n\n{EXAMPLE}")(superres)
