"""Super-resolution training pairs: a high-res crop and a degraded low-res copy (OpenCV).

A simplified version of the degradation model the LDM BSR super-resolution model was trained with
(blur, downscale with a random kernel, sensor noise, JPEG), in that order. A share of pairs is plain
downscaling so the model also does well on clean inputs, which is what benchmarks measure.

Three presets (`train diffusion --degradation`): `realistic` (the default: 70% of pairs degraded, for
photos of unknown history), `light` (70% plain downscales with area, bilinear or bicubic kernels, the
rest mildly degraded) and `clean` (every pair an area downscale: the degradation that back-projection
(`--consistency`) assumes and the quality benchmark measures).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ldmtool.errors import UsageError

RESIZE_MODES = ("area", "linear", "cubic")


@dataclass(frozen=True)
class DegradeConfig:
    """Ranges are sampled uniformly per image; `*_prob` is the chance that a step is applied at all."""

    scale: int = 4
    clean_prob: float = 0.3  # plain downscale, nothing else
    clean_modes: tuple[str, ...] = ("cubic",)  # kernels of the plain downscale, one picked per image
    blur_prob: float = 0.6
    blur_sigma: tuple[float, float] = (0.2, 1.5)  # in high-res pixels
    noise_prob: float = 0.4
    noise_sigma: tuple[float, float] = (1.0, 8.0)  # in 0..255 units
    jpeg_prob: float = 0.4
    jpeg_quality: tuple[int, int] = (50, 95)


DEGRADATIONS: dict[str, dict[str, Any]] = {
    "realistic": {},
    "light": {"clean_prob": 0.7, "clean_modes": RESIZE_MODES, "blur_sigma": (0.2, 1.0), "noise_sigma": (1.0, 4.0),
              "jpeg_quality": (75, 95)},
    "clean": {"clean_prob": 1.0, "clean_modes": ("area",)},
}


def degradation(name: str, scale: int) -> DegradeConfig:
    """The named preset (see the module docstring) at `scale`."""
    if name not in DEGRADATIONS:
        raise UsageError(f"--degradation {name!r}: use one of {', '.join(DEGRADATIONS)}")
    return DegradeConfig(scale=scale, **DEGRADATIONS[name])


def _interpolation(name: str) -> int:
    import cv2

    return {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}[name]


def bicubic_downscale(image: np.ndarray, scale: int) -> np.ndarray:
    """(H, W, 3) uint8 to (H // scale, W // scale, 3) uint8 with bicubic interpolation."""
    import cv2

    height, width = image.shape[:2]
    return cv2.resize(image, (width // scale, height // scale), interpolation=cv2.INTER_CUBIC)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noisy = image.astype(np.float32) + rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    import cv2

    ok, encoded = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV could not JPEG-encode a training crop")
    return np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1])


def degrade(image: np.ndarray, config: DegradeConfig, rng: np.random.Generator) -> np.ndarray:
    """A low-res copy of an (H, W, 3) uint8 image: (H // scale, W // scale, 3) uint8."""
    import cv2

    if rng.random() < config.clean_prob:
        if config.clean_modes == ("cubic",):  # the original preset draws no kernel: its pairs stay as they were
            return bicubic_downscale(image, config.scale)
        mode = config.clean_modes[int(rng.integers(0, len(config.clean_modes)))]
        height, width = image.shape[:2]
        return cv2.resize(image, (width // config.scale, height // config.scale), interpolation=_interpolation(mode))
    out = image
    if rng.random() < config.blur_prob:
        out = gaussian_blur(out, rng.uniform(*config.blur_sigma))
    height, width = image.shape[:2]
    mode = RESIZE_MODES[int(rng.integers(0, len(RESIZE_MODES)))]
    out = cv2.resize(out, (width // config.scale, height // config.scale), interpolation=_interpolation(mode))
    if rng.random() < config.noise_prob:
        out = add_noise(out, rng.uniform(*config.noise_sigma), rng)
    if rng.random() < config.jpeg_prob:
        out = jpeg_roundtrip(out, int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1)))
    return out
