"""T2I-Adapter files: diffusers' `T2IAdapter` full adapter (`adapter.conv_in.*`, `adapter.body.N.resnets.M.*`),
with or without the `adapter.` prefix, read as an add-on format and loaded strictly (`load_adapter`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Union

import torch

from ldmtool.addons.base import AddonFormat
from ldmtool.errors import CheckpointError

ADAPTER = "t2i-adapter"
PREFIX = "adapter."


def _full_adapter(keys: frozenset[str]) -> bool:
    return any(k.removeprefix(PREFIX).startswith("body.0.resnets.0.block1.") for k in keys)


def _read(content: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {k.removeprefix(PREFIX): v for k, v in content.items()}


ADAPTER_FORMATS = (AddonFormat("t2i-adapter-full", ADAPTER, _full_adapter, _read),)


def load_adapter(path: Union[str, Path], *, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A T2I-Adapter from a file, its widths and depth from the keys; called as `adapter(hint)` -> one
    feature per UNet level (hint at pixel resolution in [0, 1])."""
    from ldmtool.addons.registry import formats
    from ldmtool.checkpoints.files import read_state_dict
    from ldmtool.nets.t2i_adapter import FullAdapter, adapter_params

    path = Path(path)
    content = read_state_dict(path)
    entry = next((e for e in formats(ADAPTER) if e.matches(frozenset(content))), None)
    if entry is None:
        raise CheckpointError(f"{path}: not a T2I-Adapter ldmtool reads (diffusers full adapter: "
                              "adapter.body.N.resnets.M.* keys)")
    state = entry.read(content, str(path))
    with torch.device("meta"):
        net = FullAdapter(**adapter_params({k: tuple(v.shape) for k, v in state.items()}))
    try:
        net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: T2I-Adapter keys do not match its architecture ({str(err).splitlines()[0]})") from None
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)
