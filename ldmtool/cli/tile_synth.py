"""`ldmtool tile-synth`: large canvases and seamless textures from any generator model."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated, Optional, Sequence

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import find_inputs, finish
from ldmtool.cli.sample import Classes
from ldmtool.cli.semantic2img import PaletteFile
from ldmtool.cli.shared import task_command
from ldmtool.options import ImageInputs, ModelChoice, SamplingChoice, Size, TextPrompt

if TYPE_CHECKING:
    from ldmtool.io.discover import Discovery, Item
    from ldmtool.runtime.jobs import RunOptions

EXAMPLE = 'Example: ldmtool tile-synth --prompt "mossy stone wall" --width 4096 --height 1024 --seamless x -o wall.png'

MapInputs = Annotated[
    Optional[list[str]],
    typer.Argument(help="Label maps (semantic models; stretched to the canvas). Leave out for class, text or "
                   "unconditional models.", show_default=False),
]
Samples = Annotated[int, typer.Option("--n", min=1, help="Canvases per class or prompt (or in all, unconditional).",
                                      rich_help_panel=opt.SAMPLING)]


DEFAULT_MODEL = "default-sample"
DEFAULT_BY_GENERATOR = {"semantic": "default-semantic2img", "text": "default-txt2img"}


@task_command(model=DEFAULT_MODEL, seamless=True)
def tile_synth(
    inputs: MapInputs = None,
    classes: Classes = None,
    *,
    text: TextPrompt,
    palette: PaletteFile = None,
    n: Samples = 1,
    size: Size,
    images: ImageInputs,
    run: "RunOptions", model: ModelChoice, sampling: SamplingChoice,
) -> None:
    """Large canvases (tile by tile) and tileable textures (--seamless x|y|xy) from any generator model."""
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.tile_synth import (
        canvas_size,
        check_generator_options,
        choose_generator,
        generated_canvas_items,
        tile_synth_task,
    )
    from ldmtool.runtime.runner import run_task

    prompt = text.prompt
    generator = choose_generator(maps=bool(inputs), classes=classes or [], prompt=prompt)
    check_generator_options(generator, samples=n, palette=palette, negative=text.negative)
    if model.model == DEFAULT_MODEL and generator.value in DEFAULT_BY_GENERATOR:
        # label maps need a semantic model and a prompt a text model: their own shipped defaults
        model = dataclasses.replace(model, model=DEFAULT_BY_GENERATOR[generator.value])
    canvas_w, canvas_h = canvas_size(size.width, size.height)
    task = tile_synth_task(Engine(model, sampling), generator, width=canvas_w, height=canvas_h,
                           classes=classes or [], prompt=prompt, negative=text.negative or "", palette=palette,
                           max_pixels=images.max_pixels)
    items: Discovery | Sequence[Item]
    if inputs:
        items = find_inputs(inputs, recursive=images.recursive)
    else:
        items = generated_canvas_items(generator, classes=classes or [], prompt=prompt, samples=n)
    finish(run_task(task, items, run))


def register(app: typer.Typer) -> None:
    app.command("tile-synth", help=f"{tile_synth.__doc__}\n\n{EXAMPLE}")(tile_synth)
