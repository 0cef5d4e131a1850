"""Options shared by every command (DESIGN.md §6), declared once as `Annotated` aliases.

A command lists the aliases it accepts in its signature; names, defaults and help texts therefore stay
identical across commands, which is what scripts rely on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldmtool.diffusion.names import SAMPLER_NAMES

RUN = "Run"
SAMPLING = "Sampling"
MODEL = "Model"
OUTPUT = "Output"
TILING = "Tiling"

Inputs = Annotated[
    list[str],
    typer.Argument(
        help="Image files, folders, globs, @list.txt files, or '-' to read paths from stdin.",
        show_default=False,
    ),
]
Output = Annotated[
    Optional[Path],
    typer.Option("--output", "-o", help="Output file (one input) or folder.", rich_help_panel=OUTPUT),
]
NameTemplate = Annotated[
    str,
    typer.Option(
        "--name",
        help="Output name template: {stem} {index} {seed} {ext}.",
        rich_help_panel=OUTPUT,
    ),
]
Format = Annotated[
    Optional[str],
    typer.Option("--format", help="Output format png|jpg|webp (default: png, or the -o file's extension).", rich_help_panel=OUTPUT),
]
Quality = Annotated[
    int, typer.Option("--quality", min=1, max=100, help="JPEG/WebP quality.", rich_help_panel=OUTPUT)
]
Overwrite = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace existing outputs (same as --existing overwrite).", rich_help_panel=OUTPUT),
]
Existing = Annotated[
    Optional[str],
    typer.Option("--existing", help="An output that exists already: check (skip it if its recipe says this job "
                 "wrote it, else fail the item; the default), skip (keep it whatever wrote it), overwrite.",
                 rich_help_panel=OUTPUT, show_default=False),
]
Recursive = Annotated[
    bool, typer.Option("--recursive", "-r", help="Descend into subfolders of input folders.", rich_help_panel=RUN)
]
Json = Annotated[
    bool, typer.Option("--json", help="Write one JSON event per item to stdout.", rich_help_panel=RUN)
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.", rich_help_panel=RUN)]
FailFast = Annotated[
    bool, typer.Option("--fail-fast", help="Stop at the first failed item.", rich_help_panel=RUN)
]
BatchSize = Annotated[
    int,
    typer.Option("--batch-size", min=1, help="Items run together (never changes results).", rich_help_panel=RUN),
]
Shard = Annotated[
    Optional[str],
    typer.Option("--shard", help="Run only shard K of N (K/N, e.g. 3/8) of the items, for job arrays; needs --seed.",
                 rich_help_panel=RUN),
]
Engine = Annotated[
    str, typer.Option("--engine", help="local, or ray: spread the items over a Ray cluster (pip install 'ldmtool\\[ray]').",
                      rich_help_panel=RUN),
]
RayAddress = Annotated[
    Optional[str], typer.Option("--ray-address", help="With --engine ray: join this cluster (default: start a local one).",
                                rich_help_panel=RUN),
]
Seed = Annotated[
    Optional[int],
    typer.Option("--seed", min=-1, max=2**32 - 1, help="The run's seed: prompts and --n samples use N, N+1, ...; "
                 "files a seed derived from N and their path. -1 or absent: the seed of the same job's earlier run "
                 "into this output, else random. Always recorded.", rich_help_panel=SAMPLING),
]
ItemSeed = Annotated[
    Optional[int],
    typer.Option("--item-seed", min=0, max=2**32 - 1, help="Run every item with exactly this seed (the 'Seed:' an "
                 "output records), e.g. to redo one file by hand.", rich_help_panel=SAMPLING),
]
Steps = Annotated[
    Optional[int], typer.Option("--steps", min=1, help="Sampling steps (default: the model's).", rich_help_panel=SAMPLING)
]
Sampler = Annotated[
    Optional[str],
    typer.Option(
        "--sampler", help=f"{'|'.join(SAMPLER_NAMES)} (default: the model's).", rich_help_panel=SAMPLING
    ),
]
Karras = Annotated[
    Optional[bool], typer.Option("--karras/--no-karras", help="Karras sigma spacing (k-diffusion samplers).", rich_help_panel=SAMPLING)
]
Eta = Annotated[Optional[float], typer.Option("--eta", min=0.0, help="DDIM eta (0 = deterministic).", rich_help_panel=SAMPLING)]
Temperature = Annotated[
    Optional[float],
    typer.Option("--temperature", min=0.0, help="Scale of the starting noise: below 1 trades invented detail for fidelity "
                 "(1 = the model's distribution; default: the model's, else 1).", rich_help_panel=SAMPLING),
]
Cfg = Annotated[
    Optional[float], typer.Option("--cfg", help="Classifier-free guidance scale (1 = off; default: the model's).", rich_help_panel=SAMPLING)
]
Prompt = Annotated[Optional[str], typer.Option("--prompt", "-p", help="Text prompt.", rich_help_panel=SAMPLING)]
Negative = Annotated[
    Optional[str], typer.Option("--negative", help="Negative prompt.", rich_help_panel=SAMPLING)
]
Model = Annotated[
    str,
    typer.Option("--model", "-m", help="Checkpoint file, or a preset/default model name (see `ldmtool models list`).", rich_help_panel=MODEL),
]
Config = Annotated[
    Optional[Path],
    typer.Option("--config", help="CompVis-format YAML config for the checkpoint.", rich_help_panel=MODEL),
]
Preset = Annotated[
    Optional[str], typer.Option("--preset", help="Architecture preset name (instead of --config).", rich_help_panel=MODEL)
]
NoEma = Annotated[
    bool, typer.Option("--no-ema", help="Use the raw weights even when EMA weights are present.", rich_help_panel=MODEL)
]
Prediction = Annotated[
    Optional[str], typer.Option("--prediction", help="Override the model's parameterization: eps|v.", rich_help_panel=MODEL)
]
Device = Annotated[
    str, typer.Option("--device", help="auto|cpu|cuda|cuda:N|mps.", rich_help_panel=MODEL)
]
Precision = Annotated[
    str, typer.Option("--precision", help="auto|fp32|fp16|bf16 (auto: fp32 on CPU, fp16 on GPU).", rich_help_panel=MODEL)
]
Tile = Annotated[
    Optional[int],
    typer.Option("--tile", min=0, help="Tile size in latent pixels (0 = no tiling; default: automatic).", rich_help_panel=TILING),
]
TileOverlap = Annotated[
    Optional[int], typer.Option("--tile-overlap", min=0, help="Tile overlap in latent pixels.", rich_help_panel=TILING)
]
MaxMemory = Annotated[
    Optional[str], typer.Option("--max-memory", help="Memory budget for tiling, e.g. 4GB (default: from the device).", rich_help_panel=TILING)
]
Seamless = Annotated[
    Optional[str], typer.Option("--seamless", help="Wrap-around output along x, y or xy (tileable textures).", rich_help_panel=TILING)
]
Width = Annotated[Optional[int], typer.Option("--width", "-W", min=8, help="Output width in pixels.", rich_help_panel=SAMPLING)]
Height = Annotated[Optional[int], typer.Option("--height", "-H", min=8, help="Output height in pixels.", rich_help_panel=SAMPLING)]

ColourFix = Annotated[
    Optional[bool],
    typer.Option("--colour-fix/--no-colour-fix",
                 help="Take the low frequencies (colour, brightness) from a classical estimate and only the detail "
                      "from the model: superres a bicubic upscale of the input, inpaint an OpenCV Telea fill of the "
                      "hole (default: the model config's ldmtool.colour_fix, else off).",
                 rich_help_panel=SAMPLING),
]
