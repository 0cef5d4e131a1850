"""Tiled first-stage encode and decode that match the untiled ones, in memory bounded by the tile.

Three things make a tiled autoencoder differ from the untiled one, and each is handled exactly:
  * Convolutions near a tile edge see zero padding: every tile is cut with a halo that covers the
    receptive field of the tiled layers (measured by walking their convolutions), and only its core
    (the cores partition the canvas) is kept. At the canvas border the tile ends where the canvas does,
    so the padding there is the same as untiled.
  * GroupNorm statistics are global: they are gathered exactly, in *streaming passes*. Pass k runs
    every tile up to the first GroupNorm whose statistics are still unknown, adds the per-group moments
    of its input over the tile's core (`Moments`: float32 per tile, merged in float64), and stops; after
    the pass that norm's global mean and variance are known and the next pass normalises with them. The
    last pass produces the output.
  * Attention is global: an attention stage (the middle block's, at latent resolution) is not cut
    into tiles. Its GroupNorm statistics, keys and values are computed chunk by chunk from the whole
    latent-resolution input (kept off-device), and each chunk of queries attends to all keys block by
    block with an online softmax, so the device holds one chunk at a time. The stages before and
    after it are streamed as above.

Trade-off: streaming recomputes the tiled layers up to each GroupNorm once per norm (about 20 in an f8
decoder). To cut that, the boundary before the stage holding the next unknown norm is *checkpointed*
(kept whole: on `store_device` when small, else in an unlinked temporary file read and written with
`pread`/`pwrite`, see `FileCanvas`) whenever it fits `store_bytes`; later passes start from it, with a
halo that only covers what they run. Convolution work over the untiled decode, SD's f8 KL autoencoder in
fp32, 64-latent tiles (benchmarks/tiled_work.py, `vae_work`, exact counts):

    output     decode: store 0 / 1 GiB / 4 GiB      encode: store 0 / 1 GiB / 4 GiB
    1024^2          16.9 / 1.42 / 1.42                  13.5 / 1.50 / 1.50
    2048^2          19.9 / 4.06 / 1.44                  14.8 / 1.83 / 1.52
    4096^2          21.5 / 15.2 / 4.10                  15.4 / 3.79 / 1.85

Device memory is that of one tile (or one attention chunk) whatever the budget. Host memory is one tile
plus checkpoints up to `spill_bytes` (64 MiB) each, the latent-size source, the attention keys and
values at latent resolution, and the output canvas, which the caller may replace (`output=`: the
pipelines write uint8 pixels tile by tile). Larger checkpoints live in the page cache and on disk (the
default budget is half the spill folder's free space); the last pass never stores one.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Callable, Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmtool.errors import ItemError
from ldmtool.tiling.fusion import is_out_of_memory

log = logging.getLogger(__name__)


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


@dataclass
class Stage:
    """One step of the reference forward: `run(h)`, its modules, and its output/input resolution."""

    name: str
    run: Callable[[Tensor], Tensor]
    modules: list
    scale: Fraction = Fraction(1)

    @property
    def has_attention(self) -> bool:
        return any("attn" in type(m).__name__.lower() or "attention" in type(m).__name__.lower()
                   for module in self.modules for m in module.modules())


def _resnet_and_attention(prefix: str, level, count: int) -> list[Stage]:
    stages = []
    for i in range(count):
        stages.append(Stage(f"{prefix}.block.{i}", level.block[i], [level.block[i]]))
        if len(level.attn) > 0:
            stages.append(Stage(f"{prefix}.attn.{i}", level.attn[i], [level.attn[i]]))
    return stages


def _mid(net) -> list[Stage]:
    return [Stage(f"mid.{name}", getattr(net.mid, name), [getattr(net.mid, name)]) for name in ("block_1", "attn_1", "block_2")]


def decoder_stages(decoder: nn.Module) -> list[Stage]:
    """The reference `Decoder.forward` as a list of stages over the decoder's own modules."""
    stages = [Stage("conv_in", decoder.conv_in, [decoder.conv_in]), *_mid(decoder)]
    for i_level in reversed(range(decoder.num_resolutions)):
        up = decoder.up[i_level]
        stages += _resnet_and_attention(f"up.{i_level}", up, len(up.block))
        if i_level != 0:
            stages.append(Stage(f"up.{i_level}.upsample", up.upsample, [up.upsample], Fraction(2)))
    if not getattr(decoder, "give_pre_end", False):
        tanh = getattr(decoder, "tanh_out", False)

        def head(h: Tensor) -> Tensor:
            h = decoder.conv_out(F.silu(decoder.norm_out(h)))
            return torch.tanh(h) if tanh else h

        stages.append(Stage("out", head, [decoder.norm_out, decoder.conv_out]))
    return stages


def encoder_stages(encoder: nn.Module) -> list[Stage]:
    """The reference `Encoder.forward` as a list of stages over the encoder's own modules."""
    stages = [Stage("conv_in", encoder.conv_in, [encoder.conv_in])]
    for i_level in range(encoder.num_resolutions):
        down = encoder.down[i_level]
        stages += _resnet_and_attention(f"down.{i_level}", down, len(down.block))
        if i_level != encoder.num_resolutions - 1:
            stages.append(Stage(f"down.{i_level}.downsample", down.downsample, [down.downsample], Fraction(1, 2)))
    stages += _mid(encoder)

    def head(h: Tensor) -> Tensor:
        return encoder.conv_out(F.silu(encoder.norm_out(h)))

    stages.append(Stage("out", head, [encoder.norm_out, encoder.conv_out]))
    return stages


def _run(stages: list[Stage], h: Tensor) -> Tensor:
    for stage in stages:
        h = stage.run(h)
    return h


# ---------------------------------------------------------------------------------------------------
# Public entry points


@torch.no_grad()
def tiled_decode(first_stage: nn.Module, z: Tensor, config: VAETiling = VAETiling(),
                 output: Optional["CanvasFactory"] = None):
    """`first_stage.decode(z)` computed in tiles of `config.tile` latent pixels (same result within 1/255).

    `output` receives the decoded tiles (see `CanvasFactory`); by default they are assembled into one
    tensor on `z`'s device. A caller that wants, say, uint8 pixels gives a canvas that converts each tile,
    so the full-size float image never exists. Returns `output`'s `result()`.
    """
    if hasattr(first_stage, "quantize"):
        z = _quantize_in_rows(first_stage.quantize, z)
    h = first_stage.post_quant_conv(z)  # 1x1 to z_channels: as small as the latent
    result = run_bounded(decoder_stages(first_stage.decoder), h, config, output)
    return result.to(z.device) if output is None else result


@torch.no_grad()
def tiled_encode(first_stage: nn.Module, x: Tensor, config: VAETiling = VAETiling(tile=512)) -> Tensor:
    """`first_stage.encode(x)` (unscaled latent) computed in tiles of `config.tile` image pixels."""
    stages = encoder_stages(first_stage.encoder)
    align = 2 ** sum(stage.scale < 1 for stage in stages)
    if x.shape[-2] % align or x.shape[-1] % align:
        raise ItemError(f"image of {x.shape[-1]}x{x.shape[-2]} pixels cannot be encoded in tiles; "
                        f"its sides must be multiples of {align}")
    h = run_bounded(stages, x, config).to(x.device)
    moments = first_stage.quant_conv(h)  # 1x1 on the latent moments
    if hasattr(first_stage, "quantize"):
        return moments
    return torch.chunk(moments, 2, dim=1)[0]


@torch.no_grad()
def run_bounded(stages: list[Stage], source: Tensor, config: VAETiling, output: Optional["CanvasFactory"] = None):
    """`_run(stages, source)` in device memory bounded by the tile: runs of attention-free stages are
    streamed in tiles; attention stages run in query chunks against keys and values kept off-device.

    `config.tile` is in pixels of `source`; later runs get the same tile in their own pixels. The last
    run's tiles go to `output` (default: a tensor on the store device), whose `result()` is returned.
    """
    h, scale, run, run_scale = source, Fraction(1), [], Fraction(1)
    for stage in stages:
        if stage.has_attention:
            h = _stream_run(run, h, config, run_scale)
            run = []
            h = attention_stage(stage, h, replace(config, tile=_scaled_tile(config, scale)))
        else:
            if not run:
                run_scale = scale
            run.append(stage)
        scale *= stage.scale
    if not run:
        return h if output is None else _whole(output, h)
    return _stream_run(run, h, config, run_scale, output)


def _whole(output: "CanvasFactory", h: Tensor):
    canvas = output(h.shape, h.dtype)
    canvas.paste(h, 0, 0)
    return canvas.result()


def _scaled_tile(config: VAETiling, scale: Fraction) -> int:
    return max(1, int(config.tile * scale))


def _stream_run(run: list[Stage], h: Tensor, config: VAETiling, scale: Fraction, output=None):
    return _stream_retrying(run, h, replace(config, tile=_scaled_tile(config, scale)), output) if run else h


def _stream_retrying(stages: list[Stage], source: Tensor, config: VAETiling, output=None):
    """`stream_stages`, restarted with half the tile after an out-of-memory error (down to `min_tile`)."""
    while True:
        try:
            return stream_stages(stages, source, config, output)
        except Exception as err:  # noqa: BLE001 - only out-of-memory is retried
            if not is_out_of_memory(err) or config.tile // 2 < config.min_tile:
                raise
            log.warning("out of memory decoding tiles of %d pixels; retrying with %d", config.tile, config.tile // 2)
            config = replace(config, tile=config.tile // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _quantize_in_rows(quantize: nn.Module, z: Tensor, pixels: int = 4096) -> Tensor:
    """Nearest-codebook quantization, a few latent rows at a time (its distance matrix grows with the image)."""
    rows = max(1, pixels // max(1, z.shape[-1]))
    return torch.cat([quantize(z[..., i : i + rows, :])[0] for i in range(0, z.shape[-2], rows)], dim=-2)


# ---------------------------------------------------------------------------------------------------
# Attention in chunks (the reference AttnBlock: GroupNorm, 1x1 q/k/v, single-head softmax, proj_out, residual)


@torch.no_grad()
def attention_stage(stage: Stage, x: Tensor, config: VAETiling, query_tokens: int = 2**13,
                    key_tokens: int = 2**12) -> Tensor:
    """An attention stage over the whole (off-device) canvas `x`, with bounded device memory.

    GroupNorm statistics are gathered chunk by chunk (float64); keys and values are computed per chunk and
    kept on `x`'s device; each chunk of queries attends to them block by block with an online softmax.
    Modules that do not look like the reference AttnBlock run whole on their device.
    """
    block = stage.modules[0]
    device, dtype = _device_dtype([stage], x)
    if not all(hasattr(block, name) for name in ("norm", "q", "k", "v", "proj_out")):
        return stage.run(x.to(device=device, dtype=dtype)).to(x.device)
    rows = max(1, query_tokens // x.shape[-1])
    chunks = [(r, min(r + rows, x.shape[-2])) for r in range(0, x.shape[-2], rows)]
    load = lambda r0, r1: x[..., r0:r1, :].to(device=device, dtype=dtype)  # noqa: E731
    stats = _chunked_group_stats(block.norm, (load(r0, r1) for r0, r1 in chunks))
    tokens = lambda conv, h: conv(h).flatten(2).transpose(1, 2)  # (B, n, C)  # noqa: E731
    keys, values = [], []
    for r0, r1 in chunks:
        h = group_norm(load(r0, r1), block.norm, *stats)
        keys.append(tokens(block.k, h).to(x.device))
        values.append(tokens(block.v, h).to(x.device))
    keys, values = torch.cat(keys, 1), torch.cat(values, 1)
    out = torch.empty_like(x)
    for r0, r1 in chunks:
        xc = load(r0, r1)
        attended = online_softmax_attention(tokens(block.q, group_norm(xc, block.norm, *stats)), keys, values,
                                            key_tokens)
        b, c, height, width = xc.shape
        projected = block.proj_out(attended.transpose(1, 2).reshape(b, c, height, width))
        out[..., r0:r1, :] = (xc + projected).to(x.device)
    return out


def online_softmax_attention(q: Tensor, keys: Tensor, values: Tensor, block: int) -> Tensor:
    """softmax(q k^T / sqrt(C)) v for q (B, n, C) on the device, keys/values (B, N, C) anywhere, in key blocks.

    Scores and the running maximum, normaliser and sum are float32, so fp16 models cannot overflow here.
    """
    q32 = q.float() * q.shape[-1] ** -0.5
    running_max = q32.new_full(q32.shape[:2], float("-inf"))
    normaliser = q32.new_zeros(q32.shape[:2])
    total = torch.zeros_like(q32)
    for k0 in range(0, keys.shape[1], block):
        k_block = keys[:, k0 : k0 + block].to(q.device, torch.float32)
        v_block = values[:, k0 : k0 + block].to(q.device, torch.float32)
        weights = q32 @ k_block.transpose(1, 2)  # (B, n, block) scores, made weights in place below
        new_max = torch.maximum(running_max, weights.amax(-1))
        weights.sub_(new_max[..., None]).exp_()  # in place: one (n, block) buffer instead of three
        correction = torch.exp(running_max - new_max)
        normaliser = normaliser * correction + weights.sum(-1)
        total = total * correction[..., None] + weights @ v_block
        running_max = new_max
    return (total / normaliser[..., None]).to(q.dtype)


def _chunked_group_stats(norm: nn.GroupNorm, chunks) -> tuple[Tensor, Tensor]:
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


# ---------------------------------------------------------------------------------------------------
# Streaming passes


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


def _wrapped_runs(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) taken modulo `size` as contiguous (begin, end) runs inside [0, size)."""
    runs, position = [], start
    while position < stop:
        begin = position % size
        end = min(size, begin + (stop - position))
        runs.append((begin, end))
        position += end - begin
    return runs


# ---------------------------------------------------------------------------------------------------
# Canvases: full-size feature maps that tiles are cut from and pasted into


class TensorCanvas:
    """A (B, C, H, W) feature map held as one tensor (on the store device, or anywhere for a source)."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor

    @classmethod
    def empty(cls, shape, dtype, device) -> "TensorCanvas":
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
    """Stands in for the forward of every GroupNorm of the tiled stages: normalise with global statistics,
    or gather the target's statistics over the tile's core and stop the tile."""

    stats: dict = field(default_factory=dict)  # norm -> (mean, rstd), (B, G) float32
    target: Optional[nn.Module] = None
    window: Optional[_Window] = None
    moments: Optional[Moments] = None  # gathered so far for the target
    active: bool = True

    def forward(self, module: nn.GroupNorm, original: Callable, x: Tensor) -> Tensor:
        if not self.active:
            return original(x)
        if module is self.target:
            rows, cols = self.window.core_at(x.shape[-2], x.shape[-1])
            self.moments = Moments.of(x[..., rows, cols], module.num_groups).merge(self.moments)
            raise _Stop
        if module in self.stats:
            return group_norm(x, module, *self.stats[module])
        return original(x)

    def finish_target(self) -> None:
        self.stats[self.target] = self.moments.mean_rstd(self.target.eps)
        self.target, self.moments = None, None


@torch.no_grad()
def stream_stages(stages: list[Stage], source: Tensor, config: VAETiling, output: Optional[CanvasFactory] = None):
    """`_run(stages, source)` computed tile by tile with global GroupNorm statistics.

    Axes the stages' convolutions wrap around (seamless mode) are tiled with wrapped halos. Checkpoints
    live on `config.store_device` or, when large, in a spill file; tiles run on the device of the stages'
    parameters. The result goes to `output` (default: a tensor on the store device) and its `result()`
    is returned. Stages must be free of attention (it needs the whole canvas: see `attention_stage`).
    """
    if any(stage.has_attention for stage in stages):
        raise ValueError("stages with attention cannot be tiled")
    if not stages:
        return source
    device, dtype = _device_dtype(stages, source)
    wrap = _seamless_axes(stages)
    control = _NormControl()
    handles = _install(stages, control)
    store = torch.device(config.store_device)
    source = TensorCanvas(source.to(store))
    try:
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
            make = _checkpoint_factory(config, store)
            result = _pass(stages[start:], source, windows, control, checkpoint, device, dtype, make)
            control.finish_target()
            if checkpoint is not None:
                scale *= probe.boundary[checkpoint][1]
                _close(source)
                source, start = result, start + checkpoint
    finally:
        _close(source)
        for handle in handles:
            handle.remove()


def _close(canvas) -> None:
    if isinstance(canvas, FileCanvas):
        canvas.close()


def _device_dtype(stages: list[Stage], source: Tensor):
    for stage in stages:
        for module in stage.modules:
            for p in module.parameters():
                return p.device, p.dtype
    return source.device, source.dtype


@dataclass
class _Override:
    """`control.forward` installed as one GroupNorm's forward; `remove()` restores the class's own."""

    module: nn.Module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def _install(stages: list[Stage], control: _NormControl) -> list:
    """Routes every GroupNorm of the stages through `control` (an instance attribute shadows the class's
    forward, so the module's own normalisation is not computed and then discarded)."""
    handles = []
    for stage in stages:
        for m in (mm for module in stage.modules for mm in module.modules()):
            if isinstance(m, nn.GroupNorm) and "forward" not in m.__dict__:
                m.forward = functools.partial(control.forward, m, m.forward)
                handles.append(_Override(m))
    return handles


def _spills(config: VAETiling, store: torch.device) -> bool:
    return config.spill_bytes is not None and store.type == "cpu"


def _checkpoint_factory(config: VAETiling, store: torch.device) -> Callable:
    def make(shape, dtype):
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if _spills(config, store) and nbytes > config.spill_bytes:
            return FileCanvas(shape, dtype, config.spill_dir)
        return TensorCanvas.empty(shape, dtype, store)

    return make


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
    return index if nbytes <= _store_budget(config, store, nbytes) else None


def _store_budget(config: VAETiling, store: torch.device, nbytes: int) -> int:
    if config.store_bytes is not None:
        return config.store_bytes
    if _spills(config, store) and nbytes > config.spill_bytes:
        return shutil.disk_usage(config.spill_dir or tempfile.gettempdir()).free // 2
    return default_store_bytes(store)


def default_store_bytes(device: torch.device) -> int:
    from ldmtool.tiling.memory import free_memory

    if device.type == "meta":
        return 4 * 2**30
    return min(4 * 2**30, free_memory(device) // 4)


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
