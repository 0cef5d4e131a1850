"""Latent fusion at the denoiser level: every sampler and task gets tiling by wrapping its denoiser.

Per call the canvas x (B, C, H, W) and every spatial conditioning field are cut into the plan's tiles;
tiles run in batches of `tile_batch` (tile-major: batch items x tiles folded into one network batch, sigma
and the shared context repeated), and the x0 predictions are added up with per-tile weights that were
normalised once per plan. On out-of-memory the call is retried with fewer tiles per batch, then smaller
tiles; the smaller setting is kept for the following calls.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Optional

from ldmtool.diffusion.cond import Cond, Guided
from ldmtool.tiling.planner import Rect, TilePlan, Weighting, add_tile, crop_tile, plan_tiles, shift_for, tile_weights

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileConfig:
    """How a tiled denoiser cuts the canvas (latent pixels)."""

    tile: tuple[int, int] = (64, 64)
    overlap: int = 4
    tile_batch: int = 1
    weighting: Weighting = Weighting.GAUSSIAN
    margin: Optional[int] = None  # zero-weight border at inner tile edges; default overlap // 4
    shift: bool = False  # move the grid between steps (free on wrapping axes; one extra tile row otherwise).
    # Off by default: on a smooth test model the last step's seams dominate and shifting made them stronger.
    wrap_y: bool = False
    wrap_x: bool = False
    min_tile: int = 16
    multiple: int = 8  # tile sizes the network accepts (its total downsampling)
    align: int = 1  # tile origins are multiples of this (latent pixels; T2I-Adapter features need their cells)


def is_out_of_memory(err: BaseException) -> bool:
    """torch.OutOfMemoryError, or the RuntimeError a CPU (or older torch) raises when allocation fails."""
    import torch

    if isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "failed to allocate" in text)


class TiledDenoiser:
    """Wraps `denoise(x, sigma, cond) -> x0` so that it runs in overlapping tiles and fuses the results."""

    def __init__(self, inner: Callable, config: TileConfig = TileConfig()):
        self.inner = inner
        self.config = config
        self._weights: dict[TilePlan, list] = {}
        self.tiles_run = 0  # network batch items processed (for work accounting)
        self.pixels_run = 0

    def plan(self, height: int, width: int, sigma: Optional["Tensor"] = None) -> TilePlan:
        """The plan for a canvas; with `shift`, the grid offset follows the call's noise level."""
        cfg = self.config
        shift = (0, 0)
        if cfg.shift and sigma is not None:
            level = float(sigma.reshape(-1)[0])  # a device sync, only when shifting
            shift = (shift_for(cfg.tile[0] - cfg.overlap, level), shift_for(cfg.tile[1] - cfg.overlap, level * 1.618))
        return plan_tiles(height, width, cfg.tile, cfg.overlap, wrap_y=cfg.wrap_y, wrap_x=cfg.wrap_x,
                          margin=cfg.margin, shift=shift, align=cfg.align)

    def __call__(self, x: "Tensor", sigma: "Tensor", cond=None) -> "Tensor":
        while True:
            plan = self.plan(x.shape[-2], x.shape[-1], sigma)
            if plan.single:
                self._count(x.shape[0], x.shape[-2] * x.shape[-1])
                return self.inner(x, sigma, cond)
            try:
                return self._fused(plan, x, sigma, cond)
            except Exception as err:  # noqa: BLE001 - only out-of-memory is retried, the rest re-raised
                if not is_out_of_memory(err):
                    raise
                self._shrink(err)

    def _fused(self, plan: TilePlan, x: "Tensor", sigma: "Tensor", cond) -> "Tensor":
        import torch

        out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        for rect, value, _rest in self._weighted_tiles(plan, x, sigma, cond, out.dtype):
            add_tile(out, rect, value, plan)
        return out.to(x.dtype)

    def stream(self, x: "Tensor", sigma: "Tensor", cond: Cond | Guided | None, emit: Callable[["Tensor", int], None]
               ) -> None:
        """What `__call__` returns, handed to `emit(rows, top)` band by band as the tiles finish them (rows no
        remaining tile adds to), in order, each row once: the canvas is never held whole, only the rows tiles
        still add to. The same tiles, weights and additions in the same order: the same values bit for bit.
        For canvases that do not wrap vertically; an out-of-memory error is not retried (rows already went out)."""
        plan = self.plan(x.shape[-2], x.shape[-1], sigma)
        if plan.wrap_y:
            raise ValueError("a vertically wrapping canvas cannot be streamed by rows")
        band = _RowBand(x, emit)
        for rect, value, rest in self._weighted_tiles(plan, x, sigma, cond, band.dtype):
            band.add(rect, value, plan)
            if rest is not None:  # a chunk's last tile: rows above every later tile are final
                band.flush(min((r.top for r in rest), default=plan.height))

    def _weighted_tiles(self, plan: TilePlan, x: "Tensor", sigma: "Tensor", cond, dtype):
        """(rect, weighted x0 prediction, tiles still to come or None) per tile, in the plan's order, the network
        run on `tile_batch` tiles at a time; the third item is given at the last tile of each network call."""
        import torch

        weights = self._plan_weights(plan, x.device)
        rects, step = plan.tiles, self.config.tile_batch
        for first in range(0, len(rects), step):
            chunk = rects[first : first + step]
            crops = torch.cat([crop_tile(x, rect, plan) for rect in chunk])  # (k*B, C, th, tw), tile-major
            tile_cond = _repeat(_crop_cond(cond, chunk, plan, x.shape[-2:]), chunk, (plan.height, plan.width))
            pred = self.inner(crops, sigma.repeat(len(chunk)), tile_cond)
            self._count(crops.shape[0], crops.shape[-2] * crops.shape[-1])
            for index, rect in enumerate(chunk):
                part = pred[index * x.shape[0] : (index + 1) * x.shape[0]]
                last = index == len(chunk) - 1
                yield rect, part.to(dtype) * weights[first + index], rects[first + step :] if last else None

    def _plan_weights(self, plan: TilePlan, device) -> list:
        if plan not in self._weights:
            self._weights[plan] = [w.to(device) for w in tile_weights(plan, self.config.weighting)]
        return self._weights[plan]

    def _count(self, items: int, pixels: int) -> None:
        self.tiles_run += items
        self.pixels_run += items * pixels

    def _shrink(self, err: BaseException) -> None:
        cfg = self.config
        if cfg.tile_batch > 1:
            new = replace(cfg, tile_batch=cfg.tile_batch // 2)
        else:
            tile = tuple(max(cfg.min_tile, int(t * 0.75) // cfg.multiple * cfg.multiple) for t in cfg.tile)
            if tile == cfg.tile:
                raise err
            overlap = min(cfg.overlap, min(tile) // 4)
            new = replace(cfg, tile=tile, overlap=overlap)
        log.warning("out of memory with tiles %s x%d; retrying with %s x%d", cfg.tile, cfg.tile_batch,
                    new.tile, new.tile_batch)
        self.config = new
        self._weights.clear()
        _empty_cache()


class _RowBand:
    """The rows [top, top + rows) of a (B, C, H, W) canvas that tiles still add to, zeros where none has yet."""

    def __init__(self, x: "Tensor", emit: Callable[["Tensor", int], None]):
        import torch

        self.dtype = torch.promote_types(x.dtype, torch.float32)
        self.rows = x.new_zeros((*x.shape[:-2], 0, x.shape[-1]), dtype=self.dtype)
        self.top, self.emit = 0, emit

    def add(self, rect: Rect, value: "Tensor", plan: TilePlan) -> None:
        missing = rect.top + rect.height - (self.top + self.rows.shape[-2])
        if missing > 0:
            import torch

            grown = self.rows.new_zeros((*self.rows.shape[:-2], missing, self.rows.shape[-1]))
            self.rows = torch.cat([self.rows, grown], dim=-2)
        add_tile(self.rows, replace(rect, top=rect.top - self.top), value, plan)

    def flush(self, final: int) -> None:
        """Hand out the rows above `final` (no tile left adds to them) and drop them."""
        done = min(final, self.top + self.rows.shape[-2]) - self.top
        if done > 0:
            self.emit(self.rows[..., :done, :], self.top)
            self.rows = self.rows[..., done:, :].clone()
            self.top += done


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _crop_cond(cond, chunk, plan: TilePlan, canvas_hw):
    """Conditioning for a chunk of tiles: spatial fields cut per tile and stacked tile-major."""
    if cond is None:
        return None
    import torch

    def cut(field: "Tensor") -> "Tensor":
        if tuple(field.shape[-2:]) != tuple(canvas_hw):
            raise ValueError(f"spatial conditioning of size {tuple(field.shape[-2:])} does not match the "
                             f"latent canvas {tuple(canvas_hw)}")
        return torch.cat([crop_tile(field, rect, plan) for rect in chunk])

    return cond.map_spatial(cut)


def _repeat(cond, chunk, canvas_hw):
    """Non-spatial fields repeated tile-major (or, for `tile_crossattn`, made per tile); spatial fields were
    already stacked by `_crop_cond`."""
    if cond is None:
        return cond
    if isinstance(cond, Guided):
        uncond = None if cond.uncond is None else _repeat(cond.uncond, chunk, canvas_hw)
        return Guided(_repeat(cond.cond, chunk, canvas_hw), uncond, cond.scale)
    if not isinstance(cond, Cond):
        raise TypeError(f"cannot tile conditioning of type {type(cond).__name__}")
    times = len(chunk)
    if cond.tile_crossattn is not None:
        import torch

        crossattn = torch.cat([cond.tile_crossattn((r.top, r.left, r.height, r.width), canvas_hw) for r in chunk])
    elif times == 1:
        return cond
    else:
        crossattn = None if cond.crossattn is None else _repeat_batch(cond.crossattn, times)
    y, scale = (t if t is None or times == 1 else _repeat_batch(t, times) for t in (cond.y, cond.control_scale))
    return Cond(crossattn=crossattn, concat=cond.concat, y=y, control=cond.control, control_scale=scale,
                adapter=cond.adapter, position=cond.position)


def _repeat_batch(t: "Tensor", times: int) -> "Tensor":
    return t.repeat(times, *([1] * (t.dim() - 1)))
