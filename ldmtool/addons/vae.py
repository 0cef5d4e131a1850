"""`--vae FILE`: a separate first stage (e.g. SD 1.x's fine-tuned `vae-ft-mse-840000`) in place of the
checkpoint's own. Two layouts, one entry each: the CompVis/SD one the checkpoints use (`encoder.down.0...`,
`decoder.up.0...`, also under `first_stage_model.`), and diffusers' `AutoencoderKL` (`encoder.down_blocks.0...`,
attention as linear layers), converted on load to the CompVis names. The replacement is loaded strictly.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ldmtool.addons.base import VAE, AddonFormat
from ldmtool.errors import CheckpointError

_DROPPED = ("loss.", "model_ema.")  # training leftovers of CompVis VAE files (A1111 drops them too)
_RESNET = {"conv_shortcut": "nin_shortcut"}
_ATTENTION = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v", "value": "v",
              "to_out.0": "proj_out", "proj_attn": "proj_out"}
_DIFFUSERS = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.")


def _compvis(content: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    state = {k.removeprefix("first_stage_model."): v for k, v in content.items() if isinstance(v, torch.Tensor)}
    return {k: v for k, v in state.items() if not k.startswith(_DROPPED)}


def _diffusers_key(key: str, up_levels: int) -> str:
    part, _, rest = key.partition(".")
    rest = rest.replace("conv_norm_out", "norm_out")
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", rest):
        level = int(m[2]) if m[1] == "down" else up_levels - 1 - int(m[2])
        return f"{part}.{m[1]}.{level}.block.{m[3]}.{_RESNET.get(m[4], m[4])}.{m[5]}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(weight|bias)", rest):
        level = int(m[2]) if m[1] == "down" else up_levels - 1 - int(m[2])
        return f"{part}.{m[1]}.{level}.{m[3]}sample.conv.{m[4]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)\.(weight|bias)", rest):
        return f"{part}.mid.block_{int(m[1]) + 1}.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
        return f"{part}.mid.attn_1.{_ATTENTION.get(m[1], m[1])}.{m[2]}"
    return f"{part}.{rest}"


def _diffusers(content: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    state = {k.removeprefix("vae."): v for k, v in content.items() if isinstance(v, torch.Tensor)}
    up_levels = len({m[1] for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    return {_diffusers_key(k, up_levels) if k.startswith(("encoder.", "decoder.")) else k: v for k, v in state.items()}


VAE_FORMATS = (
    AddonFormat("diffusers AutoencoderKL", VAE, lambda keys: any(_DIFFUSERS.match(k.removeprefix("vae.")) for k in keys),
                _diffusers),
    AddonFormat("CompVis/SD VAE", VAE,
                lambda keys: any(k.removeprefix("first_stage_model.").startswith("decoder.") for k in keys), _compvis),
)


def apply_vae(first_stage: torch.nn.Module, path: Path) -> str:
    """Load the VAE in `path` into `first_stage` (strictly, in its device and dtype); returns the layout's name."""
    from ldmtool.addons.registry import formats
    from ldmtool.checkpoints.files import read_state_dict

    content = read_state_dict(path)
    keys = frozenset(content)
    entry = next((e for e in formats(VAE) if e.matches(keys)), None)
    if entry is None:
        raise CheckpointError(f"--vae {path}: not a VAE file (keys such as {', '.join(sorted(keys)[:3])}; expected "
                              "encoder.*/decoder.* in the CompVis or diffusers layout)")
    state = entry.read(content, str(path))
    expected = first_stage.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        listed = ", ".join((missing or unexpected)[:3])
        raise CheckpointError(f"--vae {path} ({entry.name}): {len(missing)} missing and {len(unexpected)} unexpected "
                              f"keys for this model's first stage, e.g. {listed}")
    loaded = {}
    for key, target in expected.items():
        value = state[key]
        if value.numel() != target.numel():
            raise CheckpointError(f"--vae {path}: {key} has shape {tuple(value.shape)}, the model's first stage "
                                  f"{tuple(target.shape)} (a VAE for another model?)")
        loaded[key] = value.reshape(target.shape).to(target.device, target.dtype)  # diffusers attention: linear
    first_stage.load_state_dict(loaded, strict=True, assign=True)
    return entry.name
