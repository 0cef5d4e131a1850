"""`ldmtool superres`: upscale images or folders with a latent super-resolution model."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import MaxPixels, find_inputs, finish, run_options
from ldmtool.cli.engine_options import model_choice, sampling_choice

EXAMPLE = "Example: ldmtool superres ./photos --scale 4 -o out/"


def superres(
    inputs: opt.Inputs,
    scale: Annotated[float, typer.Option("--scale", "-s", min=1.01, help="Upscale factor (any; the model's ×4 is chained, the rest resampled).")] = 4.0,
    noise_level: Annotated[Optional[int], typer.Option("--noise-level", min=0, help="SD x4 upscaler: noise added to the low-res image (default 20).")] = None,
    prompt: opt.Prompt = None,
    negative: opt.Negative = None,
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
    model: opt.Model = "default-superres",
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
    """Upscale images or folders of images."""
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.superres import SuperresTask
    from ldmtool.runtime.runner import run_task

    engine = Engine(model_choice(model, config, preset, no_ema, prediction, device, precision),
                    sampling_choice(sampler, steps, cfg, eta, karras, tile, tile_overlap, max_memory))
    task = SuperresTask(engine, scale=scale, prompt=prompt or "", negative=negative or "",
                        noise_level=noise_level, max_pixels=max_pixels)
    discovery = find_inputs(inputs, recursive=recursive)
    options = run_options(output=output, name=name, fmt=fmt, quality=quality, overwrite=overwrite,
                          fail_fast=fail_fast, batch_size=batch_size, seed=seed, json_out=json_out, quiet=quiet,
                          shard=shard, engine=run_engine, ray_address=ray_address)
    finish(run_task(task, discovery, options))


def register(app: typer.Typer) -> None:
    app.command("superres", help=f"{superres.__doc__}\n\n{EXAMPLE}")(superres)
