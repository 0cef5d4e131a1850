"""Tile plans: which latent rectangles a tiled denoiser runs, and how their predictions are weighted.

Every rectangle is in latent pixels of the canvas. Along a *wrapping* axis (seamless mode) a tile may
run past the far edge and continue at the near one; along a plain axis every tile lies inside the canvas
and the last one is aligned to the far edge, so there is never an uncovered strip.

Weights: a tile's outermost `margin` pixels at an *inner* edge (an edge that is not the canvas border)
get weight 0, because predictions there see the tile's zero padding instead of the neighbouring content;
the next `overlap - 2 * margin` pixels ramp smoothly up to 1 (a half Gaussian, or a step for uniform
weights). Where neighbouring tiles overlap by at least `overlap`, their non-zero regions still overlap,
so every pixel has a positive weight sum. With a network whose receptive-field radius is at most
`margin`, every non-zero weight multiplies an exact prediction, so the fused result equals the untiled
one for any normalised weighting.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch


class Weighting(str, enum.Enum):
    GAUSSIAN = "gaussian"
    UNIFORM = "uniform"


@dataclass(frozen=True)
class Rect:
    """A tile: rows [top, top + height), columns [left, left + width); may wrap on a wrapping axis."""

    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class Span:
    """One tile along one axis: its start and which of its two edges touch the canvas border."""

    start: int
    length: int
    inner_lo: bool  # the low edge borders another tile (its pixels there are least reliable)
    inner_hi: bool


@dataclass(frozen=True)
class TilePlan:
    """Tiles covering a canvas of `height` x `width` latent pixels, in row-major order."""

    height: int
    width: int
    rows: tuple[Span, ...]
    cols: tuple[Span, ...]
    wrap_y: bool
    wrap_x: bool
    margin: int
    overlap: int

    @property
    def tiles(self) -> list[Rect]:
        return [Rect(r.start, c.start, r.length, c.length) for r in self.rows for c in self.cols]

    @property
    def tile_shape(self) -> tuple[int, int]:
        return self.rows[0].length, self.cols[0].length

    @property
    def single(self) -> bool:
        return len(self.rows) == 1 and len(self.cols) == 1

    @property
    def work_pixels(self) -> int:
        """Latent pixels the network processes for one evaluation of the plan."""
        tile_h, tile_w = self.tile_shape
        return len(self.rows) * len(self.cols) * tile_h * tile_w


def axis_spans(length: int, tile: int, overlap: int, *, wrap: bool = False, shift: int = 0) -> list[Span]:
    """Tiles of `tile` pixels along an axis of `length`, neighbours overlapping by at least `overlap`.

    Tiles are spread evenly (the spare overlap is shared out), the first starts at 0 and the last ends
    at `length`. `shift` moves the grid by that many pixels: along a wrapping axis the whole grid
    rotates (same number of tiles); along a plain axis one partial tile appears at the start and the
    tiles are clamped into the canvas, so every overlap stays at least `overlap`.
    """
    if length <= tile:
        return [Span(0, length, False, False)]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"tile overlap {overlap} must be smaller than the tile size {tile}")
    if wrap:
        count = math.ceil(length / stride)
        starts = [(round(i * length / count) + shift) % length for i in range(count)]
        return [Span(s, tile, True, True) for s in starts]
    if shift % stride:
        return _shifted_spans(length, tile, stride, shift % stride)
    count = math.ceil((length - tile) / stride) + 1
    starts = [round(i * (length - tile) / (count - 1)) for i in range(count)]
    return [Span(s, tile, s > 0, s + tile < length) for s in starts]


def aligned_spans(length: int, tile: int, overlap: int, align: int, *, wrap: bool = False, shift: int = 0) -> list[Span]:
    """`axis_spans` with every tile starting at a multiple of `align` (for conditioning packed in cells of
    `align` latent pixels, such as T2I-Adapter features): the spans planned in cells, the tile rounded down
    and the overlap up to whole cells. The axis must be whole cells unless one tile covers it."""
    if align <= 1 or length <= tile:
        return axis_spans(length, tile, overlap, wrap=wrap, shift=shift)
    if length % align or tile < align:
        raise ValueError(f"tiles aligned to {align} need an axis ({length}) of whole cells and a tile ({tile}) "
                         "of at least one")
    spans = axis_spans(length // align, tile // align, -(-overlap // align), wrap=wrap, shift=shift // align)
    return [Span(s.start * align, s.length * align, s.inner_lo, s.inner_hi) for s in spans]


def _shifted_spans(length: int, tile: int, stride: int, shift: int) -> list[Span]:
    starts = [0]
    position = shift
    while starts[-1] + tile < length:
        starts.append(min(position, length - tile))
        position += stride
    return [Span(s, tile, s > 0, s + tile < length) for s in starts]


def plan_tiles(
    height: int,
    width: int,
    tile: int | tuple[int, int],
    overlap: int,
    *,
    wrap_y: bool = False,
    wrap_x: bool = False,
    margin: Optional[int] = None,
    shift: tuple[int, int] = (0, 0),
    align: int = 1,
) -> TilePlan:
    """A plan covering `height` x `width`; `margin` defaults to a quarter of the overlap. With `align`, every
    tile starts at a multiple of it (`aligned_spans`)."""
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    if min(height, width, tile_h, tile_w) <= 0:
        raise ValueError(f"canvas {height}x{width} and tile {tile_h}x{tile_w} must be positive")
    margin = overlap // 4 if margin is None else margin
    if 2 * margin > overlap:
        raise ValueError(f"margin {margin} must be at most half the overlap {overlap}")
    rows = aligned_spans(height, tile_h, overlap, align, wrap=wrap_y, shift=shift[0])
    cols = aligned_spans(width, tile_w, overlap, align, wrap=wrap_x, shift=shift[1])
    return TilePlan(height, width, tuple(rows), tuple(cols), wrap_y, wrap_x, margin, overlap)


def fit_tile(length: int, max_tile: int, overlap: int, *, multiple: int = 8, wrap: bool = False,
             preferred: Optional[int] = None) -> int:
    """The tile length (a multiple of `multiple`, at most `max_tile`) that covers `length` with the least work.

    Shrinking the tile a little often saves a whole row of tiles (e.g. 256 = 5 x 56 - 4 x 4 instead of
    5 x 64). Among equal work, tiles up to `preferred` (the model's native size) win over larger ones.
    """
    if length <= max_tile:
        return length
    preferred = max_tile if preferred is None else preferred
    smallest = max(multiple, 2 * overlap + multiple, (preferred // 2) // multiple * multiple)
    best, best_key = max_tile, None
    for tile in range(max_tile // multiple * multiple, smallest - 1, -multiple):
        key = (len(axis_spans(length, tile, overlap, wrap=wrap)) * tile, tile > preferred, -tile)
        if best_key is None or key < best_key:
            best, best_key = tile, key
    return best


def shift_for(plan_stride: int, key: float, levels: int = 4) -> int:
    """A deterministic grid offset in [0, stride) for one denoiser call (keyed by its noise level).

    Offsets are quantised to `levels` values so only a few plans (and their weights) ever exist.
    """
    if plan_stride <= 1 or levels <= 1 or not math.isfinite(key):  # a flow model's first call is at sigma = inf
        return 0
    index = int(abs(math.log(max(key, 1e-12))) * 997.0) % levels
    return index * plan_stride // levels


@lru_cache(maxsize=256)
def _profile(length: int, inner_lo: bool, inner_hi: bool, margin: int, ramp: int, weighting: Weighting) -> tuple:
    values = []
    for u in range(length):
        far = length + margin + ramp  # a canvas border is never an inner edge
        distance = min(u if inner_lo else far, (length - 1 - u) if inner_hi else far) - margin
        values.append(_ramp_value(distance, ramp, weighting))
    return tuple(values)


def _ramp_value(distance: int, ramp: int, weighting: Weighting) -> float:
    if distance < 0:
        return 0.0
    if weighting is Weighting.UNIFORM or distance >= ramp:
        return 1.0
    # Half Gaussian rising from about 0.01 at the margin to 1 after `ramp` pixels.
    return math.exp(-0.5 * ((ramp - distance) / (ramp / 3.0)) ** 2)


def axis_weights(span: Span, margin: int, ramp: int, weighting: Weighting) -> "torch.Tensor":
    import torch

    return torch.tensor(_profile(span.length, span.inner_lo, span.inner_hi, margin, ramp, weighting), dtype=torch.float64)


def tile_weights(plan: TilePlan, weighting: Weighting = Weighting.GAUSSIAN) -> list["torch.Tensor"]:
    """Per-tile weights (h, w), normalised so that the weights covering each canvas pixel sum to 1."""
    import torch

    ramp = max(1, plan.overlap - 2 * plan.margin)
    raw = [
        torch.outer(axis_weights(r, plan.margin, ramp, weighting), axis_weights(c, plan.margin, ramp, weighting))
        for r in plan.rows
        for c in plan.cols
    ]
    total = torch.zeros(plan.height, plan.width, dtype=torch.float64)
    for rect, weight in zip(plan.tiles, raw):
        add_tile(total, rect, weight, plan)
    if not bool((total > 0).all()):
        raise ValueError(f"tile plan leaves pixels without weight: {plan}")
    return [(weight / crop_tile(total, rect, plan)).float() for rect, weight in zip(plan.tiles, raw)]


def _axis_index(start: int, length: int, size: int, wrap: bool):
    import torch

    if wrap and start + length > size:
        return (torch.arange(start, start + length) % size)
    return slice(start, start + length)


def crop_tile(x: "torch.Tensor", rect: Rect, plan: TilePlan) -> "torch.Tensor":
    """The tile `rect` of a canvas-sized tensor (last two dims), wrapping where the plan wraps."""
    rows = _axis_index(rect.top, rect.height, plan.height, plan.wrap_y)
    cols = _axis_index(rect.left, rect.width, plan.width, plan.wrap_x)
    out = x[..., rows, :] if isinstance(rows, slice) else x.index_select(-2, rows.to(x.device))
    return out[..., cols] if isinstance(cols, slice) else out.index_select(-1, cols.to(x.device))


def add_tile(canvas: "torch.Tensor", rect: Rect, value: "torch.Tensor", plan: TilePlan) -> None:
    """canvas[tile] += value, in place, wrapping where the plan wraps (value is broadcast over leading dims)."""
    rows = _axis_index(rect.top, rect.height, plan.height, plan.wrap_y)
    cols = _axis_index(rect.left, rect.width, plan.width, plan.wrap_x)
    if isinstance(rows, slice) and isinstance(cols, slice):
        canvas[..., rows, cols] += value
        return
    import torch

    rows_t = torch.arange(rect.top, rect.top + rect.height) if isinstance(rows, slice) else rows
    cols_t = torch.arange(rect.left, rect.left + rect.width) if isinstance(cols, slice) else cols
    # Rows and columns inside one tile are distinct, so plain indexed addition is exact.
    canvas[..., rows_t.to(canvas.device)[:, None], cols_t.to(canvas.device)[None, :]] += value
