"""`ldmtool tile-synth`: large canvases and seamless textures from any generator model."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import MaxPixels, find_inputs, finish, run_options
from ldmtool.cli.engine_options import model_choice, sampling_choice
from ldmtool.cli.sample import Classes
from ldmtool.cli.semantic2img import PaletteFile

EXAMPLE = 'Example: ldmtool tile-synth --prompt "mossy stone wall" --width 4096 --height 1024 --seamless x -o wall.png'

MapInputs = Annotated[
    Optional[list[str]],
    typer.Argument(help="Label maps (semantic models; stretched to the canvas). Leave out for class, text or "
                   "unconditional models.", show_default=False),
]
Samples = Annotated[int, typer.Option("--n", min=1, help="Canvases per class, prompt or map.",
                                      rich_help_panel=opt.SAMPLING)]


def tile_synth(
    inputs: MapInputs = None,
    classes: Classes = None,
    prompt: opt.Prompt = None,
    negative: opt.Negative = None,
    palette: PaletteFile = None,
    n: Samples = 1,
    width: opt.Width = None,
    height: opt.Height = None,
    seamless: opt.Seamless = None,
    output: opt.Output = None,
    name: opt.NameTemplate = "{stem}.{ext}",
    fmt: opt.Format = None,
    quality: opt.Quality = 95,
    overwrite: opt.Overwrite = False,
    recursive: opt.Recursive = False,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
    fail_fast: opt.FailFast = False,
    batch_size: opt.BatchSize = 1,
    seed: opt.Seed = None,
    shard: opt.Shard = None,
    run_engine: opt.Engine = "local",
    ray_address: opt.RayAddress = None,
    max_pixels: MaxPixels = None,
    model: opt.Model = "default-sample",
    config: opt.Config = None,
    preset: opt.Preset = None,
    no_ema: opt.NoEma = False,
    prediction: opt.Prediction = None,
    device: opt.Device = "auto",
    precision: opt.Precision = "auto",
    steps: opt.Steps = None,
    sampler: opt.Sampler = None,
    cfg: opt.Cfg = None,
    eta: opt.Eta = None,
    karras: opt.Karras = None,
    tile: opt.Tile = None,
    tile_overlap: opt.TileOverlap = None,
    max_memory: opt.MaxMemory = None,
) -> None:
    """Large canvases (tile by tile) and tileable textures (--seamless x|y|xy) from any generator model."""
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.tile_synth import canvas_size, choose_generator, generated_canvas_items, tile_synth_task
    from ldmtool.runtime.runner import run_task

    generator = choose_generator(maps=bool(inputs), classes=classes or [], prompt=prompt)
    canvas_w, canvas_h = canvas_size(width, height)
    engine = Engine(model_choice(model, config, preset, no_ema, prediction, device, precision),
                    sampling_choice(sampler, steps, cfg, eta, karras, tile, tile_overlap, max_memory, seamless))
    task = tile_synth_task(engine, generator, width=canvas_w, height=canvas_h, classes=classes or [], prompt=prompt,
                           negative=negative or "", palette=palette, max_pixels=max_pixels)
    if inputs:
        items = find_inputs(inputs, recursive=recursive)
    else:
        items = generated_canvas_items(generator, classes=classes or [], prompt=prompt, samples=n)
    options = run_options(output=output, name=name, fmt=fmt, quality=quality, overwrite=overwrite,
                          fail_fast=fail_fast, batch_size=batch_size, seed=seed, json_out=json_out, quiet=quiet,
                          shard=shard, engine=run_engine, ray_address=ray_address)
    finish(run_task(task, items, options))


def register(app: typer.Typer) -> None:
    app.command("tile-synth", help=f"{tile_synth.__doc__}\n\n{EXAMPLE}")(tile_synth)
