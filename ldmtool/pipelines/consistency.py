"""Consistency with the input for super-resolution: iterative back-projection (Irani & Peleg, 1991).

An output of an integer ×s upscale is *consistent* with its input when area-downscaling it (the mean of
each s×s block, `D`) gives the input back. A generative model's output is not: its low frequencies drift.
Back-projection repeatedly adds the bicubic upscale (`U`) of what is still missing:

    x_{k+1} = x_k + U(low - D x_k)

so the output keeps the model's detail (what the input cannot know) and takes everything the input does
know from the input. For clean downscaled images this is what fidelity (PSNR) rewards; for noisy or
compressed inputs it would put their noise and blocks back, so it is opt-in (`--consistency`, or the
model config's `ldmtool.consistency`).

Memory: the output is changed in place; besides it, at most four low-res float32 arrays (at ×4 together
the size of the uint8 output) and a strip. D and U are linear, so x_K = x_0 + U c_K with a low-res correction
c: c_0 = 0 and c_{k+1} = c_k + (low - D x_0 - D U c_k). Only low-res arrays live whole (the input, D x_0,
c); the output is read once (for D x_0) and written once (x_0 + U c), in horizontal strips, and D U c is
computed strip by strip from the low-res rows each strip needs.
"""
from __future__ import annotations

import numpy as np

from ldmtool.pipelines.colour_fix import bicubic_rows, in_range_of, integer_scale, to_dtype

ITERATIONS = 3  # the correction is within 0.05 dB of its limit after 3 (measured on held-out photos)
STRIP_ROWS = 256


def back_project_(output: np.ndarray, low: np.ndarray, *, iterations: int = ITERATIONS,
                  strip_rows: int = STRIP_ROWS) -> np.ndarray:
    """Make `output` (H, W, 3) consistent with `low` (H/s, W/s, 3) in place; returns `output`.

    Each is uint8 (0..255) or float (0..1); the input is brought to the output's range. The result is
    clipped to that range at the end only (clipping inside the loop would stop it converging).
    """
    scale = integer_scale(output, low)
    rows = max(scale, strip_rows - strip_rows % scale)
    missing = in_range_of(low, output.dtype)
    missing -= _area_downscale(output, scale, rows)  # low - D x_0
    correction = np.zeros_like(missing)
    for _ in range(iterations):
        step = _down_up(correction, scale, output.shape[1], rows)
        np.subtract(missing, step, out=step)
        correction += step
        del step
    for start in range(0, output.shape[0], rows):
        end = min(output.shape[0], start + rows)
        strip = output[start:end].astype(np.float32)
        strip += bicubic_rows(correction, scale, start, end, output.shape[1], np.dtype(np.float32))
        output[start:end] = to_dtype(strip, output.dtype)
    return output


def back_project_reference(output: np.ndarray, low: np.ndarray, *, iterations: int = ITERATIONS) -> np.ndarray:
    """The textbook loop on the whole image (for tests): a new array of `output`'s dtype."""
    import cv2

    scale = integer_scale(output, low)
    x = output.astype(np.float32)
    target = in_range_of(low, output.dtype)
    for _ in range(iterations):
        height, width = target.shape[:2]
        down = x.reshape(height, scale, width, scale, -1).mean(axis=(1, 3))
        x += cv2.resize(target - down, (x.shape[1], x.shape[0]), interpolation=cv2.INTER_CUBIC)
    return to_dtype(x, output.dtype)


def consistency_error(output: np.ndarray, low: np.ndarray) -> float:
    """Mean absolute difference between the area-downscaled output and the input (output units)."""
    scale = integer_scale(output, low)
    return float(np.abs(_area_downscale(output, scale, STRIP_ROWS) - in_range_of(low, output.dtype)).mean())


def _area_downscale(image: np.ndarray, scale: int, rows: int) -> np.ndarray:
    """Block means (H/s, W/s, C) float32 of an (H, W, C) image, read `rows` rows at a time."""
    height, width = image.shape[0] // scale, image.shape[1] // scale
    out = np.empty((height, width, image.shape[2]), np.float32)
    for start in range(0, image.shape[0], rows):
        block = image[start : start + rows].astype(np.float32)
        out[start // scale : (start + len(block)) // scale] = block.reshape(-1, scale, width, scale, image.shape[2]).mean(axis=(1, 3))
    return out


def _down_up(correction: np.ndarray, scale: int, width: int, rows: int) -> np.ndarray:
    """D U c: the block means of the bicubic upscale of `correction`, one output strip at a time."""
    out = np.empty_like(correction)
    height = correction.shape[0] * scale
    for start in range(0, height, rows):
        end = min(height, start + rows)
        strip = bicubic_rows(correction, scale, start, end, width, np.dtype(np.float32))
        out[start // scale : end // scale] = strip.reshape(-1, scale, width // scale, scale, correction.shape[2]).mean(axis=(1, 3))
    return out
