"""The parts a diffusion training run is built from: the frozen first stage, the UNet and cond stage, the
noise schedule, layout tokens, and weights copied from an earlier checkpoint (`--init`)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import yaml

from ldmtool.errors import CheckpointError, UsageError
from ldmtool.train import common
from ldmtool.train.autoencoder import AUTOENCODER_TARGET, build_autoencoder
from ldmtool.train.diffusion_config import (
    LAYOUT_MAX_OBJECTS,
    LAYOUT_NAMES,
    LAYOUT_VOCAB,
    TEXT_TASKS,
    DiffusionTraining,
    Task,
)
from ldmtool.train.procedural import CLASSES, Box

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class FirstStage:
    """A frozen, loaded first stage, its CompVis params and its config target (a KL autoencoder's, or
    ldmtool's lossless `PatchAutoencoder`, which has no weights)."""

    model: "nn.Module"
    params: dict[str, Any]
    target: str = AUTOENCODER_TARGET

    @property
    def factor(self) -> int:
        from ldmtool.families.compvis import first_stage_downsampling

        return first_stage_downsampling(self.params)

    @property
    def channels(self) -> int:
        if "patch_size" in self.params:  # every pixel of a patch is a channel
            return int(self.params["in_channels"]) * self.factor ** 2
        return int(self.params["embed_dim"])


PATCH_SPEC = re.compile(r"patch:(\d+)")  # --first-stage patch:4


def patch_first_stage(text: str) -> Optional[FirstStage]:
    """`--first-stage patch:F`: the lossless F×F pixel-unshuffle first stage; None for anything else."""
    from ldmtool.nets.patch_autoencoder import PATCH_TARGET, PatchAutoencoder

    match = PATCH_SPEC.fullmatch(text)
    if match is None:
        return None
    factor = int(match.group(1))
    if factor not in (2, 4, 8):
        raise UsageError(f"--first-stage {text}: the patch size must be 2, 4 or 8")
    params = {"patch_size": factor, "in_channels": 3}
    return FirstStage(PatchAutoencoder(**params), params, PATCH_TARGET)


def _first_stage_files(path: Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.is_dir():
        path = path / common.MODEL_FILE
    for config in (path.with_suffix(".yaml"), path.parent / common.CONFIG_FILE):
        if config.is_file():
            return path, config
    raise UsageError(f"--first-stage {path}: no config beside it (expected {path.with_suffix('.yaml').name})")


def _read_first_stage_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path}: cannot read this first-stage config ({type(err).__name__})") from err
    model_config = config.get("model", config) if isinstance(config, dict) else None
    if not isinstance(model_config, dict):
        raise CheckpointError(f"{path}: not a model config (a YAML mapping is expected)")
    return model_config


def shipped_first_stage(name: str) -> Optional[tuple[Path, dict[str, Any]]]:
    """(weights, first_stage_config) of the shipped default `name` (e.g. default-superres: the first stage it
    ships with, as shipped in fp16), or None when no shipped default has that name."""
    from ldmtool.checkpoints.presets import models_dir, shipped_model

    shipped = shipped_model(name)
    if shipped is None:
        return None
    doc = yaml.safe_load(shipped.config.read_text())
    shared = doc.get("ldmtool", {}).get("first_stage_weights")
    config = doc.get("model", {}).get("params", {}).get("first_stage_config")
    if not shared or not config:
        raise UsageError(f"--first-stage {name}: that shipped model has no separately shipped first stage")
    return models_dir() / shared, config


def shipped_weights(text: str | Path) -> Path:
    """`--init` as given: a path, or a shipped default's name (its weights file)."""
    from ldmtool.checkpoints.presets import shipped_model

    path = Path(text)
    shipped = shipped_model(str(text)) if not path.exists() else None
    return shipped.weights if shipped is not None else path


def load_first_stage(path: Path, device: torch.device | str) -> FirstStage:
    """Load an autoencoder written by `ldmtool train autoencoder` (or any KL first stage + its YAML)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    patch = patch_first_stage(str(path)) if not Path(path).exists() else None
    if patch is not None:  # no weights to place on the device
        return patch
    shipped = shipped_first_stage(str(path)) if not Path(path).exists() else None
    if shipped is not None:
        weights_path, model_config = shipped
    else:
        weights_path, config_path = _first_stage_files(path)
        if not weights_path.is_file():
            raise UsageError(f"--first-stage {weights_path}: file not found")
        if weights_path.suffix != ".safetensors":
            raise UsageError(f"--first-stage {weights_path}: expected an autoencoder's .safetensors file "
                             "(or the run folder holding it)")
        model_config = _read_first_stage_config(config_path)
    if model_config.get("target") != AUTOENCODER_TARGET:
        raise CheckpointError(f"{config_path}: target {model_config.get('target')!r} is not a KL autoencoder ({AUTOENCODER_TARGET})")
    params = model_config["params"]
    model = build_autoencoder(params)
    try:
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except (RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"{weights_path}: weights do not match {config_path.name}: {str(err).splitlines()[0]}") from err
    model.to(device).eval().requires_grad_(False)
    return FirstStage(model, params)


def layout_tokens(layouts: Sequence[Sequence[Box]]) -> "torch.Tensor":
    """(B, 3 * LAYOUT_MAX_OBJECTS + 2) token ids of procedural layouts, as the layout2img command builds them."""
    import torch

    from ldmtool.pipelines.layout_tokens import BoxTokenizer, LayoutObject, category_number

    tokenizer = BoxTokenizer.for_sequence(LAYOUT_VOCAB, 3 * LAYOUT_MAX_OBJECTS + 2)
    rows = [tokenizer.tokens([LayoutObject(category_number(LAYOUT_NAMES[CLASSES[b.cls].name]), (b.x0, b.y0, b.x1, b.y1))
                              for b in boxes]) for boxes in layouts]
    return torch.tensor(rows, dtype=torch.long)


def build_cond_stage(task: Task, params: dict[str, Any]) -> "nn.Module":
    from ldmtool.nets.encoders import BERTEmbedder, SpatialRescaler

    return (BERTEmbedder if task in TEXT_TASKS else SpatialRescaler)(**params)


def build_unet(params: dict[str, Any]) -> "nn.Module":
    from ldmtool.nets.unet import UNetModel

    return UNetModel(**params)


def schedule(training: DiffusionTraining) -> dict[str, "torch.Tensor"]:
    from ldmtool.checkpoints.schedule import schedule_buffers

    return schedule_buffers(
        beta_schedule="linear", timesteps=training.timesteps,
        linear_start=training.linear_start, linear_end=training.linear_end,
    )

UNET_PREFIX = "model.diffusion_model."
UNET_INPUT_CONV = "input_blocks.0.0.weight"  # the conv that takes the noisy latent and the concatenated inputs


def init_unet(unet: "nn.Module", checkpoint: Path) -> int:
    """Copies the UNet weights of a LatentDiffusion checkpoint into `unet` wherever the name and shape
    match (fine-tuning, e.g. a new first stage under a trained model); returns how many tensors were taken.
    A checkpoint matching fewer than half of the UNet's tensors is a usage error: another architecture."""
    checkpoint = shipped_weights(checkpoint)
    if not checkpoint.is_file():
        raise UsageError(f"--init {checkpoint}: no such checkpoint file (give a file or a shipped default's name)")
    return _copy_matching(unet, checkpoint, UNET_PREFIX, at_least=0.5, widen=UNET_INPUT_CONV)


COND_PREFIX = "cond_stage_model."


def init_cond_stage(cond_stage: "nn.Module", checkpoint: Path) -> int:
    """Copies a checkpoint's trainable cond stage (BERT, spatial rescaler) into `cond_stage` where names and
    shapes match; a checkpoint without one (or of another shape) leaves it as initialised. Returns the count."""
    return _copy_matching(cond_stage, shipped_weights(checkpoint), COND_PREFIX, at_least=0.0)


def _copy_matching(module: "nn.Module", checkpoint: Path, prefix: str, at_least: float,
                   widen: Optional[str] = None) -> int:
    """Copy the checkpoint's `prefix`-ed tensors into `module` where name and shape match (and the conv
    named `widen` where it only takes more input channels); fewer matches than `at_least` of the module's
    tensors is a usage error (another architecture)."""
    from ldmtool.checkpoints.files import read_state_dict

    source = {k[len(prefix):]: v for k, v in read_state_dict(checkpoint).items() if k.startswith(prefix)}
    own = module.state_dict()
    matching = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if widen in source and widen in own and _more_inputs(own[widen].shape, source[widen].shape):
        matching[widen] = widen_inputs(source[widen], own[widen].shape)
    if len(matching) < at_least * len(own):
        raise UsageError(f"--init {checkpoint}: only {len(matching)} of the UNet's {len(own)} weights match "
                         "this architecture (name and shape); give a checkpoint of the same UNet")
    return common.copy_weights(module, matching)


def _more_inputs(own: Sequence[int], source: Sequence[int]) -> bool:
    """Whether a conv weight differs from the checkpoint's only by taking more input channels."""
    return (len(own) == len(source) == 4 and own[1] > source[1]
            and own[0] == source[0] and tuple(own[2:]) == tuple(source[2:]))


def widen_inputs(weight: "torch.Tensor", shape: Sequence[int]) -> "torch.Tensor":
    """A conv weight with zero weights for the added input channels: a UNet given a new concatenated input
    (e.g. the box raster) starts as the checkpoint's UNet, which ignores it until training says otherwise."""
    import torch

    wide = torch.zeros(tuple(shape), dtype=weight.dtype)
    wide[:, :weight.shape[1]] = weight
    return wide
