"""`ldmtool txt2img`: images from text prompts (LDM-BERT, SD 1.x, SD 2.x models)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import finish
from ldmtool.cli.shared import task_command
from ldmtool.options import ControlInputs, ModelChoice, PromptTemplate, SamplingChoice, Size, TextPrompt

if TYPE_CHECKING:
    from ldmtool.pipelines.text import PromptSpec
    from ldmtool.runtime.jobs import RunOptions

EXAMPLE = 'Example: ldmtool txt2img --prompt "a {red|arctic} fox in the snow" --n 4 --model sd-v1-5.safetensors -o out/'

PromptsFile = Annotated[
    Optional[Path],
    typer.Option("--prompts", help="Prompt file: one prompt per line, or JSON lines "
                 '({"prompt": ..., "negative", "seed", "steps", "cfg", "sampler", "width", "height"}; a line\'s '
                 "seed is its first image's, later --n samples count up from it).",
                 rich_help_panel=opt.SAMPLING),
]
Samples = Annotated[int, typer.Option("--n", min=1, help="Images per prompt.", rich_help_panel=opt.SAMPLING)]
Hires = Annotated[
    Optional[float],
    typer.Option("--hires", min=1.0, help="Hires fix: upscale each image by this factor by diffusion (as img2img "
                 "--scale, with the item's prompt and seed).", rich_help_panel=opt.SAMPLING),
]
HiresStrength = Annotated[
    Optional[float],
    typer.Option("--hires-strength", min=0.0, max=1.0, help="With --hires: img2img strength of the upscale "
                 "(default 0.5).",
                 rich_help_panel=opt.SAMPLING),
]
HiresColourFix = Annotated[
    Optional[bool],
    typer.Option("--hires-colour-fix/--no-hires-colour-fix",
                 help="With --hires: keep the colour and brightness of the first image (as img2img --colour-fix; "
                      "default: on).",
                 rich_help_panel=opt.SAMPLING),
]


@task_command(model="default-txt2img", seamless=True)
def txt2img(
    *,
    text: TextPrompt,
    templates: PromptTemplate,
    prompts: PromptsFile = None,
    n: Samples = 1,
    refiner: opt.Refiner = None,
    refiner_at: opt.RefinerAt = None,
    hires: Hires = None,
    hires_strength: HiresStrength = None,  # None (not 0.5) keeps runs without --hires the same job as before
    hires_colour_fix: HiresColourFix = None,
    size: Size,
    control: ControlInputs,
    run: "RunOptions", model: ModelChoice, sampling: SamplingChoice,
) -> None:
    """Generate images from text prompts (sizes must be multiples of the model's 64 or 32 pixels)."""
    from ldmtool.pipelines.control import ControlRun
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.prompt_templates import needs_templates
    from ldmtool.pipelines.refiner import refiner_engine
    from ldmtool.pipelines.text import read_prompts
    from ldmtool.pipelines.txt2img import Txt2ImgTask, prompt_items
    from ldmtool.runtime.runner import run_task

    specs = read_prompts(text.prompt, prompts)
    if needs_templates(specs, text.negative, wildcards=templates.wildcards, combinatorial=templates.combinatorial):
        specs = expand_templates(specs, text.negative, templates, prompts)
    refining = refiner_engine(model, sampling, refiner)
    task = Txt2ImgTask(Engine(model, sampling), specs, negative=text.negative or "", width=size.width,
                       height=size.height, wildcards=templates.wildcards, refiner=refining, refiner_at=refiner_at,
                       hires=hires, hires_strength=hires_strength, hires_colour_fix=hires_colour_fix,
                       control=ControlRun(control))
    finish(run_task(task, prompt_items(specs, n, same_seed=templates.same_seed), run))


def expand_templates(specs: "list[PromptSpec]", negative: Optional[str], choice: PromptTemplate,
                     prompts_file: Optional[Path] = None) -> "list[PromptSpec]":
    """The prompt lines of a run with templates: checked (a missing wildcard is a usage error), and with
    --combinatorial one line per combination; random mode expands each item as it loads."""
    from ldmtool.errors import UsageError
    from ldmtool.pipelines.prompt_templates import PromptTemplates, check_templates, combinatorial

    if choice.max_prompts is not None and not choice.combinatorial:
        raise UsageError("--max-prompts needs --combinatorial")
    templates = PromptTemplates(choice.wildcards)
    check_templates(specs, negative, templates, prompts_file)
    return combinatorial(specs, templates, choice.max_prompts) if choice.combinatorial else specs


def register(app: typer.Typer) -> None:
    app.command("txt2img", help=f"{txt2img.__doc__}\n\n{EXAMPLE}")(txt2img)
