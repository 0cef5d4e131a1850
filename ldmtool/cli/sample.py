"""`ldmtool sample`: images from class-conditional (cin256) or unconditional (CelebA-HQ, FFHQ, LSUN) models."""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import finish
from ldmtool.cli.shared import task_command
from ldmtool.options import ModelChoice, SamplingChoice, Size

if TYPE_CHECKING:
    from ldmtool.runtime.jobs import RunOptions

EXAMPLE = 'Example: ldmtool sample --class "golden retriever" --class 88 --n 4 --model cin256-v2.ckpt -o out/'

Classes = Annotated[
    Optional[list[str]],
    typer.Option("--class", "-c", help="Class id or ImageNet name (repeatable); class-conditional models only.",
                 rich_help_panel=opt.SAMPLING),
]
Samples = Annotated[int, typer.Option("--n", min=1, help="Images per class (or in all, unconditional).",
                                      rich_help_panel=opt.SAMPLING)]


@task_command(model="default-sample", seamless=True)
def sample(
    classes: Classes = None,
    n: Samples = 1,
    *,
    size: Size,
    run: "RunOptions", model: ModelChoice, sampling: SamplingChoice,
) -> None:
    """Sample images from a class-conditional or unconditional model."""
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.sample import SampleTask, sample_items
    from ldmtool.runtime.runner import run_task

    task = SampleTask(Engine(model, sampling), classes=classes or [], width=size.width, height=size.height)
    finish(run_task(task, sample_items(classes or [], n), run))


def register(app: typer.Typer) -> None:
    app.command("sample", help=f"{sample.__doc__}\n\n{EXAMPLE}")(sample)
