"""Images in and out of the Python API (`ldmtool.superres(...)` and the others).

In: a NumPy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of uint8, uint16 or float in [0, 1], a Pillow
image, or an image file; each becomes the `LoadedImage` the CLI would have read from a file of those pixels
(8-bit and 16-bit values divided by 255 and 65535 in float32, alpha split off, Pillow modes converted and
EXIF orientation applied as `ldmtool.io.images` does).

Out: the pixels the CLI writes, at the input's depth: uint8 for 8-bit inputs (and for commands that take no
image), exactly the written file's values; uint16 for 16-bit inputs; float32 in [0, 1] for float inputs.
Alpha, where the result has it, is the last channel.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
from PIL import Image, ImageOps

from ldmtool.errors import UsageError
from ldmtool.io.images import LoadedImage, binarize_mask, read_image, read_mask, to_uint8
from ldmtool.runtime.jobs import Output

if TYPE_CHECKING:
    import torch

ImageInput = Union[np.ndarray, Image.Image, str, Path]

# How an output is returned: as the input's depth.
DEPTH_8, DEPTH_16, DEPTH_FLOAT = 8, 16, 32


def read_input(image: ImageInput, *, label: str = "image", max_pixels: Optional[int] = None) -> LoadedImage:
    """The image as the CLI reads it; files are read by the CLI's reader itself."""
    if isinstance(image, (str, Path)):
        return read_image(image, max_pixels=max_pixels)
    if isinstance(image, Image.Image):
        return _from_pillow(image, label)
    if isinstance(image, np.ndarray):
        return _from_array(image, label)
    raise UsageError(f"{label}: give a NumPy array, a Pillow image or an image file, not {type(image).__name__}")


def read_mask_input(mask: ImageInput, *, size: tuple[int, int], invert: bool = False,
                    label: str = "mask") -> np.ndarray:
    """A repaint mask (H, W) of 0 and 1 as the CLI reads a mask file: luminance, white (≥ 0.5) = repaint."""
    if isinstance(mask, (str, Path)):
        return read_mask(mask, size=size, invert=invert)
    if isinstance(mask, np.ndarray) and mask.dtype == np.bool_:
        mask = mask.astype(np.uint8) * 255
    elif isinstance(mask, np.ndarray) and mask.dtype == np.uint8 and mask.size and int(mask.max()) == 1:
        # 8-bit values repaint from 128 up: a 0/1 label array would silently repaint nothing
        raise UsageError(f"{label}: a uint8 array of 0 and 1; 8-bit masks repaint where white (255), so pass "
                         "mask.astype(bool) or mask * 255")
    loaded = read_input(mask, label=label)
    if loaded.size != tuple(size):
        raise UsageError(f"{label}: the mask is {loaded.size[0]}x{loaded.size[1]} but its image is "
                         f"{size[0]}x{size[1]}; they must match")
    luminance = loaded.rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # as io.images.read_mask
    return binarize_mask(luminance, invert=invert)


def depth_of(image: LoadedImage) -> int:
    return {8: DEPTH_8, 16: DEPTH_16}.get(image.bit_depth, DEPTH_FLOAT)


def result_array(output: Output, depth: int = DEPTH_8) -> np.ndarray:
    """The output's pixels (alpha as the last channel) at `depth`; at 8 bits exactly what the writer writes."""
    planes = [_at_depth(np.asarray(output.image), depth)]
    if output.alpha is not None:
        if planes[0].ndim == 2:
            planes[0] = np.repeat(planes[0][:, :, None], 3, axis=2)
        planes.append(_at_depth(np.asarray(output.alpha), depth)[:, :, None])
    return planes[0] if len(planes) == 1 else np.concatenate(planes, axis=2)


def _at_depth(values: np.ndarray, depth: int) -> np.ndarray:
    if depth == DEPTH_8:
        return to_uint8(values)
    if depth == DEPTH_16:
        sixteen: np.ndarray
        if values.dtype == np.uint8:
            sixteen = values.astype(np.uint16) * 257  # exactly v / 255 in 16 bits
        else:
            sixteen = (np.clip(values, 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)
        return sixteen
    floats: np.ndarray
    if values.dtype == np.uint8:
        floats = values.astype(np.float32) / 255.0
    else:
        floats = np.clip(values, 0.0, 1.0).astype(np.float32)
    return floats


def _from_array(array: np.ndarray, label: str) -> LoadedImage:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape[:2]:
        raise UsageError(f"{label}: an image array is (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), not {array.shape}")
    values, depth = _unit_range(array, label)
    if values.ndim == 2:
        values = np.repeat(values[:, :, None], 3, axis=2)
    rgb = np.ascontiguousarray(values[:, :, :3])
    alpha = np.ascontiguousarray(values[:, :, 3]) if values.shape[2] == 4 else None
    return LoadedImage(path=Path(label), rgb=rgb, alpha=alpha, bit_depth=depth)


def _unit_range(array: np.ndarray, label: str) -> tuple[np.ndarray, int]:
    """float32 values in [0, 1] and the bit depth they came from."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0, DEPTH_8
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0, DEPTH_16
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float32)
        if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1:
            raise UsageError(f"{label}: float images hold values in [0, 1] (found {values.min()}..{values.max()})")
        return values, DEPTH_FLOAT
    raise UsageError(f"{label}: image arrays are uint8, uint16 or float in [0, 1], not {array.dtype}")


def _from_pillow(image: Image.Image, label: str) -> LoadedImage:
    from ldmtool.io.images import _to_arrays  # the reader's own mode conversions, so pixels match a file's

    orientation = image.getexif().get(0x0112)
    if orientation not in (None, 1):
        image = ImageOps.exif_transpose(image)
    rgb, alpha, depth = _to_arrays(image, Path(label))
    return LoadedImage(path=Path(label), rgb=rgb, alpha=alpha, bit_depth=depth)


def as_list(value: Any) -> list[Any]:
    """A value or sequence of values as a list (a lone string is one value)."""
    if value is None:
        return []
    if isinstance(value, (str, int)):
        return [value]
    return list(value)


def to_model_range(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] or uint8 → (1, 3, H, W) float32 in [-1, 1]."""
    import torch

    if rgb.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 127.5 - 1
    return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None] * 2 - 1


def to_array(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] → (H, W, 3) float32 numpy."""
    return image.permute(1, 2, 0).contiguous().numpy()
