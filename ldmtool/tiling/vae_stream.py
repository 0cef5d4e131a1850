"""Streaming passes: attention-free stages run tile by tile, with GroupNorm statistics made global one
norm per pass (see `ldmtool.tiling.vae` for the scheme and its costs)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ldmtool.tiling.vae_norms import Moments, group_norm, group_norms_through
from ldmtool.tiling.vae_stages import Stage, device_dtype
from ldmtool.tiling.vae_store import (
    CanvasFactory,
    PixelSource,
    TensorCanvas,
    VAETiling,
    checkpoint_factory,
    close_canvas,
    store_budget,
)


class _Stop(Exception):
    """Ends a tile's forward once the statistics the pass gathers have been added."""


@dataclass(frozen=True)
class _Window:
    """One tile: its core (a cell of the partition) and its crop (core plus halo), in source pixels."""

    core: tuple[int, int, int, int]  # y0, y1, x0, x1
    crop: tuple[int, int, int, int]

    def core_at(self, height: int, width: int) -> tuple[slice, slice]:
        """The core inside a tensor computed from the crop, at that tensor's resolution."""
        cy0, cy1, cx0, cx1 = self.crop
        y0, y1, x0, x1 = self.core
        fy, fx = Fraction(height, cy1 - cy0), Fraction(width, cx1 - cx0)
        bounds = [(y0 - cy0) * fy, (y1 - cy0) * fy, (x0 - cx0) * fx, (x1 - cx0) * fx]
        if any(b.denominator != 1 for b in bounds):
            raise ValueError(f"tile core {self.core} does not align with a {height}x{width} feature map")
        a, b, c, d = (int(v) for v in bounds)
        return slice(a, b), slice(c, d)


@dataclass
class _Probe:
    """What one run over a small input shows: norm order, halo, alignment, boundary shapes."""

    norms: list  # GroupNorm modules in execution order
    norm_stage: dict  # norm -> index of the stage it runs in
    norm_radius: dict  # norm -> receptive-field radius (source pixels) of everything before it
    radius: float  # of all the stages
    align: int
    boundary: list  # per stage index: (channels, scale) of its input

    def halo(self, target) -> int:
        """Halo a pass needs: up to the norm it stops at (statistics passes), or all stages (last pass)."""
        radius = self.radius if target is None else self.norm_radius[target]
        return math.ceil(radius / self.align) * self.align


def _windows(height: int, width: int, tile: int, halo: int, wrap_y: bool, wrap_x: bool) -> list[_Window]:
    """Cores partition the canvas; crops add the halo, clipped at a plain border and wrapped at a seamless one."""
    windows = []
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
            rows = (y0 - halo, y1 + halo) if wrap_y else (max(0, y0 - halo), min(height, y1 + halo))
            cols = (x0 - halo, x1 + halo) if wrap_x else (max(0, x0 - halo), min(width, x1 + halo))
            windows.append(_Window((y0, y1, x0, x1), (*rows, *cols)))
    return windows


def _seamless_axes(stages: list[Stage]) -> tuple[bool, bool]:
    """(wrap_y, wrap_x) as set on the convolutions by seamless mode (`seamless = (x, y)` on each conv)."""
    for stage in stages:
        for module in stage.modules:
            for m in module.modules():
                if isinstance(m, nn.Conv2d) and any(getattr(m, "seamless", (False, False))):
                    wrap_x, wrap_y = m.seamless
                    return bool(wrap_y), bool(wrap_x)
    return False, False


def _crop(source, window: _Window) -> Tensor:
    return source.crop(*window.crop)


def _probe(stages: list[Stage], channels: int, device, dtype) -> _Probe:
    align = 2 ** sum(stage.scale < 1 for stage in stages)
    size = 2 * align
    norms, norm_stage, norm_radius, radius, boundary = [], {}, {}, [0.0], []
    current = [0]

    def on_norm(module, args):
        if module not in norm_stage:
            norms.append(module)
            norm_stage[module] = current[0]
            norm_radius[module] = radius[0]

    def on_conv(module, args):
        scale = args[0].shape[-2] / size
        k = (module.kernel_size[0] - 1) * module.dilation[0]
        radius[0] += (k if module.stride[0] > 1 else k / 2) / scale

    handles = []
    for stage in stages:
        for m in (mm for module in stage.modules for mm in module.modules()):
            if isinstance(m, nn.GroupNorm):
                handles.append(m.register_forward_pre_hook(on_norm))
            elif isinstance(m, nn.Conv2d):
                handles.append(m.register_forward_pre_hook(on_conv))
    try:
        h = torch.zeros(1, channels, size, size, device=device, dtype=dtype)
        for index, stage in enumerate(stages):
            current[0] = index
            boundary.append((h.shape[1], Fraction(h.shape[-2], size)))
            h = stage.run(h)
    finally:
        for handle in handles:
            handle.remove()
    return _Probe(norms, norm_stage, norm_radius, radius[0], align, boundary)


@dataclass
class _NormControl:
    """Takes over every GroupNorm of the tiled stages (see `group_norms_through`): normalise with global
    statistics, or gather the target's statistics over the tile's core and stop the tile."""

    stats: dict = field(default_factory=dict)  # norm -> (mean, rstd), (B, G) float32
    target: Optional[nn.Module] = None
    window: Optional[_Window] = None
    moments: Optional[Moments] = None  # gathered so far for the target
    active: bool = True

    def forward(self, module: nn.GroupNorm, x: Tensor) -> Optional[Tensor]:
        """The norm's output, or None where the norm computes its own (inactive, or statistics unknown)."""
        if not self.active:
            return None
        if module is self.target:
            rows, cols = self.window.core_at(x.shape[-2], x.shape[-1])
            self.moments = Moments.of(x[..., rows, cols], module.num_groups).merge(self.moments)
            raise _Stop
        if module in self.stats:
            return group_norm(x, module, *self.stats[module])
        return None

    def finish_target(self) -> None:
        self.stats[self.target] = self.moments.mean_rstd(self.target.eps)
        self.target, self.moments = None, None


@torch.no_grad()
def stream_stages(stages: list[Stage], source: Tensor | PixelSource, config: VAETiling,
                  output: Optional[CanvasFactory] = None) -> Any:
    """`stages` run in order on `source`, computed tile by tile with global GroupNorm statistics.

    Axes the stages' convolutions wrap around (seamless mode) are tiled with wrapped halos. Checkpoints
    live on `config.store_device` or, when large, in a spill file; tiles run on the device of the stages'
    parameters. The result goes to `output` (default: a tensor on the store device) and its `result()`
    is returned. Stages must be free of attention (it needs the whole canvas: see `attention_stage`).
    """
    if any(stage.has_attention for stage in stages):
        raise ValueError("stages with attention cannot be tiled")
    if not stages:
        return source
    device, dtype = device_dtype(stages, source)
    wrap = _seamless_axes(stages)
    control = _NormControl()
    modules = [m for stage in stages for module in stage.modules for m in module.modules()]
    store = torch.device(config.store_device)
    source = source if isinstance(source, PixelSource) else TensorCanvas(source.to(store))
    try:
        with group_norms_through(control.forward, modules):
            start, scale = 0, Fraction(1)  # first stage still to run, and its resolution over the input's
            while True:
                control.active = False
                probe = _probe(stages[start:], source.shape[1], device, dtype)
                control.active = True
                pending = [n for n in probe.norms if n not in control.stats]
                control.target = pending[0] if pending else None
                checkpoint = _checkpoint_index(probe, control.target, source, config, store)
                # The tile is fixed in input pixels, so a checkpoint at a finer resolution keeps the tile's memory.
                tile = max(probe.align, int(config.tile * scale) // probe.align * probe.align)
                windows = _windows(source.shape[-2], source.shape[-1], tile, probe.halo(control.target), *wrap)
                if control.target is None:
                    make = output or (lambda shape, dtype_: TensorCanvas.empty(shape, dtype_, store))
                    return _pass(stages[start:], source, windows, control, None, device, dtype, make).result()
                make = checkpoint_factory(config, store)
                result = _pass(stages[start:], source, windows, control, checkpoint, device, dtype, make)
                control.finish_target()
                if checkpoint is not None:
                    scale *= probe.boundary[checkpoint][1]
                    close_canvas(source)
                    source, start = result, start + checkpoint
    finally:
        close_canvas(source)


def _checkpoint_index(probe: _Probe, target, source, config: VAETiling, store: torch.device) -> Optional[int]:
    """The stage boundary to store during this pass (the input of the target's stage), if it fits."""
    if target is None:
        return None
    index = probe.norm_stage[target]
    if index == 0:
        return None
    channels, scale = probe.boundary[index]
    pixels = source.shape[-2] * source.shape[-1] * scale * scale
    nbytes = channels * pixels * source.shape[0] * torch.empty((), dtype=source.dtype).element_size()
    return index if nbytes <= store_budget(config, store, nbytes) else None


def _pass(stages, source, windows, control, checkpoint, device, dtype, make):
    """Runs every window; returns the canvas it filled: the checkpoint (statistics passes, None when
    nothing is stored) or the output (last pass)."""
    canvas = None
    for window in windows:
        h = _crop(source, window).to(device=device, dtype=dtype)
        control.window = window
        try:
            for index, stage in enumerate(stages):
                if index == checkpoint:
                    canvas = _paste(canvas, h, window, source, make)
                h = stage.run(h)
        except _Stop:
            continue
        canvas = _paste(canvas, h, window, source, make)
    return canvas


def _paste(canvas, h: Tensor, window: _Window, source, make):
    """Copies the window's core of `h` into the full-size canvas at h's resolution (made on first use)."""
    cy0, cy1, cx0, cx1 = window.crop
    fy, fx = Fraction(h.shape[-2], cy1 - cy0), Fraction(h.shape[-1], cx1 - cx0)
    if canvas is None:
        size = (int(source.shape[-2] * fy), int(source.shape[-1] * fx))
        canvas = make((*h.shape[:2], *size), h.dtype)
    rows, cols = window.core_at(h.shape[-2], h.shape[-1])
    y0, _y1, x0, _x1 = window.core
    canvas.paste(h[..., rows, cols], int(y0 * fy), int(x0 * fx))
    return canvas
