"""Where the tiled passes keep full-size feature maps (the source, checkpoints, the output): canvases in
memory or in an unlinked spill file, and the budget (`VAETiling`) that decides which."""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class VAETiling:
    """Tile core size in pixels of the tiled section's input, and where checkpoints are kept.

    A checkpoint larger than `spill_bytes` goes to an unlinked temporary file in `spill_dir` (default: the
    system's temporary folder) instead of memory, so host memory stays bounded by the tile whatever the
    image size; the file is written and read with plain file I/O, never mapped, so it is not part of the
    process's resident memory. `spill_bytes=None` keeps every checkpoint in memory.
    """

    tile: int = 64
    # Largest checkpoint kept. None: half the free space of `spill_dir` when spilling, otherwise
    # min(4 GiB, a quarter of the store device's free memory). 0 keeps none (recompute: slower, same result).
    store_bytes: Optional[int] = None
    store_device: str = "cpu"
    spill_bytes: Optional[int] = 64 * 2**20
    spill_dir: Optional[str] = None
    min_tile: int = 8  # out-of-memory retries halve the tile down to this


class TensorCanvas:
    """A (B, C, H, W) feature map held as one tensor (on the store device, or anywhere for a source)."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor

    @classmethod
    def empty(cls, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> "TensorCanvas":
        return cls(torch.empty(*shape, dtype=dtype, device=device))

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def crop(self, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        """Rows [y0, y1) and columns [x0, x1), taken modulo the size where they leave it (seamless)."""
        height, width = self.shape[-2:]
        if 0 <= y0 and y1 <= height and 0 <= x0 and x1 <= width:
            return self.tensor[..., y0:y1, x0:x1]
        rows = torch.arange(y0, y1) % height
        cols = torch.arange(x0, x1) % width
        return self.tensor.index_select(-2, rows.to(self.device)).index_select(-1, cols.to(self.device))

    def paste(self, tile: Tensor, top: int, left: int) -> None:
        self.tensor[..., top : top + tile.shape[-2], left : left + tile.shape[-1]] = tile.to(self.device)

    def result(self) -> Tensor:
        return self.tensor


class PixelCanvas:
    """Receives decoded tiles (B, 3, h, w) in [-1, 1] and keeps them as uint8 pixels (B, H, W, 3); `add(top, left,
    height, width)`, where given, is added to each tile first (a residual model's upscaled input)."""

    def __init__(self, shape: Sequence[int], dtype: Optional[torch.dtype] = None, *,
                 add: Optional[Callable[[int, int, int, int], Tensor]] = None):
        batch, _channels, height, width = shape
        self.pixels = torch.empty(batch, height, width, 3, dtype=torch.uint8)
        self.finite = True
        self.add = add

    def paste(self, tile: Tensor, top: int, left: int) -> None:
        values = tile.float().cpu()
        if self.add is not None:
            values = values + self.add(top, left, tile.shape[-2], tile.shape[-1])
        self.finite = self.finite and bool(torch.isfinite(values).all())
        # The writer's rounding (io.images.to_uint8) on (x + 1) / 2, in the same float32 operations.
        pixels = (((values + 1) / 2).clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)
        self.pixels[:, top : top + tile.shape[-2], left : left + tile.shape[-1]] = pixels.permute(0, 2, 3, 1)

    def result(self) -> "PixelCanvas":
        return self


class PixelSource:
    """An image held as uint8 pixels (H, W, 3) and read as (1, 3, h, w) float32 in [-1, 1] one crop at a time:
    the source of a tiled encode that never makes the full-size float image (a 4096² one is 200 MB).

    `padded` (height, width) is the size the encoder sees: rows and columns past the image repeat its edge,
    as replicate padding would; crops past `padded` wrap around it (seamless), like `TensorCanvas`."""

    def __init__(self, pixels: np.ndarray, padded: tuple[int, int]):
        self.pixels = pixels
        self.shape = torch.Size((1, 3, *padded))
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    def crop(self, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        height, width = self.pixels.shape[:2]
        rows = np.minimum(np.arange(y0, y1) % self.shape[-2], height - 1)
        cols = np.minimum(np.arange(x0, x1) % self.shape[-1], width - 1)
        tile = self.pixels[np.ix_(rows, cols)]
        return torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 127.5 - 1  # arrays.to_model_range


class FileCanvas:
    """A (B, C, H, W) feature map in an unlinked temporary file, laid out (B, H, W, C) so that each row of
    a tile is one contiguous read or write. Plain `pread`/`pwrite`, never a mapping: the data lives in the
    page cache and on disk, not in the process's resident memory. Tiles come back on the CPU."""

    def __init__(self, shape, dtype: torch.dtype, folder: Optional[str] = None):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = torch.device("cpu")
        self._item = torch.empty((), dtype=dtype).element_size()
        self._file = tempfile.TemporaryFile(dir=folder)
        self._file.truncate(self.shape.numel() * self._item)

    def _offset(self, b: int, y: int, x: int) -> int:
        _, channels, height, width = self.shape
        return (((b * height + y) * width + x) * channels) * self._item

    def paste(self, tile: Tensor, top: int, left: int) -> None:
        rows = _bytes_view(tile.detach().to("cpu").permute(0, 2, 3, 1).contiguous())  # (B, h, w, C)
        fd = self._file.fileno()
        for b in range(rows.shape[0]):
            for y in range(rows.shape[1]):
                _write_all(fd, rows[b, y], self._offset(b, top + y, left))

    def crop(self, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        batch, channels, height, width = self.shape
        out = torch.empty(batch, y1 - y0, x1 - x0, channels, dtype=self.dtype)
        rows = _bytes_view(out)
        pixel = channels * self._item
        fd = self._file.fileno()
        for b in range(batch):
            for i, y in enumerate(range(y0, y1)):
                done = 0
                for begin, end in _wrapped_runs(x0, x1, width):
                    into = rows[b, i, done * pixel : (done + end - begin) * pixel]
                    _read_all(fd, into, self._offset(b, y % height, begin))
                    done += end - begin
        return out.permute(0, 3, 1, 2)  # channels-last strides: convolutions take them as they are

    def result(self) -> Tensor:
        return self.crop(0, self.shape[-2], 0, self.shape[-1])

    def close(self) -> None:
        self._file.close()


def _bytes_view(t: Tensor) -> np.ndarray:
    """A writable numpy view of a contiguous CPU tensor as (..., W, C * itemsize) raw bytes."""
    raw = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])
    array = raw.numpy()
    return array.view(np.uint8).reshape(*array.shape[:-2], -1)


def _write_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _read_all(fd: int, into: np.ndarray, offset: int) -> None:
    view = memoryview(into).cast("B")
    while view:
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise OSError(f"short read from a tiled-decode spill file at offset {offset}")
        view, offset = view[got:], offset + got


class CanvasFactory(Protocol):
    """Makes the canvas a pass writes into: `factory(shape, dtype)` -> an object with `paste(tile, top,
    left)` and `result()` (and `crop` where later passes read it back), e.g. `TensorCanvas.empty`-like
    callables, `FileCanvas`, or the pipelines' `PixelCanvas`."""

    def __call__(self, shape, dtype): ...


def _wrapped_runs(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) taken modulo `size` as contiguous (begin, end) runs inside [0, size)."""
    runs, position = [], start
    while position < stop:
        begin = position % size
        end = min(size, begin + (stop - position))
        runs.append((begin, end))
        position += end - begin
    return runs


def close_canvas(canvas: object) -> None:
    if isinstance(canvas, FileCanvas):
        canvas.close()


def _spills(config: VAETiling, store: torch.device) -> bool:
    return config.spill_bytes is not None and store.type == "cpu"


def checkpoint_factory(config: VAETiling, store: torch.device) -> Callable:
    def make(shape, dtype):
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if _spills(config, store) and nbytes > config.spill_bytes:
            return FileCanvas(shape, dtype, config.spill_dir)
        return TensorCanvas.empty(shape, dtype, store)

    return make


def store_budget(config: VAETiling, store: torch.device, nbytes: int) -> int:
    if config.store_bytes is not None:
        return config.store_bytes
    if _spills(config, store) and config.spill_bytes is not None and nbytes > config.spill_bytes:
        return shutil.disk_usage(config.spill_dir or tempfile.gettempdir()).free // 2
    return default_store_bytes(store)


def default_store_bytes(device: torch.device) -> int:
    from ldmtool.tiling.memory import free_memory

    if device.type == "meta":
        return 4 * 2**30
    return min(4 * 2**30, free_memory(device) // 4)
