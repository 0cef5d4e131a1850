"""`ldmtool txt2img`: images from text prompts (LDM-BERT, SD 1.x, SD 2.x models)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import finish
from ldmtool.cli.shared import task_command
from ldmtool.options import ModelChoice, SamplingChoice, Size, TextPrompt

if TYPE_CHECKING:
    from ldmtool.runtime.jobs import RunOptions

EXAMPLE = 'Example: ldmtool txt2img --prompt "a red fox in the snow" --n 4 --model sd-v1-5.safetensors -o out/'

PromptsFile = Annotated[
    Optional[Path],
    typer.Option("--prompts", help="Prompt file: one prompt per line, or JSON lines "
                 '({"prompt": ..., "negative", "seed", "steps", "cfg", "sampler", "width", "height"}; a line\'s '
                 "seed is its first image's, later --n samples count up from it).",
                 rich_help_panel=opt.SAMPLING),
]
Samples = Annotated[int, typer.Option("--n", min=1, help="Images per prompt.", rich_help_panel=opt.SAMPLING)]


@task_command(model="default-txt2img", seamless=True)
def txt2img(
    *,
    text: TextPrompt,
    prompts: PromptsFile = None,
    n: Samples = 1,
    size: Size,
    run: "RunOptions", model: ModelChoice, sampling: SamplingChoice,
) -> None:
    """Generate images from text prompts (sizes must be multiples of the model's 64 or 32 pixels)."""
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.text import read_prompts
    from ldmtool.pipelines.txt2img import Txt2ImgTask, prompt_items
    from ldmtool.runtime.runner import run_task

    specs = read_prompts(text.prompt, prompts)
    task = Txt2ImgTask(Engine(model, sampling), specs, negative=text.negative or "", width=size.width,
                       height=size.height)
    finish(run_task(task, prompt_items(specs, n), run))


def register(app: typer.Typer) -> None:
    app.command("txt2img", help=f"{txt2img.__doc__}\n\n{EXAMPLE}")(txt2img)
