"""T2I-Adapter files as users hold them, renamed on load onto diffusers' `T2IAdapter` layout without its
`adapter.` prefix (`nets/t2i_adapter.py`), each with or without that prefix:

- diffusers' `T2IAdapter` (full, light and SDXL's `full_adapter_xl`): `body.L.resnets.M.*`, `conv_in.*`.
- TencentARC's original `Adapter` (`t2iadapter_canny_sd14v1.pth`, `t2iadapter_depth_sd15v2.pth`, ...): its
  residual blocks in one flat list, `body.N.block1/block2` with `body.N.in_conv` where the width changes;
  block N is block N % n of level N // n, n blocks per level (the index of the first `in_conv`).
- TencentARC's original `Adapter_light` (`t2iadapter_color_sd14v1.pth`): `body.L.in_conv/body.M/out_conv`.

Which network the keys describe (full, light, SDXL) is `nets.t2i_adapter.build_adapter`'s to say.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from ldmtool.addons.base import AddonFormat
from ldmtool.errors import CheckpointError
from ldmtool.nets.meta import meta_device

ADAPTER = "t2i-adapter"
PREFIX = "adapter."


def _bare(keys: frozenset[str]) -> frozenset[str]:
    return frozenset(k.removeprefix(PREFIX) for k in keys)


def _diffusers(keys: frozenset[str]) -> bool:
    return any(k.startswith("body.0.resnets.0.block1.") for k in _bare(keys))


def _original(keys: frozenset[str]) -> bool:
    bare = _bare(keys)
    return "conv_in.weight" in bare and any(k.startswith("body.0.block1.") for k in bare)


def _original_light(keys: frozenset[str]) -> bool:
    bare = _bare(keys)
    return "body.0.out_conv.weight" in bare and any(k.startswith("body.0.body.0.block1.") for k in bare)


def _read_diffusers(content: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {k.removeprefix(PREFIX): v for k, v in content.items()}


_FLAT_BLOCK = re.compile(r"body\.(\d+)\.(.+)")


def _read_original(content: Mapping[str, Any], where: str) -> dict[str, Any]:
    state = _read_diffusers(content, where)
    widened = sorted(int(m.group(1)) for k in state if (m := _FLAT_BLOCK.fullmatch(k)) and m.group(2) == "in_conv.weight")
    if not widened or widened[0] == 0:
        raise CheckpointError(f"{where}: a T2I-Adapter whose levels cannot be told apart (no body.N.in_conv with N > 0)")
    per_level = widened[0]
    renamed = {}
    for key, value in state.items():
        match = _FLAT_BLOCK.fullmatch(key)
        if match is None:
            renamed[key] = value
            continue
        level, block = divmod(int(match.group(1)), per_level)
        rest = match.group(2)
        renamed[f"body.{level}.{rest}" if rest.startswith("in_conv.") else f"body.{level}.resnets.{block}.{rest}"] = value
    return renamed


def _read_original_light(content: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {re.sub(r"^body\.(\d+)\.body\.", r"body.\1.resnets.", k): v for k, v in _read_diffusers(content, where).items()}


ADAPTER_FORMATS = (AddonFormat("t2i-adapter-diffusers", ADAPTER, _diffusers, _read_diffusers),
                   AddonFormat("t2i-adapter-original", ADAPTER, _original, _read_original),
                   AddonFormat("t2i-adapter-original-light", ADAPTER, _original_light, _read_original_light))


def read_adapter(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """A T2I-Adapter file's tensors in diffusers' layout without prefix."""
    from ldmtool.addons.registry import formats
    from ldmtool.checkpoints.files import read_state_dict

    content = read_state_dict(path)
    entry = next((e for e in formats(ADAPTER) if e.matches(frozenset(content))), None)
    if entry is None:
        raise CheckpointError(f"{path}: not a T2I-Adapter ldmtool reads (diffusers' T2IAdapter, or TencentARC's "
                              "Adapter / Adapter_light: body.N.* and conv_in.* keys)")
    return entry.read(content, str(path))


def load_adapter(path: Union[str, Path], *, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A T2I-Adapter from a file, its kind, widths and depth from the keys; called as `adapter(hint)` -> one
    feature map per level (hint at pixel resolution in [0, 1], with `adapter.in_channels` channels)."""
    from ldmtool.nets.t2i_adapter import build_adapter

    state = read_adapter(path)
    try:
        with meta_device():
            net = build_adapter({k: tuple(v.shape) for k, v in state.items()})
        net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True, assign=True)
    except (KeyError, ValueError, RuntimeError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines()] or [type(err).__name__]
        detail = lines[1] if len(lines) > 1 else lines[0]  # torch's first line only names the class
        raise CheckpointError(f"{path}: T2I-Adapter keys do not match its architecture ({detail})") from None
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)
