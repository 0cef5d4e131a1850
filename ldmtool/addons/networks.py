"""The networks of a run: `--lora FILE[:W]` and a prompt's `<lora:NAME:W>`, found in `--lora-dir` (or
`$LDMTOOL_LORA_DIR`), applied to a freshly loaded bundle by the model loader, and recorded as A1111's
`Lora hashes`.

A `NetworkSet` (the files with their weights, in order) is part of the model cache's key, so a batch (or a
prompt file whose lines share a set) loads and patches the model once.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ldmtool.addons.base import ADDON_SUFFIXES
from ldmtool.errors import UsageError

if TYPE_CHECKING:
    from ldmtool.addons.layer_names import Target
    from ldmtool.addons.lora import LayerChange
    from ldmtool.checkpoints.bundle import Bundle
    from ldmtool.pipelines.prompt_syntax import NetworkTag

LORA_DIR_ENV = "LDMTOOL_LORA_DIR"


@dataclass(frozen=True)
class Network:
    """One LoRA/LyCORIS file at a weight; `name` is how prompts and metadata call it (the file's stem)."""

    path: Path
    weight: float = 1.0
    text_weight: Optional[float] = None  # the text encoders' weight where a prompt tag gives one apart

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def weights(self) -> tuple[float, float]:
        """(denoiser, text encoder) weights."""
        return self.weight, self.weight if self.text_weight is None else self.text_weight

    def identity(self) -> tuple[Any, float, Optional[float]]:
        from ldmtool.runtime.cache import FileIdentity

        return FileIdentity.of(self.path), self.weight, self.text_weight

    def weight_record(self) -> list[float]:
        """The weights as a job's identity records them: [w], or [unet, text encoder] where they differ."""
        unet, text = self.weights
        return [unet] if unet == text else [unet, text]


NetworkSet = tuple[Network, ...]


def lora_folder(lora_dir: Optional[Path]) -> Optional[Path]:
    folder = lora_dir or (Path(os.environ[LORA_DIR_ENV]) if os.environ.get(LORA_DIR_ENV) else None)
    return folder.expanduser() if folder is not None else None


def find_network(name: str, lora_dir: Optional[Path], where: str) -> Path:
    """A LoRA file: a path, or NAME (with or without suffix) in the LoRA folder."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    folder = lora_folder(lora_dir)
    if folder is not None:
        for candidate in [folder / name, *(folder / f"{name}{suffix}" for suffix in ADDON_SUFFIXES)]:
            if candidate.is_file():
                return candidate
    looked = f"in {folder}" if folder else f"(give a file, or --lora-dir / ${LORA_DIR_ENV})"
    raise UsageError(f"{where}: no LoRA file {name!r} {looked}")


def parse_lora_option(text: str, lora_dir: Optional[Path]) -> Network:
    """`--lora FILE[:WEIGHT]` (a weight after the last colon, when it is a number)."""
    name, _, weight = text.rpartition(":")
    try:
        value = float(weight) if name else None
    except ValueError:
        value = None
    if value is None:
        name, value = text, 1.0
    if not math.isfinite(value):
        raise UsageError(f"--lora {text}: the weight must be a finite number")
    return Network(find_network(name, lora_dir, f"--lora {text}").resolve(), value)


def run_networks(options: Optional[Sequence[str]], lora_dir: Optional[Path]) -> NetworkSet:
    return tuple(parse_lora_option(text, lora_dir) for text in options or ())


def prompt_networks(prompt: str, lora_dir: Optional[Path]) -> NetworkSet:
    """The `<lora:NAME:W>` tags of a prompt as networks (UsageError naming the tag when one is not found)."""
    from ldmtool.pipelines.prompt_syntax import extra_networks

    try:
        _, tags = extra_networks(prompt)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return tuple(_tag_network(tag, lora_dir) for tag in tags)


def _tag_network(tag: "NetworkTag", lora_dir: Optional[Path]) -> Network:
    path = find_network(tag.name, lora_dir, f"<lora:{tag.name}>").resolve()
    if tag.unet_weight is None or tag.unet_weight == tag.weight:
        return Network(path, tag.weight)
    return Network(path, tag.unet_weight, text_weight=tag.weight)


# ---------------------------------------------------------------- applying and recording


@lru_cache(maxsize=16)
def _layers(path: Path, _identity: Any) -> "list[LayerChange]":
    from ldmtool.addons.lora import read_network

    return read_network(path)


def bundle_targets(bundle: "Bundle") -> "dict[str, Target]":
    """Flat layer address -> parameter for the bundle's UNet and text encoder, or a transformer bundle's denoiser."""
    from ldmtool.addons.layer_names import text_targets, unet_targets
    from ldmtool.checkpoints.transformer_bundle import TransformerBundle

    if isinstance(bundle, TransformerBundle):
        return transformer_targets(bundle)
    assert bundle.unet is not None, "networks are applied to models with a UNet"
    table = unet_targets(bundle.unet, "model.diffusion_model.")
    cond = getattr(bundle, "cond_stage_model", None)
    if cond is not None:
        table.update(text_targets(cond, "cond_stage_model."))
    conditioner = getattr(bundle, "conditioner", None)
    if conditioner is not None:
        table.update(conditioner_targets(conditioner))
    return table


def transformer_targets(bundle: Any) -> "dict[str, Target]":
    """A FLUX.1 or SD3 bundle's denoiser layers, addressed from the bundle (its text encoders are opened by the
    pipeline, not bundle parts, so their layers have no place here yet)."""
    from ldmtool.addons.flux_lora import flux_lora_targets
    from ldmtool.addons.mmdit_lora import mmdit_lora_targets
    from ldmtool.errors import CheckpointError
    from ldmtool.nets.flux import Flux
    from ldmtool.nets.mmdit import MMDiT

    denoiser = bundle.denoiser
    if denoiser is None:
        raise CheckpointError("a LoRA needs the model's transformer: this model file holds only an autoencoder")
    prefix = next(name for name, module in bundle.named_modules() if module is denoiser) + "."
    if isinstance(denoiser, Flux):
        return flux_lora_targets(denoiser, prefix)
    if isinstance(denoiser, MMDiT):
        return mmdit_lora_targets(denoiser, prefix)
    raise CheckpointError(f"LoRA files cannot be applied to a {type(denoiser).__name__} yet")


def conditioner_targets(conditioner: Any) -> "dict[str, Target]":
    """An sgm conditioner's text towers under kohya's names: two towers (SDXL base) are `lora_te1_` and
    `lora_te2_`, as diffusers' text_encoder and text_encoder_2; a lone tower (the refiner's bigG, diffusers'
    text_encoder_2) answers to `lora_te2_` and `lora_te_`."""
    from ldmtool.addons.layer_names import text_targets

    slots = [index for index, key in enumerate(conditioner.input_keys) if key == "txt"]
    names = [("lora_te1_",), ("lora_te2_",)] if len(slots) == 2 else [("lora_te2_", "lora_te_")] * len(slots)
    table: dict[str, Target] = {}
    for index, kohya in zip(slots, names):
        table.update(text_targets(conditioner.embedders[index], f"conditioner.embedders.{index}.", kohya))
    return table


def apply_networks(bundle: "Bundle", networks: NetworkSet) -> None:
    """Patch a freshly loaded bundle's weights with every network at its weight (weight 0 changes nothing)."""
    from ldmtool.addons.lora import apply_network

    if not networks:
        return
    targets = bundle_targets(bundle)
    for network in networks:
        if network.weights != (0, 0):
            apply_network(bundle, targets, _layers(network.path, network.identity()), network.weights,
                          str(network.path))


def network_hash(path: Path) -> str:
    """A1111's short hash of a LoRA: for .safetensors the sha256 of the tensor data after the header (the
    "addnet" hash), else of the whole file; first 12 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if path.suffix.lower() == ".safetensors":
            handle.seek(8 + int.from_bytes(handle.read(8), "little"))
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def lora_hashes(networks: NetworkSet) -> Optional[str]:
    """`name: hash, name: hash` as A1111 writes `Lora hashes` (None without networks)."""
    if not networks:
        return None
    return ", ".join(f"{n.name}: {network_hash(n.path)}" for n in networks)
