"""GroupNorm statistics over a whole canvas: moments gathered piece by piece and merged exactly, the
normalisation with given statistics, and the hook through which the tiled passes take GroupNorms over."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from ldmtool.nets._layers import GroupNorm32


def chunked_group_stats(norm: nn.GroupNorm, chunks: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    moments = None
    for x in chunks:
        moments = Moments.of(x, norm.num_groups).merge(moments)
    return moments.mean_rstd(norm.eps)


@dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations (M2) per (item, group), float64; merged with Chan's
    pairwise formula, which stays accurate however large the mean is against the spread."""

    count: int
    mean: Tensor
    m2: Tensor

    @classmethod
    def of(cls, x: Tensor, groups: int) -> "Moments":
        """Moments of `x` (B, C, H, W), any strides: per channel in float32 (a centred copy and one dot
        product, far faster than a float64 or Welford reduction), then channels merged into groups."""
        batch, channels = x.shape[:2]
        pixels = x.shape[-2] * x.shape[-1]
        channel_mean = x.float().mean((-2, -1))
        centred = (x.float() - channel_mean[..., None, None]).flatten(2)
        channel_m2 = torch.linalg.vecdot(centred, centred).double()
        channel_mean = channel_mean.double().view(batch, groups, -1)
        mean = channel_mean.mean(-1)
        spread = (channel_mean - mean[..., None]).square().sum(-1) * pixels
        return cls(pixels * (channels // groups), mean, channel_m2.view(batch, groups, -1).sum(-1) + spread)

    def merge(self, other: Optional["Moments"]) -> "Moments":
        if other is None:
            return self
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta.square() * (self.count * other.count / count)
        return Moments(count, mean, m2)

    def mean_rstd(self, eps: float) -> tuple[Tensor, Tensor]:
        var = (self.m2 / self.count).clamp_min(0)
        return self.mean.float(), (var + eps).rsqrt().float()


def group_norm(x: Tensor, norm: nn.GroupNorm, mean: Tensor, rstd: Tensor) -> Tensor:
    """`norm(x)` with given per-(item, group) statistics, computed in float32 like the reference GroupNorm32.

    Folded into one per-channel scale and shift, so a tile costs a single pass over its values."""
    scale, shift = _channel_affine(norm, mean, rstd)
    return torch.addcmul(shift[..., None, None], x.float(), scale[..., None, None]).to(x.dtype)


def _channel_affine(norm: nn.GroupNorm, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C) scale and shift with `norm(x) = x * scale + shift` for per-(item, group) `mean`, `rstd`."""
    per_group = norm.num_channels // norm.num_groups
    scale = rstd.repeat_interleave(per_group, dim=1)
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if norm.affine:
        weight, bias = norm.weight.float(), norm.bias.float()
        scale, shift = scale * weight, shift * weight + bias
    return scale, shift


@contextmanager
def group_norms_through(control: Callable[[nn.GroupNorm, Tensor], Optional[Tensor]],
                        modules: Iterable[nn.Module]) -> Iterator[None]:
    """Runs every GroupNorm32 in this context through `control`, which returns the output, or None for the
    norm's own. `modules` are those the caller tiles: their norms must all be GroupNorm32 (a plain GroupNorm
    would normalise each tile by itself). One tiled pass at a time per process: the hook is process-wide."""
    plain = [m for m in modules if isinstance(m, nn.GroupNorm) and not isinstance(m, GroupNorm32)]
    if plain:
        raise TypeError(f"{type(plain[0]).__name__} is not a GroupNorm32: its statistics cannot be made global")
    if GroupNorm32.override is not None:
        raise RuntimeError("a tiled autoencoder pass is already running in this process")
    GroupNorm32.override = control
    try:
        yield
    finally:
        GroupNorm32.override = None
