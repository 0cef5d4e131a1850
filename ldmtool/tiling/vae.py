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

This module is the public API. The pieces: `vae_stages` (the reference forward as stages), `vae_stream`
(the streaming passes), `vae_norms` (moments, normalisation with given statistics, the GroupNorm hook),
`vae_attention` (attention in chunks), `vae_store` (canvases, spill files and the store budget).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from fractions import Fraction
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ldmtool.errors import ItemError
from ldmtool.tiling.fusion import is_out_of_memory
from ldmtool.tiling.vae_attention import attention_stage, online_softmax_attention
from ldmtool.tiling.vae_norms import Moments, group_norm
from ldmtool.tiling.vae_stages import Stage, decoder_stages, encoder_stages
from ldmtool.tiling.vae_store import (
    CanvasFactory,
    FileCanvas,
    PixelCanvas,
    PixelSource,
    TensorCanvas,
    VAETiling,
    default_store_bytes,
)
from ldmtool.tiling.vae_stream import stream_stages

# The tiled autoencoder's public names, importable from here whichever module holds them.
__all__ = [
    "CanvasFactory", "FileCanvas", "Moments", "PixelCanvas", "PixelSource", "Stage", "TensorCanvas", "VAETiling", "attention_stage",
    "decoder_stages", "default_store_bytes", "encoder_stages", "group_norm", "online_softmax_attention",
    "run_bounded", "stream_stages", "tiled_decode", "tiled_encode",
]

log = logging.getLogger(__name__)


@torch.no_grad()
def tiled_decode(first_stage: nn.Module, z: Tensor, config: VAETiling = VAETiling(),
                 output: Optional["CanvasFactory"] = None, prepare: Optional[Callable[[Tensor], Tensor]] = None) -> Any:
    """`first_stage.decode(prepare(z))` computed in tiles of `config.tile` latent pixels (same result within 1/255).

    `output` receives the decoded tiles (see `CanvasFactory`); by default they are assembled into one
    tensor on `z`'s device. A caller that wants, say, uint8 pixels gives a canvas that converts each tile,
    so the full-size float image never exists. Returns `output`'s `result()`. `prepare` (elementwise, e.g.
    unscaling) is applied strip by strip for a pointwise first stage, so no latent-sized copy is made.
    """
    if getattr(first_stage, "pointwise", False):
        return _strip_decode(first_stage, z, config.tile, output, prepare)
    if prepare is not None:
        z = prepare(z)
    if hasattr(first_stage, "quantize"):
        z = _quantize_in_rows(first_stage.quantize, z)
    h = first_stage.post_quant_conv(z)  # 1x1 to z_channels: as small as the latent
    result = run_bounded(decoder_stages(first_stage.decoder), h, config, output)
    return result.to(z.device) if output is None else result


@torch.no_grad()
def tiled_encode(first_stage: nn.Module, x: Tensor | PixelSource, config: VAETiling = VAETiling(tile=512)) -> Tensor:
    """`first_stage.encode(x)` (unscaled latent) computed in tiles of `config.tile` image pixels (`x` may be a
    `PixelSource`: uint8 pixels read tile by tile)."""
    if getattr(first_stage, "pointwise", False):
        return _strip_encode(first_stage, x, config.tile)
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
def run_bounded(stages: list[Stage], source: Tensor | PixelSource, config: VAETiling,
                output: Optional["CanvasFactory"] = None) -> Any:
    """`stages` run in order on `source`, in device memory bounded by the tile: runs of attention-free stages are
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


def _strip_decode(first_stage: nn.Module, z: Tensor, rows: int, output: Optional["CanvasFactory"],
                  prepare: Optional[Callable[[Tensor], Tensor]] = None) -> Any:
    """A pointwise first stage's decode, `rows` latent rows at a time: exact, as no cell sees its neighbours."""
    canvas = None
    for top in range(0, z.shape[-2], rows):
        part = z[..., top : top + rows, :]
        strip = first_stage.decode(part if prepare is None else prepare(part))
        if canvas is None:
            scale = strip.shape[-1] // z.shape[-1]
            shape = (*strip.shape[:2], z.shape[-2] * scale, strip.shape[-1])
            canvas = (output or (lambda shape, dtype: TensorCanvas.empty(shape, dtype, z.device)))(shape, strip.dtype)
        canvas.paste(strip, top * scale, 0)
    assert canvas is not None, "a latent has at least one row"
    return canvas.result()


def _strip_encode(first_stage: nn.Module, x: Tensor | PixelSource, rows: int) -> Tensor:
    """A pointwise first stage's encode, strips of about `rows` image rows (whole patches) at a time."""
    patch = int(getattr(first_stage, "patch_size", 1))
    if x.shape[-2] % patch or x.shape[-1] % patch:
        raise ItemError(f"image of {x.shape[-1]}x{x.shape[-2]} pixels cannot be encoded; its sides must be "
                        f"multiples of {patch}")
    rows = max(patch, rows - rows % patch)
    width = x.shape[-1]
    strips = [first_stage.encode(x.crop(top, min(top + rows, x.shape[-2]), 0, width) if isinstance(x, PixelSource)
                                 else x[..., top : top + rows, :])
              for top in range(0, x.shape[-2], rows)]
    return torch.cat(strips, dim=-2)


def _quantize_in_rows(quantize: nn.Module, z: Tensor, pixels: int = 4096) -> Tensor:
    """Nearest-codebook quantization, a few latent rows at a time (its distance matrix grows with the image)."""
    rows = max(1, pixels // max(1, z.shape[-1]))
    return torch.cat([quantize(z[..., i : i + rows, :])[0] for i in range(0, z.shape[-2], rows)], dim=-2)
