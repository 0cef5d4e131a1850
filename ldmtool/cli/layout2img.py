"""`ldmtool layout2img`: images from box layouts (LDM layout2img-openimages256)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import finish
from ldmtool.cli.shared import task_command
from ldmtool.options import ModelChoice, SamplingChoice, Size

if TYPE_CHECKING:
    from ldmtool.runtime.jobs import RunOptions

EXAMPLE = "Example: ldmtool layout2img scene.json layouts/ --draw-boxes -o out/"

LayoutInputs = Annotated[
    list[str],
    typer.Argument(help="Layout files (.json/.yaml: objects with an OpenImages label and a box in pixels or 0..1)"
                   ", folders of them, globs, @list.txt or '-' (a list on stdin).", show_default=False),
]
DrawBoxes = Annotated[bool, typer.Option("--draw-boxes", help="Also write <name>.boxes.png with the boxes drawn.",
                                         rich_help_panel=opt.OUTPUT)]
Samples = Annotated[int, typer.Option("--n", min=1, help="Images per layout.", rich_help_panel=opt.SAMPLING)]


@task_command(model="default-layout2img")
def layout2img(
    inputs: LayoutInputs,
    draw_boxes: DrawBoxes = False,
    n: Samples = 1,
    recursive: opt.Recursive = False,
    *,
    size: Size,
    run: "RunOptions", model: ModelChoice, sampling: SamplingChoice,
) -> None:
    """Generate images from layouts of labelled boxes (OpenImages classes)."""
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.layout2img import Layout2ImgTask, find_layouts
    from ldmtool.runtime.runner import run_task

    task = Layout2ImgTask(Engine(model, sampling), width=size.width, height=size.height, draw_boxes=draw_boxes)
    finish(run_task(task, find_layouts(inputs, recursive=recursive, samples=n), run))


def register(app: typer.Typer) -> None:
    app.command("layout2img", help=f"{layout2img.__doc__}\n\n{EXAMPLE}")(layout2img)
