"""Reading images and masks (DESIGN.md §6).

Images come back as float32 RGB arrays in [0, 1] with shape (H, W, 3), EXIF orientation applied, alpha
split off as its own (H, W) array. 8-bit and 16-bit sources keep their full precision; grayscale,
palette (with transparency), CMYK and the other Pillow modes are converted to RGB. Every failure is an
`ItemError` whose one-line message names the file and the reason, so the batch can go on without it.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable, Literal, Optional

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

from ldmtool.errors import ItemError
from ldmtool.io.files import (
    FileTooLarge,
    NotRegularFile,
    max_file_bytes,
    open_regular,
    positive_int_env,
    read_bounded,
    shown,
)
from ldmtool.io.source import SourceInfo, source_info

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
DEFAULT_MAX_PIXELS = 8192 * 8192
MAX_PIXELS_ENV = "LDMTOOL_MAX_PIXELS"

# We enforce our own limit (with a better message) before decoding; Pillow's bomb check would only
# duplicate it with a different threshold.
Image.MAX_IMAGE_PIXELS = None

# EXIF orientation tag value -> the Pillow transpose that displays it upright (as ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass
class LoadedImage:
    """An image read from disk: RGB in [0, 1], alpha separately (None when the file has none)."""

    path: Path
    rgb: np.ndarray  # (H, W, 3) float32 in [0, 1]
    alpha: Optional[np.ndarray] = None  # (H, W) float32 in [0, 1], 1 = opaque
    bit_depth: int = 8
    source: Optional[SourceInfo] = None  # the file's EXIF, ICC profile and greyness, which outputs keep

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as Pillow reports sizes."""
        return self.rgb.shape[1], self.rgb.shape[0]


def is_image_path(path: Path | str) -> bool:
    """True when the file name has an image extension we read."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def max_pixels_default() -> int:
    """The pixel limit: `$LDMTOOL_MAX_PIXELS` when set, else 8192 x 8192."""
    return positive_int_env(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS, "pixels")


def check_read_limits(max_pixels: Optional[int] = None) -> None:
    """UsageError for a malformed `$LDMTOOL_MAX_FILE_BYTES`, or `$LDMTOOL_MAX_PIXELS` when no `--max-pixels`
    replaces it: a run that reads images checks them once, before any item (each read would fail)."""
    max_file_bytes()
    if max_pixels is None:
        max_pixels_default()


def read_image(path: Path | str, *, max_pixels: Optional[int] = None) -> LoadedImage:
    """Read one image file fully; any problem becomes an ItemError naming the file."""
    path = Path(path)
    limit = max_pixels or max_pixels_default()
    with _item_errors(path):
        data = read_bounded(path)
        if not data:
            raise ItemError(f"{shown(path)}: the file is empty (0 bytes)")
        return _decode(path, data, limit)


def header_size(path: Path | str, *, max_pixels: Optional[int] = None,
                upright: bool = True) -> Optional[tuple[int, int]]:
    """The (width, height) of an image file from its header alone (Pillow's lazy open: no pixel is decoded;
    `upright`: as its EXIF orientation shows it), for the run plan; None when the file cannot be read or is
    over the pixel limit (its load then fails with the reason)."""
    limit = max_pixels or max_pixels_default()
    try:
        with os.fdopen(open_regular(path), "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(handle) as image:
                width, height = image.size
                if width * height > limit or width < 1 or height < 1:
                    return None
                turned = upright and _orientation(image) in (5, 6, 7, 8)  # EXIF: shown rotated by 90 degrees
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return (height, width) if turned else (width, height)


def _decode(path: Path, data: bytes, max_pixels: int) -> LoadedImage:
    import io

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = Image.open(io.BytesIO(data))
        _check_pixels(path, image.size, max_pixels)
        sixteen_bit_rgb = _is_16bit_rgb(image)  # before load(), which clears the tile list
        image.load()
    source = source_info(image)
    if sixteen_bit_rgb:
        return _decode_16bit_rgb(path, data, image, source)
    orientation = _orientation(image)
    upright = ImageOps.exif_transpose(image) if orientation not in (None, 1) else image
    rgb, alpha, depth = _to_arrays(upright, path)
    return LoadedImage(path=path, rgb=rgb, alpha=alpha, bit_depth=depth, source=source)


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ItemError(
            f"{path}: {width}x{height} is {width * height} pixels, over the limit of {max_pixels} "
            f"(raise it with --max-pixels or {MAX_PIXELS_ENV} if the file is trusted)"
        )
    if width < 1 or height < 1:
        raise ItemError(f"{path}: the image has no pixels ({width}x{height})")


def _orientation(image: Image.Image) -> Optional[int]:
    try:
        return image.getexif().get(0x0112)
    except Exception:  # a broken EXIF block must not make a readable image fail
        return None


def _is_16bit_rgb(image: ImageFile.ImageFile) -> bool:
    """Pillow decodes 16-bit RGB(A) PNGs and TIFFs to 8 bits; these we decode with OpenCV to keep precision."""
    if image.format not in ("PNG", "TIFF") or image.mode not in ("RGB", "RGBA"):
        return False
    return any(";16" in str(tile.args) for tile in (image.tile or []))


def _decode_16bit_rgb(path: Path, data: bytes, image: Image.Image, source: SourceInfo) -> LoadedImage:
    import cv2

    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ItemError(f"{path}: cannot decode this 16-bit {image.format}")
    scale = 65535.0 if array.dtype == np.uint16 else 255.0
    array = array.astype(np.float32) / scale
    channels = [2, 1, 0] + ([3] if array.shape[2] == 4 else [])  # OpenCV's BGR(A) -> RGB(A)
    array = _apply_orientation(array[:, :, channels], _orientation(image))
    alpha = array[:, :, 3].copy() if array.shape[2] == 4 else None
    return LoadedImage(path=path, rgb=array[:, :, :3].copy(), alpha=alpha, bit_depth=16, source=source)


def _apply_orientation(array: np.ndarray, orientation: Optional[int]) -> np.ndarray:
    """Rotate/flip an (H, W, C) float array per channel with Pillow's own transposes."""
    method = _ORIENTATION_TRANSPOSE.get(orientation or 1)
    if method is None:
        return np.ascontiguousarray(array)
    planes = []
    for channel in range(array.shape[2]):
        plane = Image.fromarray(np.ascontiguousarray(array[:, :, channel], dtype=np.float32))
        planes.append(np.asarray(plane.transpose(method)))
    return np.stack(planes, axis=2).astype(np.float32)


def _to_arrays(image: Image.Image, path: Path) -> tuple[np.ndarray, Optional[np.ndarray], int]:
    """(rgb, alpha, bit depth) for every Pillow mode we accept."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        gray = np.asarray(image, dtype=np.float32) / 65535.0
        return _gray_to_rgb(np.clip(gray, 0.0, 1.0)), None, 16
    if mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        return _gray_to_rgb(gray), None, 32
    if mode == "CMYK":
        return _cmyk_to_rgb(image), None, 8
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    try:
        converted = image.convert("RGBA" if has_alpha else "RGB")
    except (ValueError, OSError) as err:
        raise ItemError(f"{path}: unsupported image mode {mode} ({err})") from None
    array = np.asarray(converted, dtype=np.float32) / 255.0
    if has_alpha:
        return np.ascontiguousarray(array[:, :, :3]), np.ascontiguousarray(array[:, :, 3]), 8
    return array, None, 8


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2).astype(np.float32)


def _cmyk_to_rgb(image: Image.Image) -> np.ndarray:
    """Through the embedded ICC profile when there is one (print CMYK is not 1 - RGB), else Pillow's rule."""
    profile = image.info.get("icc_profile")
    if profile:
        try:
            import io

            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if converted is not None:
                return np.asarray(converted, dtype=np.float32) / 255.0
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


class _item_errors:
    """Context manager: turn the ways reading a file can fail into one-line ItemErrors naming it."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Optional[type[BaseException]], err: Optional[BaseException],
                 tb: Optional[TracebackType]) -> Literal[False]:
        if err is None or isinstance(err, (ItemError, KeyboardInterrupt, SystemExit, MemoryError)):
            return False
        raise ItemError(f"{shown(self.path)}: {read_error_reason(err)}") from err


def read_error_reason(err: BaseException) -> str:
    """Why an image file could not be read, in words (no Python object reprs)."""
    if isinstance(err, (NotRegularFile, FileTooLarge)):
        return str(err).split(": ", 1)[-1]
    if isinstance(err, FileNotFoundError):
        return "no such file"
    if isinstance(err, PermissionError):
        return "permission denied (the file is not readable)"
    if isinstance(err, IsADirectoryError):
        return "is a folder, not an image file"
    if isinstance(err, UnidentifiedImageError):
        return "not an image file (unknown format, or the header is damaged)"
    if isinstance(err, Image.DecompressionBombError):
        return "too many pixels (decompression bomb guard)"
    text = " ".join(str(err).split()) or type(err).__name__
    if "truncated" in text.lower():
        return "the image file is truncated (cut short while copying or downloading?)"
    return f"cannot decode the image ({text})"


# ---------------------------------------------------------------- masks


def mask_from_alpha(alpha: np.ndarray, *, invert: bool = False) -> np.ndarray:
    """A repaint mask from transparency: transparent (alpha < 0.5) means repaint."""
    repaint = alpha < 0.5
    if invert:
        repaint = ~repaint
    return repaint.astype(np.float32)


def binarize_mask(values: np.ndarray, *, invert: bool = False) -> np.ndarray:
    """White (>= 0.5) means repaint (1.0), black means keep (0.0); `invert` swaps them."""
    repaint = values >= 0.5
    if invert:
        repaint = ~repaint
    return repaint.astype(np.float32)


def read_mask(
    path: Path | str,
    *,
    size: Optional[tuple[int, int]] = None,
    invert: bool = False,
    max_pixels: Optional[int] = None,
    on_transparency: Optional[Callable[[Path], None]] = None,
) -> np.ndarray:
    """Read a mask file as a (H, W) float32 array of 0 (keep) and 1 (repaint).

    Colour masks are reduced to their luminance. `size` is the (width, height) of the image it belongs to;
    a mask of another size is an ItemError (resizing would silently move the edit). A mask's transparency is
    not read (editors disagree on what it means); `on_transparency(path)` is told when a mask has some.
    """
    loaded = read_image(path, max_pixels=max_pixels)
    if on_transparency is not None and loaded.alpha is not None and bool((loaded.alpha < 1).any()):
        on_transparency(loaded.path)
    if size is not None and loaded.size != tuple(size):
        w, h = loaded.size
        raise ItemError(f"{loaded.path}: the mask is {w}x{h} but its image is {size[0]}x{size[1]}; they must match")
    luminance = loaded.rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return binarize_mask(luminance, invert=invert)


# ---------------------------------------------------------------- conversions


def display_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB for a thumbnail. Wide grey modes are scaled as `read_image` reads them (I;16 and I
    by 65535, F by 1) because Pillow's convert clips them at 255, which turns a 16-bit image white."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        image = Image.fromarray(to_uint8(np.asarray(image, dtype=np.float32) / 65535.0))
    elif mode == "F":
        image = Image.fromarray(to_uint8(np.asarray(image, dtype=np.float32)))
    elif mode in ("P", "PA"):
        image = image.convert("RGBA")  # a palette's transparency resolves through RGBA
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> uint8 with rounding (uint8 input is returned unchanged)."""
    if array.dtype == np.uint8:
        return array
    rounded: np.ndarray = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return rounded
