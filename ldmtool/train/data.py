"""Training images: any folder of images, the built-in `corpus` of sample images from installed packages, or
photographs of installed Debian packages (`debian:PKG`, see `ldmtool.train.debian`).

The corpus is read from PyPI packages' own data folders (scikit-image always; matplotlib and scikit-learn
when they happen to be installed). Nothing is fetched. A fixed, named list of corpus images is held out
of every training run so benchmarks can evaluate on images no default model has seen (`HELD_OUT`).

Sampling is a pure function of (seed, index): the same seed and step give the same crops, so a resumed
run sees exactly the data it would have seen without the interruption.
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import numpy as np

from ldmtool.errors import FatalError, UsageError
from ldmtool.runtime.seeds import derive_seed

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
CORPUS = "corpus"
CORPUS_SUFFIXES = frozenset({".png", ".jpg"})  # the packages' .tif files are multi-page test files

# (corpus prefix, package, data folder inside the package). Only packages that are installed count.
CORPUS_SOURCES: tuple[tuple[str, str, str], ...] = (
    ("skimage", "skimage", "data"),
    ("matplotlib", "matplotlib", "mpl-data/sample_data"),
    ("sklearn", "sklearn", "datasets/images"),
)

# Held out of training, used for evaluation. Chosen by name so the split never moves: colour photographs
# with detail at several scales, none a near-duplicate of a training image (motorcycle_left/right, which
# are a stereo pair, both stay in training).
HELD_OUT = frozenset(
    {
        "skimage/chelsea.png",
        "skimage/coffee.png",
        "skimage/rocket.jpg",
        "matplotlib/grace_hopper.jpg",
        "sklearn/china.jpg",
    }
)


@dataclass(frozen=True)
class CorpusImage:
    key: str  # "package/file name", e.g. "skimage/astronaut.png"
    path: Path


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def corpus_images(split: str = "train") -> list[CorpusImage]:
    """The built-in corpus: `split` is "train" (held-out images removed), "eval" (only those) or "all"."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"unknown corpus split {split!r}")
    found: list[CorpusImage] = []
    for prefix, package, folder in CORPUS_SOURCES:
        root = _package_dir(package)
        if root is None or not (root / folder).is_dir():
            continue
        for path in sorted((root / folder).iterdir()):
            if path.suffix.lower() in CORPUS_SUFFIXES and path.is_file():
                found.append(CorpusImage(f"{prefix}/{path.name}", path))
    if split == "train":
        return [image for image in found if image.key not in HELD_OUT]
    if split == "eval":
        return [image for image in found if image.key in HELD_OUT]
    return found


def folder_images(root: Path, recursive: bool = True) -> list[Path]:
    """Image files under `root` (by suffix), sorted so the order never depends on the file system."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"--data {root}: not a folder (give a folder of images or 'corpus')")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def resolve_data(data: str, recursive: bool = True, licences: Optional[Sequence[str]] = None) -> list[Path]:
    """`--data` to a list of training image paths: a folder, `corpus` (held-out images excluded),
    `debian:PKG[,PKG]` (installed packages' photographs, their held-out split excluded, only `licences` if
    given), or several of these joined by `+` (concatenated in that order)."""
    return [path for source in data_sources(data) for path in _resolve_source(source, recursive, licences)]


def data_sources(data: str) -> list[str]:
    """The sources a `--data` value joins with `+`, in order (a folder whose name has a `+` stays whole)."""
    return data.split("+") if "+" in data and not Path(data).exists() else [data]


def _resolve_source(data: str, recursive: bool, licences: Optional[Sequence[str]]) -> list[Path]:
    from ldmtool.train import debian

    if data == CORPUS:
        paths = [image.path for image in corpus_images("train")]
        if not paths:
            raise UsageError("--data corpus: no sample images found (install scikit-image)")
        return paths
    if data.startswith(debian.PREFIX):
        images = debian.debian_images(data, "train", licences)
        if not images:
            kept = f" under {', '.join(licences)}" if licences else ""
            raise UsageError(f"--data {data}: no training photographs{kept} in these packages")
        return [image.path for image in images]
    paths = folder_images(Path(data), recursive)
    if not paths:
        raise UsageError(f"--data {data}: no image files found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def load_rgb(path: Path) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB: EXIF orientation applied, alpha composited on white, grey to RGB
    (16-bit grey by 65535, as `read_image`)."""
    from PIL import Image, ImageOps

    from ldmtool.io.images import display_rgb

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        if image.mode.startswith("I;16") or image.mode in ("I", "F"):
            return np.asarray(display_rgb(image), dtype=np.uint8).copy()  # scaled as every command reads them
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


@lru_cache(maxsize=64)
def _cached_rgb(path: str) -> np.ndarray:
    return load_rgb(Path(path))


class UnreadableTrainingImage(FatalError):
    """A training image whose header read but whose pixels do not (a truncated file): raised when a step first
    draws it, before the step changes anything, so the state of the previous step can still be saved."""


def _decoded_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        return _cached_rgb(str(path))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableTrainingImage(f"{path}: cannot read this training image ({err})") from err


def readable_images(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """Split paths into (readable, unreadable) by opening each header (cheap; pixels are read later)."""
    from PIL import Image

    good, bad = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018 - touching the header is the check
            good.append(path)
        except (OSError, ValueError, Image.DecompressionBombError):
            bad.append(path)
    return good, bad


@dataclass(frozen=True)
class CropConfig:
    """How training crops are cut: square `size`, random horizontal flips, random source rescale.

    A source image is first resized by a random factor in [min_scale, 1] (then enlarged if still smaller
    than the crop), so small details and whole objects both appear at the crop size.
    """

    size: int = 256
    flip: bool = True
    min_scale: float = 1.0
    colour_jitter: float = 0.0  # probability of `colour_jitter` on a crop


# Above this many source pixels a crop is cut from its window of the source and only that window is resized
# (resizing a whole 16-megapixel wallpaper for every 64-pixel crop took most of a training step). Below it the
# whole image is resized first, as the shipped defaults' recipes did (their corpus images are all smaller),
# so their crops stay bit for bit what they were.
WINDOW_RESIZE_PIXELS = 4_000_000


def random_crop(image: np.ndarray, config: CropConfig, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 crop of `image` as described by `config`."""
    import cv2

    height, width = image.shape[:2]
    factor = rng.uniform(config.min_scale, 1.0) if config.min_scale < 1.0 else 1.0
    factor = max(factor, config.size / min(height, width))
    if abs(factor - 1.0) > 1e-6:
        new_size = (max(config.size, round(width * factor)), max(config.size, round(height * factor)))
        interpolation = cv2.INTER_AREA if factor < 1.0 else cv2.INTER_CUBIC
        if height * width > WINDOW_RESIZE_PIXELS:
            top = int(rng.integers(0, new_size[1] - config.size + 1))
            left = int(rng.integers(0, new_size[0] - config.size + 1))
            crop = _resized_window(image, new_size, top, left, config.size, interpolation)
            return _maybe_flip(crop, config, rng)
        image = cv2.resize(image, new_size, interpolation=interpolation)
        height, width = image.shape[:2]
    top = int(rng.integers(0, height - config.size + 1))
    left = int(rng.integers(0, width - config.size + 1))
    return _maybe_flip(image[top : top + config.size, left : left + config.size], config, rng)


def _resized_window(image: np.ndarray, new_size: tuple[int, int], top: int, left: int, size: int,
                    interpolation: int) -> np.ndarray:
    """The crop at (top, left) of `image` resized to `new_size`, computed from the source window it covers."""
    import cv2

    height, width = image.shape[:2]
    scale_y, scale_x = height / new_size[1], width / new_size[0]
    y0, y1 = int(np.floor(top * scale_y)), min(height, int(np.ceil((top + size) * scale_y)))
    x0, x1 = int(np.floor(left * scale_x)), min(width, int(np.ceil((left + size) * scale_x)))
    return cv2.resize(np.ascontiguousarray(image[y0:y1, x0:x1]), (size, size), interpolation=interpolation)


def _maybe_flip(crop: np.ndarray, config: CropConfig, rng: np.random.Generator) -> np.ndarray:
    if config.flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def colour_jitter(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random hue rotation, saturation scale and tint of a (H, W, 3) uint8 crop, done in YCbCr.

    Most images in the built-in corpus are grey; a first stage trained on them alone learns to drop colour.
    Rotating and scaling the chroma plane, plus a small constant tint (which also colours grey crops),
    shows it colours of every hue while keeping luminance and texture untouched.
    """
    rgb = crop.astype(np.float32)
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    cb = (rgb[..., 2] - luma) * 0.564
    cr = (rgb[..., 0] - luma) * 0.713
    angle = rng.uniform(-np.pi, np.pi)
    saturation = rng.uniform(0.6, 1.5)
    tint = rng.normal(0.0, 12.0, size=2)
    cos, sin = np.cos(angle) * saturation, np.sin(angle) * saturation
    cb, cr = cos * cb - sin * cr + tint[0], sin * cb + cos * cr + tint[1]
    red = luma + 1.403 * cr
    blue = luma + 1.773 * cb
    green = (luma - 0.299 * red - 0.114 * blue) / 0.587
    out = np.stack([red, green, blue], axis=-1)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


class ImageCrops:
    """Random crops of a list of images, deterministic in (seed, index).

    Unreadable files are dropped once at construction (listed in `skipped`); if none is readable the
    data source is a usage error.
    """

    def __init__(self, paths: Sequence[Path], config: CropConfig, seed: int = 0):
        good, bad = readable_images(paths)
        if not good:
            raise UsageError(f"no readable training images among {len(bad)} files (first: {bad[0] if bad else '-'})")
        if bad:
            warnings.warn(f"skipping {len(bad)} unreadable image(s), e.g. {bad[0]}", stacklevel=2)
        self.paths = good
        self.skipped = bad
        self.config = config
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def rng(self, index: int) -> np.random.Generator:
        """The random stream of sample `index` (crop, flip, and whatever the task derives from it)."""
        return np.random.default_rng(derive_seed(self.seed, f"sample/{index}"))

    def crop(self, index: int) -> np.ndarray:
        rng = self.rng(index)
        path = self.paths[int(rng.integers(0, len(self.paths)))]
        crop = random_crop(_decoded_rgb(path), self.config, rng)
        if self.config.colour_jitter and rng.random() < self.config.colour_jitter:
            crop = colour_jitter(crop, rng)
        return crop

    def batch(self, step: int, batch_size: int) -> np.ndarray:
        """(B, size, size, 3) uint8 crops for training step `step`."""
        return np.stack([self.crop(step * batch_size + i) for i in range(batch_size)])


def to_tensor(images: np.ndarray) -> "torch.Tensor":
    """(B, H, W, 3) or (H, W, 3) uint8 to float (B, 3, H, W) in [-1, 1]."""
    import torch

    if images.ndim == 3:
        images = images[None]
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return tensor / 127.5 - 1.0


def to_uint8(images: "torch.Tensor") -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] to (B, H, W, 3) uint8."""
    import torch

    array = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return array.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()
