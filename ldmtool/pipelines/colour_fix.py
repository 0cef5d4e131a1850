"""Colour fix for generative super-resolution (the wavelet/Gaussian colour fix of StableSR, Gaussian form).

A small first stage shifts colours and brightness; the low-res input knows them. The fix keeps the model
output's high frequencies and takes the low frequencies from a plain bicubic upscale of the input:

    out = out - blur(out) + blur(bicubic(low))

Sigma scales with the upscaling factor: `SIGMA_LOW_RES_PIXELS` (0.75) low-res pixels, i.e. 3 output pixels
at ×4. A Gaussian of that width passes 6% of the amplitude at the low-res Nyquist frequency, so the bicubic
reference contributes only the band it actually knows, and everything above it (what the model adds) is
the model's.

Memory stays flat in the image size: the output is changed in place in horizontal strips. A strip is
computed from its rows plus a halo of `radius` rows on each side (the blur kernel is truncated at exactly
3 sigma, so the halo covers it and the strip result equals the whole-image formula); the bicubic reference
is computed per strip from the low-res rows it needs (plus the cubic kernel's 2-row support). Only the
strip window exists in float32. Rows above a strip were already overwritten, so the original rows that
the next strip's halo needs are carried over from the previous window.
"""
from __future__ import annotations

import math
from typing import Optional

import cv2
import numpy as np

SIGMA_LOW_RES_PIXELS = 0.75
STRIP_ROWS = 256
_CUBIC_SUPPORT = 2  # rows of the low-res image either side that bicubic interpolation reads


def colour_fix_sigma(scale: int) -> float:
    """Blur sigma in output pixels for an integer upscaling factor (3.0 at ×4)."""
    return SIGMA_LOW_RES_PIXELS * scale


def blur_radius(sigma: float) -> int:
    """Half-width of the truncated Gaussian kernel (3 sigma): the halo a strip needs."""
    return max(1, math.ceil(3 * sigma))


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur truncated at 3 sigma, edges reflected (float32 in, float32 out)."""
    size = 2 * blur_radius(sigma) + 1
    return cv2.GaussianBlur(image, (size, size), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def colour_fix_reference(output: np.ndarray, low: np.ndarray, *, sigma: Optional[float] = None) -> np.ndarray:
    """The whole-image formula, for tests and small images: a new array of `output`'s dtype."""
    scale = integer_scale(output, low)
    sigma = colour_fix_sigma(scale) if sigma is None else sigma
    out = output.astype(np.float32)
    bicubic = cv2.resize(in_range_of(low, output.dtype), (out.shape[1], out.shape[0]), interpolation=cv2.INTER_CUBIC)
    fixed = out - gaussian_blur(out, sigma) + gaussian_blur(bicubic, sigma)
    return to_dtype(fixed, output.dtype)


def colour_fix_(output: np.ndarray, low: np.ndarray, *, sigma: Optional[float] = None,
                strip_rows: int = STRIP_ROWS) -> np.ndarray:
    """Apply the colour fix to `output` (H, W, 3) in place, strip by strip; returns `output`.

    `low` is the model's input (h, w, 3) with H = s·h and W = s·w for an integer s. Each is uint8 (0..255)
    or float (0..1); the reference is brought to the output's range.
    """
    scale = integer_scale(output, low)
    sigma = colour_fix_sigma(scale) if sigma is None else sigma
    halo = blur_radius(sigma)
    height = output.shape[0]
    carried = np.empty((0, *output.shape[1:]), np.float32)  # original rows just above the current strip
    for start in range(0, height, strip_rows):
        end = min(height, start + strip_rows)
        below = min(height, end + halo)
        window = np.concatenate([carried, output[start:below].astype(np.float32)])
        top = start - len(carried)  # image row of window[0]
        carried_next = window[max(top, end - halo) - top : end - top].copy()
        window -= gaussian_blur(window, sigma)
        window += gaussian_blur(bicubic_rows(low, scale, top, below, output.shape[1], output.dtype), sigma)
        output[start:end] = to_dtype(window[start - top : end - top], output.dtype)
        carried = carried_next
    return output


def bicubic_rows(low: np.ndarray, scale: int, top: int, bottom: int, width: int, dtype: np.dtype) -> np.ndarray:
    """Rows [top, bottom) of the bicubic ×scale upscale of `low`, computed from the low-res rows they read.

    With an integer factor, output row y samples low-res position (y + 0.5)/scale - 0.5, so cropping the
    input at low row `first` shifts the output by exactly first·scale rows; edge clamping only matters where
    the crop touches the image edge, which is where the whole image clamps too.
    """
    first = max(0, top // scale - _CUBIC_SUPPORT)
    last = min(low.shape[0], -(-bottom // scale) + _CUBIC_SUPPORT)
    part = in_range_of(low[first:last], dtype)
    up = cv2.resize(part, (width, (last - first) * scale), interpolation=cv2.INTER_CUBIC)
    return up[top - first * scale : bottom - first * scale]


def integer_scale(output: np.ndarray, low: np.ndarray) -> int:
    scale: int = output.shape[0] // max(1, low.shape[0])
    if scale < 1 or output.shape[:2] != (low.shape[0] * scale, low.shape[1] * scale):
        raise ValueError(f"output {output.shape[:2]} is not an integer multiple of the input {low.shape[:2]}")
    return scale


def in_range_of(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 copy of `values` in the value range of `dtype` (0..255 for integers, 0..1 for floats)."""
    out_int, in_int = np.issubdtype(dtype, np.integer), np.issubdtype(values.dtype, np.integer)
    factor = 255.0 if out_int and not in_int else 1 / 255.0 if in_int and not out_int else 1.0
    return values.astype(np.float32) * np.float32(factor) if factor != 1.0 else values.astype(np.float32)


def to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    converted: np.ndarray
    if np.issubdtype(dtype, np.integer):
        converted = np.clip(np.rint(values), 0, 255).astype(dtype)
    else:
        converted = np.clip(values, 0.0, 1.0).astype(dtype)
    return converted


def colour_fix_to(output: np.ndarray, reference: np.ndarray, sigma: float) -> np.ndarray:
    """`output - blur(output) + blur(reference)` for same-size (H, W, 3) float images in [0, 1] (inpainting:
    the reference is a classical fill of the hole, which knows the surrounding colours)."""
    out = output.astype(np.float32)
    fixed = out - gaussian_blur(out, sigma) + gaussian_blur(reference.astype(np.float32), sigma)
    clipped: np.ndarray = np.clip(fixed, 0.0, 1.0)
    return clipped


def config_switch(value: object, key: str, model_path: object) -> bool:
    """A true/false setting of the model config's `ldmtool:` block (`info.defaults.<key>`, absent: off);
    anything else is fatal."""
    from ldmtool.errors import FatalError

    if not isinstance(value, bool):
        raise FatalError(f"{model_path}: its config's ldmtool.{key} is {value!r}; write true or false")
    return value
