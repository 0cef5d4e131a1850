"""Upscale by diffusion (A1111's hires fix and img2img upscale): resample the image to the output size with
Lanczos, then rework it with img2img at `strength` through the tiled engine and the exact tiled first stage.

Memory is bounded by the tile, not the image: the upscaled image is kept as uint8 pixels, the encoder reads
it tile by tile (`Engine.encode_pixels`), the decoder writes uint8 pixels tile by tile (`decode_pixels`) and
the colour fix runs in strips. `img2img --scale` and `txt2img --hires` both go through `rework_upscaled`, so
`txt2img --hires S` equals `txt2img` then `img2img --scale S` with the item's seed.

Colour fix (on by default): the output keeps the low frequencies of the Lanczos upscale (colour and
brightness of the input, below its own resolution; see `pipelines/colour_fix.py`), and the model adds the
detail above them.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import numpy as np
import torch

from ldmtool.diffusion.cond import Cond
from ldmtool.errors import UsageError
from ldmtool.io.images import to_uint8
from ldmtool.pipelines.colour_fix import SIGMA_LOW_RES_PIXELS, colour_fix_
from ldmtool.pipelines.engine import Engine
from ldmtool.pipelines.superres import output_size, resample

Conditioning = Callable[[Engine], tuple[Cond, Optional[Cond]]]


def check_scale(flag: str, scale: Optional[float]) -> None:
    """UsageError for a scale that is not a finite number of at least 1."""
    if scale is not None and not (scale >= 1 and math.isfinite(scale)):
        raise UsageError(f"{flag} {scale}: must be a finite number of at least 1 (e.g. 2)")


def upscaled(rgb: np.ndarray, scale: float) -> np.ndarray:
    """(H, W, 3) float in [0, 1] or uint8 → uint8 pixels Lanczos-resampled to round(s·w) × round(s·h)."""
    pixels = to_uint8(rgb)
    return resample(pixels, output_size(pixels.shape[1], pixels.shape[0], scale))


def rework_upscaled(engine: Engine, pixels: np.ndarray, *, scale: float, strength: float, seed: int,
                    conditioning: Conditioning, label: str, colour_fix: bool = True,
                    progress: Optional[Callable[[int, int], None]] = None,
                    hints: Optional[list[torch.Tensor]] = None) -> np.ndarray:
    """One uint8 image (H, W, 3) at its upscaled size (`upscaled`) → img2img at `strength` with `seed` → uint8
    (H, W, 3), colour-fixed against `pixels` when `colour_fix`; the upscale `scale` sets the fix's blur.
    `hints`: ControlNet hints (`Engine.sample`), padded to the model's multiple as the image is."""
    step = functools.partial(_encode_sample_decode, pixels=pixels, strength=strength, seed=seed,
                             conditioning=conditioning, progress=progress, hints=hints)
    height, width = pixels.shape[:2]
    out: np.ndarray = engine.finite(step, label)[0, :height, :width].numpy()
    if colour_fix:
        colour_fix_(out, pixels, sigma=SIGMA_LOW_RES_PIXELS * scale)  # the input's own pixels, blurred alike
    return out


def _encode_sample_decode(engine: Engine, *, pixels: np.ndarray, strength: float, seed: int,
                          conditioning: Conditioning, progress: Optional[Callable[[int, int], None]],
                          hints: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """Uint8 pixels (1, H', W', 3), padded to the model's multiple, at `engine`'s precision."""
    init = engine.encode_pixels(pixels, engine.info.pixel_multiple)
    cond, uncond = conditioning(engine)
    z = engine.sample((init.shape[-2], init.shape[-1]), [seed], cond, uncond, init_latent=init, strength=strength,
                      progress=progress, hints=hints)
    return engine.decode_pixels(z)
