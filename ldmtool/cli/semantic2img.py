"""`ldmtool semantic2img`: images from label maps (LDM semantic_synthesis256/512 and similar models)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import MaxPixels, find_inputs, finish, run_options
from ldmtool.cli.engine_options import model_choice, sampling_choice

EXAMPLE = "Example: ldmtool semantic2img maps/ --palette landscape.yaml --width 1024 --height 512 -o out/"

PaletteFile = Annotated[
    Optional[Path],
    typer.Option("--palette", help="YAML of class id → colour (\"#rrggbb\" or [r, g, b]) for colour label maps; "
                 "without it, pixel values are class ids.", rich_help_panel=opt.SAMPLING),
]


def semantic2img(
    inputs: opt.Inputs,
    palette: PaletteFile = None,
    width: opt.Width = None,
    height: opt.Height = None,
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
    model: opt.Model = "default-semantic2img",
    config: opt.Config = None,
    preset: opt.Preset = None,
    no_ema: opt.NoEma = False,
    prediction: opt.Prediction = None,
    device: opt.Device = "auto",
    precision: opt.Precision = "auto",
    steps: opt.Steps = None,
    sampler: opt.Sampler = None,
    eta: opt.Eta = None,
    karras: opt.Karras = None,
    tile: opt.Tile = None,
    tile_overlap: opt.TileOverlap = None,
    max_memory: opt.MaxMemory = None,
    seamless: opt.Seamless = None,
) -> None:
    """Generate images from label maps (index PNGs, or colour maps with --palette) at the map's size."""
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.semantic2img import Semantic2ImgTask
    from ldmtool.runtime.runner import run_task

    engine = Engine(model_choice(model, config, preset, no_ema, prediction, device, precision),
                    sampling_choice(sampler, steps, None, eta, karras, tile, tile_overlap, max_memory, seamless))
    task = Semantic2ImgTask(engine, palette=palette, width=width, height=height, max_pixels=max_pixels)
    discovery = find_inputs(inputs, recursive=recursive)
    options = run_options(output=output, name=name, fmt=fmt, quality=quality, overwrite=overwrite,
                          fail_fast=fail_fast, batch_size=batch_size, seed=seed, json_out=json_out, quiet=quiet,
                          shard=shard, engine=run_engine, ray_address=ray_address)
    finish(run_task(task, discovery, options))


def register(app: typer.Typer) -> None:
    app.command("semantic2img", help=f"{semantic2img.__doc__}\n\n{EXAMPLE}")(semantic2img)
