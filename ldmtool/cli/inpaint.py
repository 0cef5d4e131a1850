"""`ldmtool inpaint`: repaint the white part of each image's mask."""
from __future__ import annotations

from typing import Annotated

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import InvertMask, MaskFromAlpha, MasksDir, MaxPixels, find_inputs, finish, run_options
from ldmtool.cli.engine_options import model_choice, sampling_choice

EXAMPLE = "Example: ldmtool inpaint photo.png photo_mask.png -o fixed.png   (folders: x.png pairs with x_mask.png)"

Grow = Annotated[int, typer.Option("--grow", min=0, help="Dilate the mask by N pixels first.",
                                   rich_help_panel=opt.SAMPLING)]
Feather = Annotated[int, typer.Option("--feather", min=0, help="Blend band in pixels at the mask edge; outside "
                                      "it the input is kept exactly (0 = hard edge).", rich_help_panel=opt.SAMPLING)]


def inpaint(
    inputs: opt.Inputs,
    prompt: opt.Prompt = None,
    negative: opt.Negative = None,
    masks: MasksDir = None,
    invert_mask: InvertMask = False,
    mask_from_alpha: MaskFromAlpha = False,
    grow: Grow = 0,
    feather: Feather = 4,
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
    model: opt.Model = "default-inpaint",
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
    """Inpaint images: white mask pixels are repainted, black ones kept exactly."""
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.inpaint import InpaintTask
    from ldmtool.runtime.runner import run_task

    engine = Engine(model_choice(model, config, preset, no_ema, prediction, device, precision),
                    sampling_choice(sampler, steps, cfg, eta, karras, tile, tile_overlap, max_memory))
    task = InpaintTask(engine, prompt=prompt or "", negative=negative or "", grow=grow, feather=feather,
                       invert_mask=invert_mask, from_alpha=mask_from_alpha, max_pixels=max_pixels)
    discovery = find_inputs(inputs, recursive=recursive, pair_masks=not mask_from_alpha, masks_dir=masks)
    options = run_options(output=output, name=name, fmt=fmt, quality=quality, overwrite=overwrite,
                          fail_fast=fail_fast, batch_size=batch_size, seed=seed, json_out=json_out, quiet=quiet)
    finish(run_task(task, discovery, options))


def register(app: typer.Typer) -> None:
    app.command("inpaint", help=f"{inpaint.__doc__}\n\n{EXAMPLE}")(inpaint)
