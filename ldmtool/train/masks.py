"""Random inpainting masks: boxes and free-form brush strokes (1 = repaint, 0 = keep, as DESIGN.md §6)."""
from __future__ import annotations

import math

import numpy as np


def box_mask(height: int, width: int, rng: np.random.Generator, frac: tuple[float, float] = (0.15, 0.6)) -> np.ndarray:
    """(H, W) float32 mask with one axis-aligned box whose sides are `frac` of the image's."""
    mask = np.zeros((height, width), np.float32)
    box_h = max(1, round(height * rng.uniform(*frac)))
    box_w = max(1, round(width * rng.uniform(*frac)))
    top = int(rng.integers(0, height - box_h + 1))
    left = int(rng.integers(0, width - box_w + 1))
    mask[top : top + box_h, left : left + box_w] = 1.0
    return mask


def freeform_mask(height: int, width: int, rng: np.random.Generator, strokes: tuple[int, int] = (1, 4)) -> np.ndarray:
    """(H, W) float32 mask of random thick polyline brush strokes, like hand-drawn inpainting masks."""
    import cv2

    mask = np.zeros((height, width), np.uint8)
    size = min(height, width)
    for _ in range(int(rng.integers(strokes[0], strokes[1] + 1))):
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        thickness = max(1, round(size * rng.uniform(0.04, 0.12)))
        angle = rng.uniform(0, 2 * math.pi)
        for _ in range(int(rng.integers(2, 6))):
            angle += rng.uniform(-math.pi / 2, math.pi / 2)
            length = size * rng.uniform(0.1, 0.35)
            nx = float(np.clip(x + length * math.cos(angle), 0, width - 1))
            ny = float(np.clip(y + length * math.sin(angle), 0, height - 1))
            cv2.line(mask, (round(x), round(y)), (round(nx), round(ny)), 1, thickness)
            x, y = nx, ny
    return mask.astype(np.float32)


def random_mask(height: int, width: int, rng: np.random.Generator, box_prob: float = 0.5) -> np.ndarray:
    """A box mask with probability `box_prob`, else a free-form one; never empty."""
    mask = box_mask(height, width, rng) if rng.random() < box_prob else freeform_mask(height, width, rng)
    if not mask.any():
        mask[height // 2, width // 2] = 1.0
    return mask
