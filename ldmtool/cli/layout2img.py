"""`ldmtool layout2img`: images from box layouts (LDM layout2img-openimages256)."""
from __future__ import annotations

from typing import Annotated

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import finish, run_options
from ldmtool.cli.engine_options import model_choice, sampling_choice

EXAMPLE = "Example: ldmtool layout2img scene.json layouts/ --draw-boxes -o out/"

LayoutInputs = Annotated[
    list[str],
    typer.Argument(help="Layout files (.json/.yaml: objects with an OpenImages label and a box in pixels or 0..1) "
                   "or folders of them.", show_default=False),
]
DrawBoxes = Annotated[bool, typer.Option("--draw-boxes", help="Also write <name>.boxes.png with the boxes drawn.",
                                         rich_help_panel=opt.OUTPUT)]
Samples = Annotated[int, typer.Option("--n", min=1, help="Images per layout.", rich_help_panel=opt.SAMPLING)]


def layout2img(
    inputs: LayoutInputs,
    draw_boxes: DrawBoxes = False,
    n: Samples = 1,
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
    model: opt.Model = "default-layout2img",
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
) -> None:
    """Generate images from layouts of labelled boxes (OpenImages classes)."""
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.layout2img import Layout2ImgTask, find_layouts
    from ldmtool.runtime.runner import run_task

    engine = Engine(model_choice(model, config, preset, no_ema, prediction, device, precision),
                    sampling_choice(sampler, steps, None, eta, karras, tile, tile_overlap, max_memory))
    task = Layout2ImgTask(engine, width=width, height=height, draw_boxes=draw_boxes)
    options = run_options(output=output, name=name, fmt=fmt, quality=quality, overwrite=overwrite,
                          fail_fast=fail_fast, batch_size=batch_size, seed=seed, json_out=json_out, quiet=quiet,
                          shard=shard, engine=run_engine, ray_address=ray_address)
    finish(run_task(task, find_layouts(inputs, recursive=recursive, samples=n), options))


def register(app: typer.Typer) -> None:
    app.command("layout2img", help=f"{layout2img.__doc__}\n\n{EXAMPLE}")(layout2img)
