"""`ldmtool img2img`: rework images or folders of images towards a prompt (SDEdit)."""
from __future__ import annotations

from typing import Annotated

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import MaxPixels, find_inputs, finish, run_options
from ldmtool.cli.engine_options import model_choice, sampling_choice

EXAMPLE = 'Example: ldmtool img2img ./photos --prompt "an oil painting" --strength 0.6 -o out/'

Strength = Annotated[
    float,
    typer.Option("--strength", min=0.0, max=1.0,
                 help="How much to change: 0 keeps the image, 1 repaints it fully (the last strength×steps run).",
                 rich_help_panel=opt.SAMPLING),
]


def img2img(
    inputs: opt.Inputs,
    prompt: opt.Prompt = None,
    negative: opt.Negative = None,
    strength: Strength = 0.75,
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
    max_pixels: MaxPixels = None,
    model: opt.Model = "default-txt2img",
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
    """Transform images or folders of images towards a prompt (text or unconditional models)."""
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.img2img import Img2ImgTask
    from ldmtool.runtime.runner import run_task

    engine = Engine(model_choice(model, config, preset, no_ema, prediction, device, precision),
                    sampling_choice(sampler, steps, cfg, eta, karras, tile, tile_overlap, max_memory))
    task = Img2ImgTask(engine, prompt=prompt or "", negative=negative or "", strength=strength,
                       max_pixels=max_pixels)
    discovery = find_inputs(inputs, recursive=recursive)
    options = run_options(output=output, name=name, fmt=fmt, quality=quality, overwrite=overwrite,
                          fail_fast=fail_fast, batch_size=batch_size, seed=seed, json_out=json_out, quiet=quiet)
    finish(run_task(task, discovery, options))


def register(app: typer.Typer) -> None:
    app.command("img2img", help=f"{img2img.__doc__}\n\n{EXAMPLE}")(img2img)
