"""`ldmtool preprocess KIND INPUTS -o hints/`: ControlNet hints from images, as a batch job with resume."""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import find_inputs, finish
from ldmtool.cli.shared import task_command
from ldmtool.options import ImageInputs

if TYPE_CHECKING:
    from ldmtool.runtime.jobs import RunOptions

EXAMPLE = "Example: ldmtool preprocess canny photos/ -o hints/ --low 80 --high 160"

Kind = Annotated[str, typer.Argument(help="Preprocessor: canny, tile, scribble (or threshold), shuffle.",
                                     show_default=False)]
Low = Annotated[int, typer.Option("--low", min=0, max=255, help="canny: lower threshold.")]
High = Annotated[int, typer.Option("--high", min=0, max=255, help="canny: upper threshold.")]
Threshold = Annotated[int, typer.Option("--threshold", min=0, max=255,
                                        help="scribble/threshold: grey level above which a pixel is white.")]
Down = Annotated[float, typer.Option("--down", min=1.0, help="tile: downsampling factor before resampling back.")]
Cells = Annotated[int, typer.Option("--cells", min=1, help="shuffle: size of the random displacement cells.")]


@task_command(model=None)
def preprocess(
    kind: Kind,
    inputs: opt.Inputs,
    *,
    low: Low = 100,
    high: High = 200,
    threshold: Threshold = 127,
    down: Down = 4.0,
    cells: Cells = 256,
    images: ImageInputs,
    run: "RunOptions",
) -> None:
    """Make ControlNet hint images (edges, tile, scribble, shuffle) from images or folders; no model needed."""
    from ldmtool.pipelines.preprocess import PreprocessSettings, PreprocessTask
    from ldmtool.runtime.runner import run_task

    settings = PreprocessSettings(low=low, high=high, threshold=threshold, down=down, cells=cells)
    task = PreprocessTask(kind, settings, max_pixels=images.max_pixels)
    finish(run_task(task, find_inputs(inputs, recursive=images.recursive), run))


def register(app: typer.Typer) -> None:
    app.command("preprocess", help=f"{preprocess.__doc__}\n\n{EXAMPLE}")(preprocess)
