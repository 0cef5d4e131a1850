"""Small layers shared by the UNet and the autoencoders.

Every spatial padding of the networks goes through `Conv2d` below (and `pad_2d` for the autoencoder's
asymmetric downsample pad), so seamless mode is one call: `set_seamless(model, x=True, y=False)` makes
every padding circular along the chosen axes and zero along the others. The state-dict keys stay those of
`torch.nn.Conv2d`.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmtool.errors import CheckpointError


def pad_2d(x: Tensor, pad: tuple[int, int, int, int], seamless: tuple[bool, bool]) -> Tensor:
    """Pad (left, right, top, bottom): circular along the axes marked in `seamless` (x, y), zeros elsewhere."""
    left, right, top, bottom = pad
    wrap_x, wrap_y = seamless
    if wrap_x and (left or right):
        x = F.pad(x, (left, right, 0, 0), mode="circular")
        left = right = 0
    if wrap_y and (top or bottom):
        x = F.pad(x, (0, 0, top, bottom), mode="circular")
        top = bottom = 0
    if left or right or top or bottom:
        x = F.pad(x, (left, right, top, bottom))
    return x


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` whose zero padding can be switched to circular per axis (`seamless = (x, y)`)."""

    seamless: tuple[bool, bool] = (False, False)

    def forward(self, x: Tensor) -> Tensor:
        if not any(self.seamless) or self.padding == (0, 0):
            return super().forward(x)
        pad_y, pad_x = self.padding  # type: ignore[misc]
        x = pad_2d(x, (pad_x, pad_x, pad_y, pad_y), self.seamless)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def set_seamless(model: nn.Module, x: bool, y: bool) -> None:
    """Make every padding inside `model` circular along x and/or y (False, False restores zero padding)."""
    for module in model.modules():
        if hasattr(module, "seamless"):
            module.seamless = (bool(x), bool(y))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, as the reference `GroupNorm32`."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """32-group normalisation of the reference code (eps 1e-5 in the UNet, 1e-6 in the autoencoder)."""
    return GroupNorm32(32, channels, eps=eps)


def silu(x: Tensor) -> Tensor:
    """SiLU, in place when no gradient is recorded (saves one activation-sized allocation per call)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return F.silu(x)
    return F.silu(x, inplace=True)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of `module` (the reference's initialisation of residual output layers)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def check_dims(dims: int, where: str) -> None:
    if dims != 2:
        raise CheckpointError(f"{where}: dims={dims} is not supported (only 2-D image networks, dims: 2)")


def as_list(value, length: int, name: str, where: str) -> list:
    """An int repeated per level, or a per-level list checked for length."""
    if isinstance(value, Iterable) and not isinstance(value, str):
        values = list(value)
        if len(values) != length:
            raise CheckpointError(f"{where}: {name} has {len(values)} entries but channel_mult has {length} levels")
        return values
    return [value] * length
