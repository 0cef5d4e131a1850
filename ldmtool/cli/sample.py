"""`ldmtool sample`: images from class-conditional (cin256) or unconditional (CelebA-HQ, FFHQ, LSUN) models."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import finish, run_options
from ldmtool.cli.engine_options import model_choice, sampling_choice

EXAMPLE = 'Example: ldmtool sample --class "golden retriever" --class 88 --n 4 --model cin256-v2.ckpt -o out/'

Classes = Annotated[
    Optional[list[str]],
    typer.Option("--class", "-c", help="Class id or ImageNet name (repeatable); class-conditional models only.",
                 rich_help_panel=opt.SAMPLING),
]
Samples = Annotated[int, typer.Option("--n", min=1, help="Images per class (or in all, unconditional).",
                                      rich_help_panel=opt.SAMPLING)]


def sample(
    classes: Classes = None,
    n: Samples = 1,
    width: opt.Width = None,
    height: opt.Height = None,
    output: opt.Output = None,
    name: opt.NameTemplate = "{stem}.{ext}",
    fmt: opt.Format = None,
    quality: opt.Quality = 95,
    overwrite: opt.Overwrite = False,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
    fail_fast: opt.FailFast = False,
    batch_size: opt.BatchSize = 1,
    seed: opt.Seed = None,
    shard: opt.Shard = None,
    run_engine: opt.Engine = "local",
    ray_address: opt.RayAddress = None,
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
    seamless: opt.Seamless = None,
) -> None:
    """Sample images from a class-conditional or unconditional model."""
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.sample import SampleTask, sample_items
    from ldmtool.runtime.runner import run_task

    engine = Engine(model_choice(model, config, preset, no_ema, prediction, device, precision),
                    sampling_choice(sampler, steps, cfg, eta, karras, tile, tile_overlap, max_memory, seamless))
    task = SampleTask(engine, classes=classes or [], width=width, height=height)
    options = run_options(output=output, name=name, fmt=fmt, quality=quality, overwrite=overwrite,
                          fail_fast=fail_fast, batch_size=batch_size, seed=seed, json_out=json_out, quiet=quiet,
                          shard=shard, engine=run_engine, ray_address=ray_address)
    finish(run_task(task, sample_items(classes or [], n), options))


def register(app: typer.Typer) -> None:
    app.command("sample", help=f"{sample.__doc__}\n\n{EXAMPLE}")(sample)
