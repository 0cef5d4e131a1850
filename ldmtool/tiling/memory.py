"""Tile size and tile batch from a memory budget (`--tile`, `--tile-overlap`, `--max-memory`).

The activation memory of a UNet forward grows linearly with the pixels it sees (convolutions) and, where
attention is materialised, with their square. `UNetMemory` is a deliberately conservative estimate of
both; an out-of-memory error during sampling still makes the tiled denoiser retry with smaller tiles.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Optional

from ldmtool.errors import UsageError
from ldmtool.runtime.device import available_host_memory
from ldmtool.tiling.planner import fit_tile

if TYPE_CHECKING:
    import torch

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_memory(text: str) -> int:
    """Bytes from '4GB', '512MiB', '1.5g' or a plain number of bytes (K/M/G/T are powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise UsageError(f"--max-memory {text!r} is not a size; write it like 4GB, 512MB or 1.5GiB")
    value = int(Fraction(match.group(1)) * _UNITS[unit])  # exact: no float rounding or overflow
    if value <= 0:
        raise UsageError(f"--max-memory {text!r} must be more than zero")
    return value


def free_memory(device: "torch.device") -> int:
    """Bytes the device can still allocate (CPU: the system's available memory)."""
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    return available_host_memory()


@dataclass(frozen=True)
class UNetMemory:
    """Activation bytes of one UNet forward, per batch item, as a function of the latent tile area.

    `per_pixel`: bytes per latent pixel (live feature maps at full resolution, about 40 tensors of
    `channels` values); `attention`: bytes per squared latent pixel for materialised self-attention at the
    full-resolution level (0 when the device uses memory-efficient attention).
    """

    channels: int = 320
    dtype_bytes: int = 2
    heads: int = 8
    materialised_attention: bool = True

    def bytes_for(self, tile_pixels: int, batch: int) -> int:
        linear = 40 * self.channels * self.dtype_bytes * tile_pixels
        quadratic = self.heads * self.dtype_bytes * tile_pixels**2 if self.materialised_attention else 0
        return batch * (linear + quadratic)


@dataclass(frozen=True)
class Tiling:
    """The tiling a run uses: tile (h, w) in latent pixels, overlap, and tiles per network call."""

    tile: tuple[int, int]
    overlap: int
    tile_batch: int


def default_overlap(tile: int) -> int:
    """A sixteenth of the tile (4 latent pixels at 64): total work stays near 1.12x of the untiled work.

    Over every square latent canvas from 64 to 2100 (multiples of 8), native tile 64 (tiles up to 96):
    mean 1.12x, at most 1.27x (128, 192); benchmarks/tiled_work.py prints it per size.
    """
    return max(2, (tile // 16) // 2 * 2)


def check_tile(tile: Optional[int], overlap: Optional[int] = None, multiple: int = 8) -> None:
    """UsageError for a `--tile` no network can take, or an overlap not smaller than the tile (the Engine
    checks the options when a command starts; choose_tiling checks the tile it picked per canvas)."""
    if tile is not None and 0 < tile < multiple:
        raise UsageError(f"--tile {tile} is too small; use 0 (off) or at least {multiple} latent pixels")
    rounded = (tile or 0) // multiple * multiple
    if tile and overlap is not None and overlap >= rounded:
        said = f"{rounded} latent pixels" + (f": --tile {tile} rounded down to a multiple of {multiple}" if rounded != tile else "")
        raise UsageError(f"--tile-overlap {overlap} must be smaller than the tile ({said})")


def choose_tiling(
    latent_hw: tuple[int, int],
    *,
    native_tile: int,
    items: int = 1,
    tile: Optional[int] = None,
    overlap: Optional[int] = None,
    budget: Optional[int] = None,
    memory: UNetMemory = UNetMemory(),
    multiple: int = 8,
    wrap: tuple[bool, bool] = (False, False),
    device: Optional["torch.device"] = None,
) -> Optional[Tiling]:
    """The tiling for a canvas, or None when it runs untiled.

    Untiled: `tile=0`; a canvas within one tile; or, without `--tile`, a canvas whose untiled forward fits
    the budget (`--max-memory`, else 80% of `device`'s free memory; with neither, only the tile rule
    applies). `native_tile` is the latent size the model was trained at; without `--tile` the tile is the
    largest multiple of `multiple` up to it that fits the budget, then trimmed per axis to cover the canvas
    with the least work. `items` is the batch the denoiser sees (items x cond/uncond).
    """
    height, width = latent_hw
    if tile == 0:
        return None
    if budget is None and device is not None:
        budget = int(free_memory(device) * 0.8)
    if tile is None and budget is not None and memory.bytes_for(height * width, items) <= budget:
        return None
    if tile:  # the networks take multiples of `multiple`; check_tile refused anything smaller
        tile = max(multiple, tile // multiple * multiple)
    size = tile or largest_tile(native_tile, items, budget, memory, multiple)
    # Without --tile, tiles may grow to 1.5x native where that saves a row of tiles (never past the budget).
    # At 1.25x, canvases just above two tiles (e.g. 96 = 2 x 56 - 4) cost 1.36x the untiled work; at 1.5x
    # no canvas costs more than 1.27x.
    upper = tile or largest_tile(native_tile * 3 // 2, items, budget, memory, multiple)
    overlap = default_overlap(size) if overlap is None else overlap
    check_tile(size, overlap, multiple)  # an automatic tile's overlap can only be checked here, per canvas
    if height <= upper and width <= upper:
        return None
    tile_hw = (
        fit_tile(height, upper, overlap, multiple=multiple, wrap=wrap[0], preferred=size),
        fit_tile(width, upper, overlap, multiple=multiple, wrap=wrap[1], preferred=size),
    )
    per_call = memory.bytes_for(tile_hw[0] * tile_hw[1], items)
    tile_batch = max(1, min(16, budget // per_call)) if budget else 1
    return Tiling(tile_hw, overlap, int(tile_batch))


def largest_tile(native_tile: int, items: int, budget: Optional[int], memory: UNetMemory, multiple: int) -> int:
    size = max(multiple, native_tile // multiple * multiple)
    if budget is None:
        return size
    while size > multiple and memory.bytes_for(size * size, items) > budget:
        size -= multiple
    return size


def tiles_across_the_wrap(tiling: Optional[Tiling], latent_hw: tuple[int, int], wrap: tuple[bool, bool], *,
                          patch: int, overlap: Optional[int] = None) -> Tiling:
    """`tiling` with every wrapped axis cut into tiles shorter than the canvas, so that some tile crosses the wrap
    edge: a network without padded convolutions (a transformer) is seamless only through such tiles. Where a tile
    covers a wrapped axis, it becomes about half the axis in whole `patch`es; overlaps are whole patches too."""
    tile = tiling.tile if tiling is not None else latent_hw
    sizes = tuple(max(2 * patch, length // 2 // patch * patch) if wrapped and size >= length else size
                  for size, length, wrapped in zip(tile, latent_hw, wrap))
    if tiling is not None:
        overlap = tiling.overlap
    elif overlap is None:
        overlap = default_overlap(min(sizes))
    overlap = -(-overlap // patch) * patch
    for size, length, wrapped in zip(sizes, latent_hw, wrap):
        if wrapped and (size >= length or overlap >= size):
            raise UsageError(f"--seamless: a canvas {length} latent pixels across wraps through tiles smaller than "
                             f"it that overlap by {overlap}; make the image at least {2 * (overlap + patch)} latent "
                             "pixels across, or give a smaller --tile-overlap")
    return Tiling((sizes[0], sizes[1]), overlap, tiling.tile_batch if tiling is not None else 1)
