"""diffusers' folder layout (`model_index.json`, `transformer/`, `vae/`, ...) read as one state dict under the
single-file names, so detection and the strict load treat it as any released file. Only the parts ldmtool
builds are read (the denoiser and the autoencoder; text encoders join with their loaders); a transformer is
converted by the entry of its `config.json` class in `TRANSFORMER_CONVERTERS`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ldmtool.errors import CheckpointError
from ldmtool.io.files import MAX_CONFIG_BYTES, read_text_file

INDEX = "model_index.json"


def _flux(state: Mapping[str, Any]) -> dict[str, Any]:
    from ldmtool.families.flux import bfl_from_diffusers

    return bfl_from_diffusers(state)


def _sd3(state: Mapping[str, Any]) -> dict[str, Any]:
    from ldmtool.nets.mmdit_names import mmdit_state_from_diffusers

    return mmdit_state_from_diffusers(state)


TRANSFORMER_CONVERTERS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "FluxTransformer2DModel": _flux,
    "SD3Transformer2DModel": _sd3,
}


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / INDEX).is_file()


def read_diffusers_folder(path: Path) -> dict[str, torch.Tensor]:
    """The folder's transformer (converted to its reference names) and VAE (CompVis names), as one dict."""
    state: dict[str, torch.Tensor] = {}
    if (path / "transformer").is_dir():
        name = _class_name(path / "transformer")
        if name not in TRANSFORMER_CONVERTERS:
            raise CheckpointError(f"{path}: its transformer is a {name}, which ldmtool cannot load "
                                  f"(known: {', '.join(TRANSFORMER_CONVERTERS)})")
        state.update(TRANSFORMER_CONVERTERS[name](_weights(path / "transformer")))
    if (path / "vae").is_dir():
        state.update(_compvis_vae(_weights(path / "vae")))
    if not state:
        raise CheckpointError(f"{path}: a diffusers folder without transformer/ or vae/ weights")
    return state


def _class_name(part: Path) -> str:
    try:
        return str(json.loads(read_text_file(part / "config.json", MAX_CONFIG_BYTES))["_class_name"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{part / 'config.json'}: cannot read the model class "
                              f"({getattr(err, 'strerror', None) or type(err).__name__})") from None


def _weights(part: Path) -> dict[str, torch.Tensor]:
    """Every `*.safetensors` in the part's folder (the shards an index lists, or the one file)."""
    from ldmtool.checkpoints.files import read_safetensors_folder

    state = read_safetensors_folder(part)
    if not state:
        raise CheckpointError(f"{part}: no .safetensors weights (diffusers' .bin files are not read: convert them)")
    return state


def _compvis_vae(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' AutoencoderKL names -> CompVis's; its mid-block attention is linear, CompVis's 1x1 convs."""
    from ldmtool.addons.vae import _diffusers

    converted = _diffusers(state, "vae")
    attention = (".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")
    return {k: v[..., None, None] if ".mid.attn_1." in k and k.endswith(attention) and v.dim() == 2 else v
            for k, v in converted.items()}
