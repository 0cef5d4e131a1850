"""Every option group the task commands share, declared once (DESIGN.md §6 names).

A group is a frozen dataclass. A field that is a command-line option says so with `option(...)`: its flags,
help text and help panel travel in the field's metadata, from which `ldmtool.cli.shared` generates the
command's Typer parameters and builds the record the command receives. So a new option is a new field
here, plus the code that reads it (docs/ARCHITECTURE.md, "Adding an option").

Every task command gets `RunChoice` (turned into `ldmtool.runtime.jobs.RunOptions`); those with a model
also `ModelChoice` and `SamplingChoice`, which pipelines read. The other groups are opt-in: a command takes
one by naming it as a keyword-only parameter. Nothing here imports torch or typer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ldmtool.diffusion.names import SAMPLER_NAMES, SPACING_NAMES

# Help panels, and the one order every command's --help shows them in (`ldmtool.cli.help`).
INPUTS = "Inputs"
OUTPUT = "Output"
MODEL = "Model"
SAMPLING = "Sampling"
TILING = "Tiling & memory"
TRAINING = "Training"
RUN = "Run"
PANEL_ORDER = (INPUTS, OUTPUT, MODEL, SAMPLING, TILING, TRAINING, RUN)


def option(*flags: str, help: str, panel: str, default: Any = None, **typer_settings: Any) -> Any:
    """A dataclass field that is a command-line option. `flags` as Typer takes them ("--steps",
    "--karras/--no-karras", "--output", "-o"); `typer_settings` are passed on as they are (min, max,
    show_default, metavar). Help texts are plain text (no markup); list an option's choices in its help."""
    return dataclasses.field(default=default, metadata={"flags": flags, "help": help, "panel": panel,
                                                        "settings": typer_settings})


def option_fields(group: type) -> list[dataclasses.Field[Any]]:
    """The fields of a group that are command-line options, in declaration (and help) order."""
    return [f for f in dataclasses.fields(group) if "flags" in f.metadata]


def is_option_group(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation) and bool(option_fields(annotation))


def same_option(group: type, name: str) -> Any:
    """A field that is `group`'s option `name` again (same flags, help and default), for another group."""
    (original,) = [f for f in option_fields(group) if f.name == name]
    meta = original.metadata
    return option(*meta["flags"], help=meta["help"], panel=meta["panel"], default=original.default,
                  **meta["settings"])


@dataclass(frozen=True)
class RunChoice:
    """Where outputs go and how the run goes; the CLI's side of `RunOptions` (`ldmtool.cli.common`)."""

    output: Optional[Path] = option("--output", "-o", help="Output file (one input) or folder.", panel=OUTPUT,
                                    show_default="out/")
    name: str = option("--name", help="Output name template: {stem} {suffix} {index} (position; renumbers when "
                       "inputs are added) {seed} {ext}.", panel=OUTPUT, metavar="TEMPLATE",
                       default="{stem}.{ext}")
    suffix: Optional[str] = option("--suffix", help="Add _TEXT to each output's name: photo.png -> photo_TEXT.png "
                                   "(in the template: {suffix}).", panel=OUTPUT)
    fmt: Optional[str] = option(
        "--format", help="Output format png, jpg, webp or tiff, or keep: each input's own format (png for "
        "others), grey inputs written grey (default: png, or the -o file's extension).", panel=OUTPUT,
        metavar="FORMAT")
    quality: int = option("--quality", help="JPEG/WebP quality.", panel=OUTPUT, default=95, min=1, max=100)
    overwrite: bool = option("--overwrite", help="Replace existing outputs (same as --existing overwrite).",
                             panel=OUTPUT, default=False)
    existing: Optional[str] = option(
        "--existing", help="An output that exists already: check (skip it if its recipe says this job wrote it, "
        "else fail the item; the default), skip (keep it whatever wrote it), overwrite.", panel=OUTPUT,
        show_default=False, metavar="MODE")
    no_gallery: bool = option("--no-gallery", help="Write no index.html gallery of the output folder.",
                              panel=OUTPUT, default=False)
    json_out: bool = option("--json", help="Write one JSON event per item to stdout.", panel=RUN, default=False)
    quiet: bool = option("--quiet", "-q", help="No progress output.", panel=RUN, default=False)
    fail_fast: bool = option("--fail-fast", help="Stop at the first failed item.", panel=RUN, default=False)
    dry_run: bool = option("--dry-run", help="Show what would run: items, outputs, what would be skipped and "
                           "why, and the run plan; load no model, write nothing.", panel=RUN, default=False)
    batch_size: int = option("--batch-size", help="Items run together (never changes results).", panel=RUN,
                             default=1, min=1)
    seed: Optional[int] = option(
        "--seed", help="The run's seed: prompts and --n samples use N, N+1, ...; files a seed derived from N and "
        "their path. -1 or absent: the seed of the same job's earlier run into this output, else random. Always "
        "recorded.", panel=SAMPLING, min=-1, max=2**32 - 1)
    item_seed: Optional[int] = option(
        "--item-seed", help="Run every item with exactly this seed (the 'Seed:' an output records), e.g. to redo "
        "one file by hand.", panel=SAMPLING, min=0, max=2**32 - 1)
    shard: Optional[str] = option(
        "--shard", help="Run only shard K of N (K/N, e.g. 3/8) of the items, for job arrays; needs --seed.",
        panel=RUN, metavar="K/N")
    run_engine: str = option(
        "--engine", help="local, or ray: spread the items over a Ray cluster (pip install 'ldmtool[ray]').",
        panel=RUN, default="local", metavar="ENGINE")
    ray_address: Optional[str] = option(
        "--ray-address", help="With --engine ray: join this cluster (default: start a local one).", panel=RUN,
        metavar="ADDRESS")
    sweep: Optional[list[str]] = option(
        "--sweep", help="Run every combination of these values of a sampling or model option with the same "
        "seeds, e.g. --sweep steps=20,30 --sweep cfg=5,7 (repeatable; names gain -steps20-cfg5, or {sweep}).",
        panel=RUN, metavar="NAME=V1,V2")
    max_output_pixels: Optional[int] = option(
        "--max-output-pixels", help="Refuse, before anything runs, outputs above this many pixels (default "
        "16384x16384; 0 = no limit).", panel=RUN, min=0)


@dataclass(frozen=True)
class ModelChoice:
    """Which model to load, and on what."""

    model: str = option("--model", "-m", help="Checkpoint file, or a preset/default model name (see `ldmtool "
                        "models list`).", panel=MODEL, default="default", metavar="NAME|FILE")
    config: Optional[Path] = option("--config", help="CompVis-format YAML config for the checkpoint.", panel=MODEL)
    preset: Optional[str] = option("--preset", help="Architecture preset name (instead of --config).", panel=MODEL,
                                  metavar="NAME")
    no_ema: bool = option("--no-ema", help="Use the raw weights even when EMA weights are present.", panel=MODEL,
                          default=False)
    prediction: Optional[str] = option("--prediction", help="Override the model's parameterization: eps or v.",
                                       panel=MODEL, metavar="eps|v")
    device: str = option("--device", help="Device: auto, cpu, cuda, cuda:N or mps.", panel=MODEL,
                        default="auto", metavar="DEVICE")
    precision: str = option("--precision", help="auto, fp32, fp16 or bf16 (auto: bf16 on CPUs that compute it natively, AMX or "
                            "AVX512-BF16; fp32 on other CPUs; fp16 on GPUs).",
                            panel=MODEL, default="auto", metavar="PRECISION")
    compile: Optional[bool] = option(
        "--compile/--no-compile", help="Run the denoising network and the first stage's decode through "
        "torch.compile (inductor, frozen weights): about a minute of compilation per process and model, then faster "
        "steps (SD 1.5 on an AMX CPU: two thirds of the eager time) and decodes (half). Pixels differ from an eager run's by rounding and follow the thread count.", panel=MODEL)

    # What Stable Diffusion users bring (README "For Stable Diffusion users"; ldmtool/addons/).
    lora: Optional[list[str]] = option(
        "--lora", help="Apply a LoRA/LyCORIS file (or NAME in --lora-dir) at WEIGHT (default 1) to the UNet and "
        "text encoder once per model load (repeatable). Prompts may also say <lora:NAME:WEIGHT>.", panel=MODEL,
        metavar="FILE[:W]")
    lora_dir: Optional[Path] = option(
        "--lora-dir", help="Folder where LoRA names are found (default: $LDMTOOL_LORA_DIR).", panel=MODEL,
        metavar="DIR")
    embeddings_dir: Optional[Path] = option(
        "--embeddings-dir", help="Folder of textual-inversion embeddings (.pt, .safetensors), used in prompts by "
        "file name.", panel=MODEL, metavar="DIR")
    vae: Optional[Path] = option(
        "--vae", help="Replace the model's first stage with this VAE file (CompVis or diffusers layout).",
        panel=MODEL, metavar="FILE")
    clip_skip: Optional[int] = option(
        "--clip-skip", help="CLIP layer the prompt is read from, counted from the end: 1 the last, 2 the "
        "penultimate (default: the model's; 2 for SD 2.x).", panel=MODEL, min=1, metavar="N")
    # The transformer families' text encoders, given beside the model (issue 24).
    text_encoder: Optional[list[Path]] = option(
        "--text-encoder", help="A text encoder file or diffusers folder for FLUX.1 / SD3 (CLIP-L, OpenCLIP bigG or "
        "T5-XXL, recognised by its keys; repeatable).", panel=MODEL, metavar="FILE")
    tokenizer: Optional[Path] = option(
        "--tokenizer", help="Folder with T5's tokenizer.json (e.g. a diffusers FLUX.1 folder's tokenizer_2/), for a "
        "T5-XXL text encoder.", panel=MODEL, metavar="DIR")

    @property
    def use_ema(self) -> bool:
        return not self.no_ema


@dataclass(frozen=True)
class SamplingChoice:
    """Sampling and tiling; None means "the model's default". `--seamless` is opt-in (generators only)."""

    steps: Optional[int] = option("--steps", help="Sampling steps (default: the model's).", panel=SAMPLING, min=1)
    sampler: Optional[str] = option("--sampler", help=f"Sampler: {', '.join(SAMPLER_NAMES)}, or A1111's name "
                                    "('DPM++ 2M', 'Euler a') (default: the model's).", panel=SAMPLING, metavar="NAME")
    cfg: Optional[float] = option("--cfg", help="Classifier-free guidance scale (1 = off; default: the model's).",
                                  panel=SAMPLING)
    eta: Optional[float] = option("--eta", help="DDIM eta (0 = deterministic).", panel=SAMPLING, min=0.0)
    temperature: Optional[float] = option(
        "--temperature", help="Scale of the starting noise: below 1 trades invented detail for fidelity (1 = the "
        "model's distribution; default: the model's, else 1).", panel=SAMPLING, min=0.0)
    karras: Optional[bool] = option("--karras/--no-karras", help="Karras sigma spacing (k-diffusion samplers).",
                                    panel=SAMPLING)
    tile: Optional[int] = option("--tile", help="Tile size in latent pixels, rounded down to a multiple of 8 (0 = no tiling; default: automatic).",
                                 panel=TILING, min=0)
    tile_overlap: Optional[int] = option("--tile-overlap", help="Tile overlap in latent pixels.", panel=TILING, min=0)
    tile_shift: Optional[bool] = option(
        "--tile-shift/--no-tile-shift", help="Move the tile grid at every step, so no tile boundary stays in one "
        "place (removes region changes along boundaries; default: off).", panel=TILING)
    max_memory: Optional[str] = option(
        "--max-memory", help="Memory budget for tiling, e.g. 4GB (default: from the device).", panel=TILING,
        metavar="SIZE")
    seamless: Optional[str] = option(
        "--seamless", help="Wrap-around output along x, y or xy (tileable textures).", panel=TILING,
        metavar="AXES")
    vae_tile: Optional[int] = None  # first-stage tile (latent pixels); None: tile when the canvas is large
    # Few-step models (issue 25): the timestep spacing and TCD's gamma.
    spacing: Optional[str] = option(
        "--spacing", help=f"Timestep spacing: {', '.join(SPACING_NAMES)} (uniform, quad: CompVis; leading, trailing, "
        "linspace: diffusers' timestep_spacing; sgm_uniform, simple: A1111's schedule types; lcm: LCM/TCD) "
        "(default: the sampler's, or a distilled model's).", panel=SAMPLING, metavar="NAME")
    tcd_gamma: Optional[float] = option(
        "--tcd-gamma", help="TCD's gamma, the noise re-injected per step (0 = deterministic; default 0.3).",
        panel=SAMPLING, min=0.0, max=1.0)
    guidance: Optional[float] = option(
        "--guidance", help="The guidance value a guidance-distilled model takes as input (FLUX.1 dev; default: "
        "the model's, 3.5).", panel=SAMPLING, min=0.0)


# -- opt-in groups


@dataclass(frozen=True)
class TextPrompt:
    prompt: Optional[str] = option("--prompt", "-p", help="Text prompt.", panel=SAMPLING)
    negative: Optional[str] = option("--negative", help="Negative prompt.", panel=SAMPLING)

    def __post_init__(self) -> None:
        from ldmtool.io.files import check_unicode_text

        for flag, text in (("--prompt", self.prompt), ("--negative", self.negative)):
            if text is not None:
                check_unicode_text(text, flag)


@dataclass(frozen=True)
class PromptTemplate:
    """Prompt templates (txt2img): {a|b} variants and __name__ wildcards in prompts and negatives."""

    wildcards: Optional[Path] = option(
        "--wildcards", help="Folder of wildcard files (name.txt, YAML, JSON) for __name__ in prompts.",
        panel=SAMPLING, metavar="DIR")
    combinatorial: bool = option(
        "--combinatorial", help="Every combination of each prompt template (default: one random expansion "
        "per image, chosen by its seed).", panel=SAMPLING, default=False)
    max_prompts: Optional[int] = option(
        "--max-prompts", help="With --combinatorial: at most N prompts per template.", panel=SAMPLING, min=1,
        metavar="N")
    same_seed: bool = option(
        "--same-seed", help="Give every expansion of a template the run's seed, so only the prompt changes.",
        panel=SAMPLING, default=False)


@dataclass(frozen=True)
class Size:
    width: Optional[int] = option("--width", "-W", help="Output width in pixels.", panel=SAMPLING, min=8)
    height: Optional[int] = option("--height", "-H", help="Output height in pixels.", panel=SAMPLING, min=8)


@dataclass(frozen=True)
class ImageInputs:
    """Input images found in folders and read with a size limit."""

    recursive: bool = option("--recursive", "-r", help="Descend into subfolders of input folders.", panel=INPUTS,
                             default=False)
    max_pixels: Optional[int] = option(
        "--max-pixels", help="Refuse input images above this many pixels (default 8192x8192).", panel=INPUTS,
        min=1)


@dataclass(frozen=True)
class MaskInputs:
    masks: Optional[Path] = option(
        "--masks", help="Folder of masks named like the images (else x_mask.png beside x.png).", panel=INPUTS)
    invert_mask: bool = option("--invert-mask", help="Swap the mask meaning: black = repaint.", panel=INPUTS,
                               default=False)
    mask_from_alpha: bool = option("--mask-from-alpha", help="Repaint the transparent pixels of each image.",
                                   panel=INPUTS, default=False)


@dataclass(frozen=True)
class ControlInputs:
    """ControlNets and their hint images (txt2img, img2img, inpaint; pipelines/control.py)."""

    controlnet: Optional[list[str]] = option(
        "--controlnet", help="Guide the UNet with this ControlNet file at STRENGTH (default 1; repeatable: "
        "several at once, each with its own --control-image).", panel=MODEL, metavar="FILE[:S]")
    adapter: Optional[list[str]] = option(
        "--adapter", help="Guide the UNet with this T2I-Adapter file at WEIGHT (default 1; repeatable); its hint is "
        "the --control-image after those of the ControlNets. Features are computed once per image.", panel=MODEL,
        metavar="FILE[:W]")
    control_image: Optional[list[Path]] = option(
        "--control-image", help="Hint image for each --controlnet, in order: a file for every item, or a folder "
        "of hints named like the inputs (txt2img: a file). Resized to the output size if it differs (with "
        "--hires / --scale, to the upscaled size; with --scale and no --control-image, the input is the hint). "
        "For inpaint, the word inpaint makes the hint from the input and its mask (pixels to repaint set to -1, "
        "for ControlNet inpaint).",
        panel=INPUTS, metavar="PATH")
    # None (not 0, 1, balanced): runs without ControlNets keep their job identity.
    control_start: Optional[float] = option(
        "--control-start", help="Fraction of the steps after which control starts (default 0).", panel=SAMPLING,
        min=0.0, max=1.0)
    control_end: Optional[float] = option(
        "--control-end", help="Fraction of the steps after which control stops (default 1).", panel=SAMPLING,
        min=0.0, max=1.0)
    control_mode: Optional[str] = option(
        "--control-mode", help="balanced (the default), or control: A1111's 'ControlNet is more important' "
        "(residuals weighted 0.825^(12-i), none on guidance's unconditional pass).", panel=SAMPLING,
        metavar="MODE")
