"""`ldmtool train autoencoder|diffusion`: train a first stage, then a latent diffusion model on it.

Both write a run folder (-o) with a resumable state, the latest export in the original CompVis layout
(`model.safetensors` + `model.yaml`) and `log.jsonl`; `--resume` continues a run where it stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ldmtool.cli.shared import option_groups
from ldmtool.errors import FatalError, UsageError
from ldmtool.options import ModelChoice, RunChoice, option, same_option

if TYPE_CHECKING:
    from ldmtool.train.common import RunOptions

TRAINING = "Training"
AE_EXAMPLE = "Example: ldmtool train autoencoder --data corpus --factor 4 --steps 4000 -o runs/kl-f4"
CONTROLNET_EXAMPLE = (
    "Example: ldmtool train controlnet --model default-txt2img --data procedural --hint canny --steps 2500 "
    "-o runs/canny"
)
DIFFUSION_EXAMPLE = (
    "Example: ldmtool train diffusion --task superres --first-stage runs/kl-f4 --data corpus "
    "--steps 20000 -o runs/sr4"
)


def finite(value: Optional[float]) -> Optional[float]:
    """Typer's `min=` lets `inf` through, and an infinite weight or rate trains NaN weights."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def bare_name(value: Optional[str]) -> Optional[str]:
    """A file name inside --dest: a separator or `..` would write outside it."""
    if value is not None and (not value or "/" in value or "\\" in value or value in (".", "..")):
        raise typer.BadParameter(f"{value!r} is not a plain file name (no '/', '\\' or '..')")
    return value


train_app = typer.Typer(help="Train autoencoders and latent diffusion models offline.", no_args_is_help=True)

Data = Annotated[
    str, typer.Option("--data", help="Folder of training images, 'corpus' (built-in sample images), 'debian:PKG[,PKG]' (photographs of installed Debian packages), or several joined by '+'; held-out images are excluded.", rich_help_panel=TRAINING)
]
RunDir = Annotated[Path, typer.Option("--output", "-o", help="Run folder: state, exported model, log.", rich_help_panel=TRAINING)]
Steps = Annotated[int, typer.Option("--steps", min=1, help="Total optimisation steps (including resumed ones).", rich_help_panel=TRAINING)]
Crop = Annotated[int, typer.Option("--crop", min=16, help="Training crop size in pixels.", rich_help_panel=TRAINING)]
Batch = Annotated[int, typer.Option("--batch-size", min=1, help="Crops per optimisation step.", rich_help_panel=TRAINING)]
Lr = Annotated[float, typer.Option("--lr", callback=finite, min=0.0, help="Learning rate.", rich_help_panel=TRAINING)]
MinScale = Annotated[float, typer.Option("--min-scale", min=0.05, max=1.0, help="Random source downscale before cropping (1 = none).", rich_help_panel=TRAINING)]


@dataclass(frozen=True)
class TrainSession:
    """What both trainings take besides their model and data: randomness, saving, logging, device."""

    ema_decay: float = option("--ema-decay", help="EMA decay of the exported weights.", panel=TRAINING, default=0.999,
                              min=0.0, max=1.0)
    seed: int = option("--seed", help="Seed for crops, noise and initialisation.", panel=TRAINING, default=0, min=0)
    save_every: int = option("--save-every", help="Save state and export every N steps.", panel=TRAINING, default=500,
                             min=1)
    log_every: int = option("--log-every", help="Log losses every N steps.", panel=TRAINING, default=25, min=1)
    resume: bool = option("--resume", help="Continue the run saved in the output folder, with the options it started with (--steps, --save-every, --log-every, --device, --precision, --threads and --init may change).", panel=TRAINING,
                          default=False)
    recursive: bool = option("--recursive/--no-recursive", help="Descend into subfolders of --data.", panel=TRAINING,
                             default=True)
    device: str = same_option(ModelChoice, "device")
    precision: str = same_option(ModelChoice, "precision")
    threads: Optional[int] = option("--threads", help="CPU threads for torch.", panel=TRAINING, min=1)
    licences: Optional[str] = option("--licences", help="With --data debian:PKG: keep only images under these licences (comma-separated, as the package's copyright file names them, e.g. CC-BY-4.0,CC0-1.0).", panel=TRAINING)
    quiet: bool = same_option(RunChoice, "quiet")


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise UsageError(f"{option} {text!r}: give comma-separated integers, e.g. 1,2,4") from err
    if not values or min(values) < 1:
        raise UsageError(f"{option} {text!r}: give comma-separated positive integers, e.g. 1,2,4")
    return values


def _licences(session: TrainSession) -> Optional[list[str]]:
    return [name.strip() for name in session.licences.split(",") if name.strip()] if session.licences else None


def _run_options(out: Path, steps: int, session: TrainSession) -> RunOptions:
    from ldmtool.train.common import RunOptions, check_run_folder

    check_run_folder(out)  # before the data and the networks are built, which can take long
    return RunOptions(out=out, steps=steps, save_every=session.save_every, log_every=session.log_every,
                      resume=session.resume, device=session.device, precision=session.precision,
                      quiet=session.quiet, threads=session.threads)


@option_groups
def autoencoder(
    data: Data,
    output: RunDir,
    factor: Annotated[int, typer.Option("--factor", help="Downsampling factor: 4 or 8.", rich_help_panel=TRAINING)] = 4,
    channels: Annotated[int, typer.Option("--channels", min=64, help="Base channels (multiple of 32, at least 64: with 32 the decoder's last GroupNorm normalises each channel alone and image-wide colour is lost).", rich_help_panel=TRAINING)] = 64,
    res_blocks: Annotated[int, typer.Option("--res-blocks", min=1, help="Residual blocks per level.", rich_help_panel=TRAINING)] = 1,
    channel_mult: Annotated[Optional[str], typer.Option("--channel-mult", help="Channel multipliers per level, one more than log2(--factor) (default 1,2,4 for f=4, 1,2,4,4 for f=8).", rich_help_panel=TRAINING)] = None,
    z_channels: Annotated[Optional[int], typer.Option("--z-channels", min=1, help="Latent channels (default 3 for f=4, 4 for f=8).", rich_help_panel=TRAINING)] = None,
    attention: Annotated[bool, typer.Option("--attention", help="Self-attention in the mid block and at the lowest resolution (off: purely convolutional, so exact tiled decoding stays linear in the image area).", rich_help_panel=TRAINING)] = False,
    steps: Steps = 4000,
    crop: Crop = 128,
    batch_size: Batch = 4,
    lr: Lr = 2e-4,
    kl_weight: Annotated[float, typer.Option("--kl-weight", callback=finite, min=0.0, help="Weight of the KL term.", rich_help_panel=TRAINING)] = 1e-6,
    grad_weight: Annotated[float, typer.Option("--grad-weight", callback=finite, min=0.0, help="Weight of the image-gradient L1 term.", rich_help_panel=TRAINING)] = 0.5,
    ssim_weight: Annotated[float, typer.Option("--ssim-weight", callback=finite, min=0.0, help="Weight of the (1 - SSIM) term.", rich_help_panel=TRAINING)] = 0.2,
    chroma_weight: Annotated[float, typer.Option("--chroma-weight", callback=finite, min=0.0, help="Weight of the colour-opponent L1 term (keeps colour on grey-heavy data).", rich_help_panel=TRAINING)] = 1.0,
    disc_weight: Annotated[float, typer.Option("--disc-weight", callback=finite, min=0.0, help="Patch discriminator weight (0 = off).", rich_help_panel=TRAINING)] = 0.0,
    disc_start: Annotated[int, typer.Option("--disc-start", min=0, help="Step at which the discriminator starts.", rich_help_panel=TRAINING)] = 2000,
    min_scale: MinScale = 0.5,
    colour_jitter: Annotated[float, typer.Option("--colour-jitter", min=0.0, max=1.0, help="Share of crops given a random hue rotation, saturation and tint (teaches colour on grey-heavy data).", rich_help_panel=TRAINING)] = 0.5,
    sample_posterior: Annotated[bool, typer.Option("--sample-posterior/--decode-mean", help="Decode a posterior sample (as LDM) or its mean.", rich_help_panel=TRAINING)] = True,
    procedural_share: Annotated[float, typer.Option("--procedural-share", min=0.0, max=1.0, help="Share of crops replaced by the project's procedural scenes (label maps, layouts, shapes: saturated colours the semantic/layout/txt2img models need).", rich_help_panel=TRAINING)] = 0.0,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from this autoencoder's weights (model.safetensors of a run, or a LatentDiffusion checkpoint's first stage).", rich_help_panel=TRAINING)] = None,
    freeze_encoder: Annotated[bool, typer.Option("--freeze-encoder", help="With --init: train the decoder only, so the latent space (and every diffusion model trained on it) stays valid.", rich_help_panel=TRAINING)] = False,
    *,
    session: TrainSession,
) -> None:
    """Train a KL autoencoder (first stage) and export it in the CompVis layout."""
    from ldmtool.train.autoencoder import AutoencoderArch, AutoencoderLoss, AutoencoderTraining, train_autoencoder
    from ldmtool.train.data import resolve_data

    arch = AutoencoderArch(factor=factor, ch=channels, num_res_blocks=res_blocks, z_channels=z_channels, attention=attention,
                           ch_mult=_ints(channel_mult, "--channel-mult") if channel_mult else None)
    loss = AutoencoderLoss(kl_weight=kl_weight, grad_weight=grad_weight, ssim_weight=ssim_weight, chroma_weight=chroma_weight,
                           disc_weight=disc_weight, disc_start=disc_start)
    training = AutoencoderTraining(crop=crop, batch_size=batch_size, lr=lr, ema_decay=session.ema_decay, seed=session.seed,
                                   min_scale=min_scale, colour_jitter=colour_jitter, sample_posterior=sample_posterior,
                                   procedural_share=procedural_share, init=str(init) if init else None,
                                   freeze_encoder=freeze_encoder, loss=loss)
    run = _run_options(output, steps, session)
    path = train_autoencoder(arch, training, resolve_data(data, session.recursive, _licences(session)), run)
    if not session.quiet:
        typer.echo(f"wrote {path}", err=True)


@option_groups
def diffusion(
    output: RunDir,
    first_stage: Annotated[Path, typer.Option("--first-stage", help="Autoencoder run folder or model.safetensors (with its YAML), a shipped default's name (its first stage, e.g. default-txt2img), or patch:4 (lossless 4x4 pixel unshuffle, no weights).", rich_help_panel=TRAINING)],
    data: Annotated[
        Optional[str], typer.Option("--data", help="Folder of training images or 'corpus'; semantic, txt2img and layout train on 'procedural' label maps / captioned scenes / box layouts, uncond on either (procedural: landscapes).", rich_help_panel=TRAINING)
    ] = None,
    task: Annotated[str, typer.Option("--task", help="What to train for: superres, inpaint, semantic, txt2img, layout or uncond.", rich_help_panel=TRAINING)] = "superres",
    scale: Annotated[int, typer.Option("--scale", min=2, help="Super-resolution factor.", rich_help_panel=TRAINING)] = 4,
    channels: Annotated[int, typer.Option("--channels", min=32, help="UNet base channels (multiple of 32).", rich_help_panel=TRAINING)] = 64,
    channel_mult: Annotated[str, typer.Option("--channel-mult", help="UNet channel multipliers per level.", rich_help_panel=TRAINING)] = "1,2,4",
    res_blocks: Annotated[int, typer.Option("--res-blocks", min=1, help="Residual blocks per level.", rich_help_panel=TRAINING)] = 1,
    attention: Annotated[str, typer.Option("--attention-at", help="Downsampling factors with self-attention, e.g. 4 or 2,4.", rich_help_panel=TRAINING)] = "4",
    head_channels: Annotated[int, typer.Option("--head-channels", min=8, help="Channels per attention head.", rich_help_panel=TRAINING)] = 32,
    text_width: Annotated[int, typer.Option("--text-width", min=32, help="txt2img/layout: width of the jointly trained BERT encoder.", rich_help_panel=TRAINING)] = 128,
    text_layers: Annotated[int, typer.Option("--text-layers", min=1, help="txt2img/layout: its transformer layers.", rich_help_panel=TRAINING)] = 2,
    prediction: Annotated[str, typer.Option("--prediction", help="What the UNet learns to predict: eps (as LDM) or v (as SD 2; needed for image-wide colour with 32 base channels).", rich_help_panel=TRAINING)] = "eps",
    residual: Annotated[bool, typer.Option("--residual", help="superres: learn the detail over the input's bicubic upscale (residual learning; the pipeline adds the upscale back).", rich_help_panel=TRAINING)] = False,
    x0_loss: Annotated[bool, typer.Option("--x0-loss", help="Weight the loss as the error of the image (x0) each prediction implies: the MMSE objective at every noise level, for few-step, PSNR-measured models (the plain loss favours the low-noise steps).", rich_help_panel=TRAINING)] = False,
    degradation: Annotated[str, typer.Option("--degradation", help="superres: realistic (blur, noise, JPEG on 70% of low-res inputs) light (mostly clean downscales) or clean (area downscales only: what --consistency assumes).", rich_help_panel=TRAINING)] = "realistic",
    box_raster: Annotated[bool, typer.Option("--box-raster", help="layout: also give the UNet the boxes as a coverage map per class (concatenated; conditioning_key hybrid). Learns in a CPU-sized run where box tokens alone do not.", rich_help_panel=TRAINING)] = False,
    scale_factor: Annotated[Optional[float], typer.Option("--scale-factor", callback=finite, min=0.001, help="Latent scale factor (default: 1 / std of the training latents); give --init's to fine-tune it.", rich_help_panel=TRAINING)] = None,
    terminal_share: Annotated[float, typer.Option("--terminal-share", min=0.0, max=1.0, help="Share of each batch trained at the last timestep from x_T = 0: what a one-step sampler at --temperature 0 starts from (its loss is the image's MSE from the conditioning alone).", rich_help_panel=TRAINING)] = 0.0,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start the UNet (and a trainable text encoder) from this LatentDiffusion checkpoint's weights, or a shipped default's (by name), where names and shapes match.", rich_help_panel=TRAINING)] = None,
    steps: Steps = 20000,
    crop: Crop = 128,
    batch_size: Batch = 8,
    lr: Lr = 1e-4,
    min_scale: MinScale = 0.5,
    *,
    session: TrainSession,
) -> None:
    """Train a latent diffusion model for a task on a trained first stage; export a LatentDiffusion file."""
    from ldmtool.train.data import resolve_data
    from ldmtool.train.diffusion import PROCEDURAL, PROCEDURAL_TASKS, DiffusionTraining, Task, UNetArch, train_diffusion

    try:
        task_value = Task(task)
    except ValueError as err:
        raise UsageError(f"--task {task!r}: use one of {', '.join(t.value for t in Task)}") from err
    if channels % 32:
        raise UsageError(f"--channels {channels}: must be a multiple of 32 (GroupNorm groups)")
    arch = UNetArch(model_channels=channels, channel_mult=_ints(channel_mult, "--channel-mult"), num_res_blocks=res_blocks,
                    attention_resolutions=_ints(attention, "--attention-at"), num_head_channels=head_channels)
    training = DiffusionTraining(task=task_value, crop=crop, batch_size=batch_size, lr=lr, ema_decay=session.ema_decay,
                                 seed=session.seed, scale=scale, min_scale=min_scale, text_width=text_width, text_layers=text_layers,
                                 init=str(init) if init else None, procedural=data == PROCEDURAL,
                                 degradation=degradation, prediction=prediction, box_raster=box_raster, x0_loss=x0_loss, residual=residual,
                                 scale_factor=scale_factor, terminal_share=terminal_share)
    run = _run_options(output, steps, session)
    if task_value in PROCEDURAL_TASKS or (task_value == Task.UNCOND and data == PROCEDURAL):
        if data not in (None, PROCEDURAL):
            raise UsageError(f"--data {data}: --task {task} trains on procedural data only (--data {PROCEDURAL})")
        paths = []
    elif data is None or data == PROCEDURAL:
        raise UsageError(f"--task {task} needs --data DIR or --data corpus")
    else:
        paths = resolve_data(data, session.recursive, _licences(session))
    path = train_diffusion(arch, training, first_stage, paths, run)
    if not session.quiet:
        typer.echo(f"wrote {path}", err=True)


@option_groups
def controlnet(
    output: RunDir,
    model: Annotated[str, typer.Option("--model", help="The base model to control: a shipped default name or a LatentDiffusion file (text-to-image or unconditional); it stays frozen.", rich_help_panel=TRAINING)] = "default-txt2img",
    data: Annotated[str, typer.Option("--data", help="'procedural' (the captioned shape scenes default-txt2img was trained on), 'corpus' or a folder of images (trained with empty captions).", rich_help_panel=TRAINING)] = "procedural",
    hint: Annotated[str, typer.Option("--hint", help="Preprocessor that makes the hints, as ldmtool preprocess: canny, tile, scribble (or threshold), shuffle.", rich_help_panel=TRAINING)] = "canny",
    low: Annotated[int, typer.Option("--low", min=0, max=255, help="canny: lower threshold.", rich_help_panel=TRAINING)] = 100,
    high: Annotated[int, typer.Option("--high", min=0, max=255, help="canny: upper threshold.", rich_help_panel=TRAINING)] = 200,
    threshold: Annotated[int, typer.Option("--threshold", min=0, max=255, help="scribble/threshold: grey level above which a pixel is white.", rich_help_panel=TRAINING)] = 127,
    down: Annotated[float, typer.Option("--down", callback=finite, min=1.0, help="tile: downsampling factor before resampling back.", rich_help_panel=TRAINING)] = 4.0,
    cells: Annotated[int, typer.Option("--cells", min=1, help="shuffle: size of the random displacement cells.", rich_help_panel=TRAINING)] = 256,
    caption_dropout: Annotated[float, typer.Option("--caption-dropout", min=0.0, max=1.0, help="Share of captions replaced by the empty prompt, so the net learns from the hint alone (the paper: 0.5).", rich_help_panel=TRAINING)] = 0.5,
    steps: Steps = 2500,
    crop: Crop = 64,
    batch_size: Batch = 8,
    lr: Lr = 1e-4,
    min_scale: MinScale = 0.5,
    *,
    session: TrainSession,
) -> None:
    """Train a ControlNet for a latent diffusion model on hints made by a preprocessor; export it."""
    from ldmtool.pipelines.preprocess import PREPROCESSORS
    from ldmtool.train.controlnet import PROCEDURAL, ControlNetTraining, HintSource, train_controlnet
    from ldmtool.train.data import resolve_data

    if hint not in PREPROCESSORS:
        raise UsageError(f"--hint {hint!r}: choose one of {', '.join(PREPROCESSORS)}")
    if not low <= high:
        raise UsageError(f"--low {low} / --high {high}: need low <= high")
    source = HintSource(kind=hint, low=low, high=high, threshold=threshold, down=down, cells=cells)
    training = ControlNetTraining(base=model, hint=source, crop=crop, batch_size=batch_size, lr=lr,
                                  ema_decay=session.ema_decay, seed=session.seed, min_scale=min_scale,
                                  caption_dropout=caption_dropout, procedural=data == PROCEDURAL)
    paths = [] if data == PROCEDURAL else resolve_data(data, session.recursive, _licences(session))
    path = train_controlnet(training, paths, _run_options(output, steps, session))
    if not session.quiet:
        typer.echo(f"wrote {path}", err=True)


def export(
    run: Annotated[Path, typer.Argument(help="Run folder written by `ldmtool train`.", show_default=False)],
    name: Annotated[str, typer.Option("--name", callback=bare_name, help="Model name, e.g. default-superres (used with --model NAME).", rich_help_panel=TRAINING)],
    dest: Annotated[Optional[Path], typer.Option("--dest", help="Folder to write to (default: the package's shipped models).", rich_help_panel=TRAINING)] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="Training commands to record in the YAML.", rich_help_panel=TRAINING)] = None,
    first_stage_file: Annotated[Optional[str], typer.Option("--first-stage-file", callback=bare_name, help="Ship the first stage as this file beside the model, shared by every default trained on it (e.g. default-kl-f4.safetensors).", rich_help_panel=TRAINING)] = None,
    first_stage: Annotated[Optional[Path], typer.Option("--first-stage", help="Ship with this autoencoder's decoder instead of the run's (its encoder must be the run's: see train autoencoder --freeze-encoder).", rich_help_panel=TRAINING)] = None,
    colour_fix: Annotated[Optional[bool], typer.Option("--colour-fix/--no-colour-fix", help="The shipped model's default for superres/inpaint --colour-fix (default: as trained).", rich_help_panel=TRAINING)] = None,
    consistency: Annotated[Optional[bool], typer.Option("--consistency/--no-consistency", help="The shipped model's default for superres --consistency (default: as trained, i.e. off).", rich_help_panel=TRAINING)] = None,
    default_steps: Annotated[Optional[int], typer.Option("--default-steps", min=1, help="The shipped model's default --steps (default: as trained, 50).", rich_help_panel=TRAINING)] = None,
    default_temperature: Annotated[Optional[float], typer.Option("--default-temperature", callback=finite, min=0.0, help="The shipped model's default --temperature (default: as trained, 1).", rich_help_panel=TRAINING)] = None,
    default_cfg: Annotated[Optional[float], typer.Option("--default-cfg", callback=finite, min=1.0, help="The shipped model's default --cfg (default: as trained, 1 = no guidance).", rich_help_panel=TRAINING)] = None,
    default_spacing: Annotated[Optional[str], typer.Option("--default-spacing", help="The shipped model's default --spacing, e.g. trailing (a one-step model must start at the last timestep; default: the sampler's).", rich_help_panel=TRAINING)] = None,
) -> None:
    """Write a run's latest export as an fp16 shipped model: NAME.safetensors + NAME.yaml."""
    from ldmtool.checkpoints.presets import models_dir
    from ldmtool.diffusion.names import spacing_name
    from ldmtool.train.common import ship

    if default_spacing is not None and spacing_name(default_spacing) is None:
        raise UsageError(f"--default-spacing {default_spacing!r} is not a spacing")
    chosen = {"colour_fix": colour_fix, "consistency": consistency, "default_steps": default_steps,
              "default_cfg": default_cfg, "default_temperature": default_temperature,
              "default_spacing": spacing_name(default_spacing) if default_spacing else None}
    defaults = {key: value for key, value in chosen.items() if value is not None}
    weights, config = ship(run, name, dest or models_dir(), recipe, first_stage_file, first_stage, defaults)
    typer.echo(f"wrote {weights} and {config}", err=True)


def sources(
    data: Data,
    output: Annotated[Path, typer.Option("--output", "-o", help="Manifest to write (JSON): every image of the train and eval split with package, version, licence, holders and sha256.", rich_help_panel=TRAINING)],
    licences: Annotated[Optional[str], typer.Option("--licences", help="As for training: keep only debian: images under these licences (comma-separated).", rich_help_panel=TRAINING)] = None,
    notice: Annotated[Optional[Path], typer.Option("--notice", help="Also write a Markdown notice of the TRAIN images' licences and attributions (ship it beside the weights).", rich_help_panel=TRAINING)] = None,
    name: Annotated[str, typer.Option("--name", help="Model name the notice is for, e.g. default-superres.", rich_help_panel=TRAINING)] = "",
    recursive: Annotated[bool, typer.Option("--recursive/--no-recursive", help="Descend into subfolders of --data.", rich_help_panel=TRAINING)] = True,
) -> None:
    """Write what --data trains on: a sources manifest and, with --notice, the licence notice for the weights."""
    from ldmtool.train.sources import render_notice, source_images, write_manifest

    kept = [part.strip() for part in licences.split(",") if part.strip()] if licences else None
    images = source_images(data, kept, recursive)
    if not any(image.split == "train" for image in images):
        raise UsageError(f"--data {data}: no training images" + (f" under {licences}" if licences else ""))
    try:
        write_manifest(output, data, kept, images)
        if notice is not None:
            notice.write_text(render_notice(images, name), encoding="utf-8")
    except OSError as err:
        raise FatalError(f"{err.filename}: cannot write ({err.strerror})") from err
    typer.echo(f"wrote {output}" + (f" and {notice}" if notice else "") + f" ({len(images)} images)", err=True)


SOURCES_EXAMPLE = ("Example: ldmtool train sources --data debian:lomiri-wallpapers-16.04 --licences CC-BY-4.0,CC0-1.0 "
                   "-o sources.json --notice NOTICE.md")
EXPORT_EXAMPLE = "Example: ldmtool train export runs/sr4 --name default-superres"
train_app.command("export", help=f"{export.__doc__}\n\n{EXPORT_EXAMPLE}")(export)
train_app.command("autoencoder", help=f"{autoencoder.__doc__}\n\n{AE_EXAMPLE}")(autoencoder)
train_app.command("diffusion", help=f"{diffusion.__doc__}\n\n{DIFFUSION_EXAMPLE}")(diffusion)
train_app.command("controlnet", help=f"{controlnet.__doc__}\n\n{CONTROLNET_EXAMPLE}")(controlnet)
train_app.command("sources", help=f"{sources.__doc__}\n\n{SOURCES_EXAMPLE}")(sources)


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train", help=f"Train autoencoders and latent diffusion models offline.\n\n{AE_EXAMPLE}")
