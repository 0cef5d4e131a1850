"""Conditioning handed to a denoiser, and the denoiser signature every part shares.

A *denoiser* is any callable `denoise(x, sigma, cond) -> x0` in the k-diffusion form:
  x      (B, C, h, w) latent in the variance-exploding form x = x0 + sigma * eps
  sigma  (B,) noise levels
  cond   a `Cond` (or `Guided`): whatever conditioning the network needs
and it returns the prediction of the clean latent x0, shape like x.

Samplers see `lambda x, sigma: denoise(x, sigma, cond)`; the tiled engine wraps a denoiser and crops every
spatial field of the conditioning per tile with `map_spatial`, while non-spatial fields (cross-attention
context, class labels, noise levels) are shared by all tiles, unless `tile_crossattn` gives a context per
tile (layout models, whose last two tokens name the crop the model sees).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Optional, Protocol

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Cond:
    """Conditioning for one batch (first dimension = batch)."""

    crossattn: Optional["Tensor"] = None  # (B, T, D) context for cross-attention; shared by tiles
    concat: Optional["Tensor"] = None  # (B, C, h, w) at latent resolution; cropped per tile
    y: Optional["Tensor"] = None  # (B,) class ids / noise levels, or (B, D) vectors; shared
    # The context for one tile instead of `crossattn`: called with the tile's (top, left, height, width) and
    # the canvas (height, width), both in latent pixels; returns (B, T, D). Untiled calls use `crossattn`.
    tile_crossattn: Optional[Callable[[tuple[int, int, int, int], tuple[int, int]], "Tensor"]] = None
    # ControlNet hints at latent resolution (`addons/controlnet.pack_hint`): cropped per tile like `concat`;
    # and each row's scale per ControlNet (B, K), shared by tiles.
    control: Optional["Tensor"] = None
    control_scale: Optional["Tensor"] = None
    adapter: Optional["Tensor"] = None  # T2I-Adapter features packed to latent resolution (`pack_features`)
    # Each latent pixel's (row, column) in the whole canvas (B, 2, h, w), cropped per tile like `concat`: how a
    # transformer gives a tile its global position (its top-left entry is the tile's place).
    position: Optional["Tensor"] = None

    def map_spatial(self, fn: Callable[["Tensor"], "Tensor"]) -> "Cond":
        """The same conditioning with `fn` applied to every spatial field (used to cut tiles)."""
        return replace(self, concat=None if self.concat is None else fn(self.concat),
                       control=None if self.control is None else fn(self.control),
                       adapter=None if self.adapter is None else fn(self.adapter),
                       position=None if self.position is None else fn(self.position))

    def map_batch(self, fn: Callable[["Tensor"], "Tensor"]) -> "Cond":
        """The same conditioning with `fn` applied to every field along the batch (repeat, index, cat)."""
        tile = self.tile_crossattn
        crossattn, concat, y = (None if t is None else fn(t) for t in (self.crossattn, self.concat, self.y))
        control, control_scale, adapter, position = (
            None if t is None else fn(t) for t in (self.control, self.control_scale, self.adapter, self.position))
        return Cond(crossattn, concat, y,
                    tile_crossattn=None if tile is None else (lambda rect, canvas: fn(tile(rect, canvas))),
                    control=control, control_scale=control_scale, adapter=adapter, position=position)


@dataclass(frozen=True)
class Guided:
    """Classifier-free guidance: conditional and unconditional conditioning and the scale."""

    cond: Cond
    uncond: Optional[Cond]
    scale: float

    def map_spatial(self, fn: Callable[["Tensor"], "Tensor"]) -> "Guided":
        uncond = None if self.uncond is None else self.uncond.map_spatial(fn)
        return Guided(self.cond.map_spatial(fn), uncond, self.scale)


class Denoiser(Protocol):
    def __call__(self, x: "Tensor", sigma: "Tensor", cond) -> "Tensor": ...
