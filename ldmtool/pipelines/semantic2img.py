"""Semantic synthesis: images from label maps (the LDM semantic_synthesis256/512 landscape models).

Conventions of the reference (taming-transformers `SegmentationBase`, LDM `semantic_synthesis*` configs): a
label map holds one class id per pixel (0..181 for the released models, COCO-Stuff classes); it becomes a
one-hot map with the class index as channel (values 0/1, `np.eye(n)[labels]` then channels first), and the
model's `SpatialRescaler` cond stage (bilinear ×0.5 twice, then a 1×1 conv 182 → 3) turns it into 3 channels
at latent resolution that are concatenated to the latent (`concat` conditioning). Being spatial, it is cut
per tile by the tiled engine, so outputs larger than the training size work.

Inputs: index PNGs (mode P, L or I: pixel value = class id) or RGB maps with a palette YAML that names the
colour of each class (`156: "#87ceeb"` or `156: [135, 206, 235]`, optionally under a top-level `palette:`).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from ldmtool.checkpoints.bundle import LatentDiffusionBundle
from ldmtool.diffusion.cond import Cond
from ldmtool.errors import ItemError, UsageError
from ldmtool.io.discover import Item
from ldmtool.io.files import MAX_CONFIG_BYTES, read_bounded, read_text_file, shown
from ldmtool.io.images import max_pixels_default, read_error_reason
from ldmtool.io.unique_yaml import UniqueKeyLoader
from ldmtool.pipelines.base import input_path, input_size
from ldmtool.pipelines.engine import Engine, method
from ldmtool.pipelines.sample import GeneratorTask
from ldmtool.runtime.jobs import Job

# One-hot maps are encoded in row strips of at most this many elements (182 classes × 4096² would be 12 GB).
_STRIP_ELEMENTS = 1 << 24

Palette = dict[tuple[int, int, int], int]


# ---------------------------------------------------------------- palettes


def load_palette(path: Path | str) -> Palette:
    """colour → class id from a palette YAML; UsageError naming the file and the bad entry."""
    try:
        doc = yaml.load(read_text_file(path, MAX_CONFIG_BYTES), UniqueKeyLoader)  # a class id twice: refused
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{shown(path)}: cannot read the palette ({getattr(err, 'strerror', None) or err})") from None
    except yaml.YAMLError as err:
        raise UsageError(f"{shown(path)}: not valid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise UsageError(f"{shown(path)}: not a palette (YAML nested too deep)") from None
    if isinstance(doc, dict) and set(doc) == {"palette"}:
        doc = doc["palette"]
    if not isinstance(doc, dict) or not doc:
        raise UsageError(f"{shown(path)}: a palette maps class ids to colours, e.g. `156: \"#87ceeb\"`")
    palette: Palette = {}
    for key, value in doc.items():
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise UsageError(f"{shown(path)}: {key!r} is not a class id (a whole number from 0)")
        colour = _colour(value, path, key)
        if colour in palette:
            raise UsageError(f"{shown(path)}: classes {palette[colour]} and {key} have the same colour {_hex(colour)}")
        palette[colour] = key
    return palette


def _colour(value: Any, path: Path | str, key: int) -> tuple[int, int, int]:
    if isinstance(value, str) and len(value) == 7 and value.startswith("#"):
        try:
            red, green, blue = (int(value[i:i + 2], 16) for i in (1, 3, 5))
            return red, green, blue
        except ValueError:
            pass
    if isinstance(value, list) and len(value) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value):
        return value[0], value[1], value[2]
    raise UsageError(f"{shown(path)}: class {key}: colour {value!r} must be \"#rrggbb\" or [r, g, b] with 0-255")


def _hex(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


# ---------------------------------------------------------------- label maps


def read_label_map(path: Path, n_classes: int, palette: Optional[Palette] = None, *,
                   max_pixels: Optional[int] = None) -> np.ndarray:
    """(H, W) int64 class ids of a label map file; ItemError for unreadable files, unknown colours or ids."""
    return labels_of(_open_map(Path(path), max_pixels or max_pixels_default()), n_classes, palette, path)


def labels_of(image: Image.Image | np.ndarray, n_classes: int, palette: Optional[Palette],
              path: Path | str) -> np.ndarray:
    """(H, W) int64 class ids of a label map image, or of an array: (H, W) class ids, or (H, W, 3) colours
    (`path` names it in errors)."""
    if isinstance(image, np.ndarray):
        return _labels_of_array(image, n_classes, palette, path)
    if palette is not None:
        labels = _labels_from_colours(np.asarray(image.convert("RGB")), palette, path)
    elif image.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
        labels = np.asarray(image).astype(np.int64)
    else:
        labels = _labels_from_gray_rgb(np.asarray(image.convert("RGB")), path)
    _check_ids(labels, n_classes, path)
    return labels


def _labels_of_array(array: np.ndarray, n_classes: int, palette: Optional[Palette], path: Path | str) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] in (3, 4) and array.dtype == np.uint8:
        rgb = array[..., :3]
        labels = _labels_from_colours(rgb, palette, path) if palette is not None else _labels_from_gray_rgb(rgb, path)
    elif array.ndim == 2 and np.issubdtype(array.dtype, np.integer) and palette is None:
        labels = array.astype(np.int64)
    else:
        raise UsageError(f"{shown(path)}: a label map array is (H, W) integer class ids, or (H, W, 3) uint8 colours "
                         f"with a palette; not {array.dtype} {array.shape}")
    if labels.size and labels.min() < 0:
        raise UsageError(f"{shown(path)}: class ids are 0 or more")
    _check_ids(labels, n_classes, path)
    return labels


def _open_map(path: Path, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(read_bounded(path)))
            width, height = image.size
            if width * height > max_pixels:
                raise ItemError(f"{shown(path)}: {width}x{height} label map is over the limit of {max_pixels} pixels")
            image.load()
        return image
    except ItemError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ItemError(f"{shown(path)}: cannot read the label map ({read_error_reason(err)})") from None


def _labels_from_colours(rgb: np.ndarray, palette: Palette, path: Path | str) -> np.ndarray:
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in palette], dtype=np.int64)
    ids = np.array(list(palette.values()), dtype=np.int64)
    order = np.argsort(keys)
    keys, ids = keys[order], ids[order]
    where = np.clip(np.searchsorted(keys, packed), 0, len(keys) - 1)
    unknown = keys[where] != packed
    if unknown.any():
        y, x = (int(v[0]) for v in np.nonzero(unknown))
        raise ItemError(f"{shown(path)}: colour {_hex((int(rgb[y, x, 0]), int(rgb[y, x, 1]), int(rgb[y, x, 2])))} at pixel ({x}, {y}) is not in "
                        f"the palette ({int(unknown.sum())} pixel(s) have colours it does not list)")
    labels: np.ndarray = ids[where]
    return labels


def _labels_from_gray_rgb(rgb: np.ndarray, path: Path | str) -> np.ndarray:
    if not ((rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])).all():
        raise ItemError(f"{shown(path)}: a colour label map needs --palette FILE.yaml (class id → colour); "
                        "or save the map as an index PNG whose pixel values are class ids")
    return rgb[..., 0].astype(np.int64)


def _check_ids(labels: np.ndarray, n_classes: int, path: Path | str) -> None:
    bad = (labels < 0) | (labels >= n_classes)  # a 32-bit map (TIFF mode I) can hold negative values
    if bad.any():
        y, x = (int(v[0]) for v in np.nonzero(bad))
        raise ItemError(f"{shown(path)}: class id {int(labels[y, x])} at pixel ({x}, {y}) is not one of the model's "
                        f"{n_classes} classes (0-{n_classes - 1})")


def resize_labels(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map (class ids are never blended)."""
    h, w = labels.shape
    if (w, h) == (width, height):
        return labels
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    resized: np.ndarray = labels[rows[:, None], cols[None, :]]
    return resized


# ---------------------------------------------------------------- conditioning


def semantic_concat(stage: torch.nn.Module, labels: np.ndarray, n_classes: int, latent_hw: tuple[int, int], *,
                    device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The cond stage applied to the one-hot map: (1, C, h, w) at latent resolution.

    A SpatialRescaler only averages within aligned blocks of 2**n_stages pixels, so encoding row strips of a
    multiple of that height gives exactly the whole-map result with bounded memory.
    """
    height, width = labels.shape
    block = 2 ** int(getattr(stage, "n_stages", 0)) if hasattr(stage, "n_stages") else height
    rows = max(block, (_STRIP_ELEMENTS // max(1, n_classes * width)) // block * block)
    if height % block:
        rows = height
    ids = torch.from_numpy(labels)
    encode = method(stage, "encode")
    parts = []
    with torch.inference_mode():
        for top in range(0, height, rows):
            onehot = F.one_hot(ids[top:top + rows].to(device), n_classes).permute(2, 0, 1)[None].to(dtype)
            parts.append(encode(onehot))
    concat = torch.cat(parts, dim=2)
    if tuple(concat.shape[-2:]) != tuple(latent_hw):
        concat = F.interpolate(concat.float(), size=latent_hw, mode="bilinear", align_corners=False).to(dtype)
    return concat


class Semantic2ImgTask(GeneratorTask):
    """One image per label map file; the output has the map's size unless --width/--height say otherwise."""

    command = "semantic2img"
    reads_images = True

    def __init__(self, engine: Engine, *, palette: Optional[Path | str] = None, width: Optional[int] = None,
                 height: Optional[int] = None, max_pixels: Optional[int] = None):
        super().__init__(engine, width=width, height=height)
        self.palette_path = palette
        self.palette = load_palette(palette) if palette is not None else None
        self.max_pixels = max_pixels
        self.n_classes = 0

    def check_conditioning(self, bundle: LatentDiffusionBundle) -> None:
        n_classes = bundle.info.label_classes
        if n_classes is None:
            raise UsageError(f"{self.engine.model_path}: a {bundle.info.family} model takes no label maps, so it cannot do "
                             f"{self.command} from maps (it needs a model such as semantic_synthesis256/512)")
        self.n_classes = n_classes
        if self.palette is not None:
            too_big = [cid for cid in self.palette.values() if cid >= n_classes]
            if too_big:
                raise UsageError(f"{self.palette_path}: class {too_big[0]} is not one of the model's {n_classes} "
                                 f"classes (0-{n_classes - 1})")
        self.params.update(classes=n_classes, palette=None if self.palette_path is None else str(self.palette_path))

    def default_size(self) -> tuple[Optional[int], Optional[int]]:
        return self.width, self.height  # per map, see canvas()

    def own_defaults(self, info: Any) -> dict[str, Any]:
        return {}  # --width/--height left out: each label map's own size, not the model's

    def load(self, job: Job) -> np.ndarray:
        return read_label_map(input_path(job), self.n_classes, self.palette, max_pixels=self.max_pixels)

    def canvas(self, job: Job) -> tuple[int, int]:
        map_h, map_w = job.payload.shape
        return self.canvas_of(map_w, map_h)

    def planned_size(self, item: Item) -> Optional[tuple[int, int]]:
        """--width and --height, else the label map's size from its header (scaled to the one given)."""
        if self.width and self.height:
            return self.width, self.height
        size = input_size(item, self.max_pixels, upright=False)  # maps are read as stored
        return None if size is None else self.canvas_of(*size)

    def canvas_of(self, map_w: int, map_h: int) -> tuple[int, int]:
        """The output size for a map of this size: --width/--height, one of them (keeping the map's aspect),
        or the map's own."""
        if self.width and self.height:
            return self.width, self.height
        if self.width:
            return self.width, max(1, round(map_h * self.width / map_w))
        if self.height:
            return max(1, round(map_w * self.height / map_h)), self.height
        return map_w, map_h

    def conditioning(self, engine: Engine, job: Job, latent_hw: tuple[int, int]) -> tuple[Cond, Optional[Cond]]:
        width, height = self.canvas(job)
        labels = resize_labels(job.payload, width, height)
        pad_h = latent_hw[0] * engine.info.downsampling - height
        pad_w = latent_hw[1] * engine.info.downsampling - width
        if pad_h or pad_w:
            labels = np.pad(labels, ((0, pad_h), (0, pad_w)), mode="edge")
        device, dtype = engine.placement()
        concat = semantic_concat(engine.cond_stage("encode label maps"), labels, self.n_classes, latent_hw,
                                 device=device, dtype=dtype)
        return Cond(concat=concat), None

    def item_params(self, job: Job) -> dict[str, Any]:
        map_h, map_w = job.payload.shape
        return {"label_map": str(job.item.path), "label_map_size": [map_w, map_h]}
