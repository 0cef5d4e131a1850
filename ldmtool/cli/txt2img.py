"""`ldmtool txt2img`: images from text prompts (LDM-BERT, SD 1.x, SD 2.x models)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import finish, run_options
from ldmtool.cli.engine_options import model_choice, sampling_choice

EXAMPLE = 'Example: ldmtool txt2img --prompt "a red fox in the snow" --n 4 --model sd-v1-5.safetensors -o out/'

PromptsFile = Annotated[
    Optional[Path],
    typer.Option("--prompts", help="Prompt file: one prompt per line, or JSON lines "
                 '({"prompt": ..., "negative", "seed", "steps", "cfg", "sampler", "width", "height"}).',
                 rich_help_panel=opt.SAMPLING),
]
Samples = Annotated[int, typer.Option("--n", min=1, help="Images per prompt.", rich_help_panel=opt.SAMPLING)]


def txt2img(
    prompt: opt.Prompt = None,
    prompts: PromptsFile = None,
    negative: opt.Negative = None,
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
    seamless: opt.Seamless = None,
) -> None:
    """Generate images from text prompts (sizes must be multiples of the model's 64 or 32 pixels)."""
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.text import read_prompts
    from ldmtool.pipelines.txt2img import Txt2ImgTask, prompt_items
    from ldmtool.runtime.runner import run_task

    specs = read_prompts(prompt, prompts)
    engine = Engine(model_choice(model, config, preset, no_ema, prediction, device, precision),
                    sampling_choice(sampler, steps, cfg, eta, karras, tile, tile_overlap, max_memory, seamless))
    task = Txt2ImgTask(engine, specs, negative=negative or "", width=width, height=height)
    options = run_options(output=output, name=name, fmt=fmt, quality=quality, overwrite=overwrite,
                          fail_fast=fail_fast, batch_size=batch_size, seed=seed, json_out=json_out, quiet=quiet)
    finish(run_task(task, prompt_items(specs, n), options))


def register(app: typer.Typer) -> None:
    app.command("txt2img", help=f"{txt2img.__doc__}\n\n{EXAMPLE}")(txt2img)
