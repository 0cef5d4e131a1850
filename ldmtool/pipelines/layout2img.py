"""Layout to image: JSON/YAML layouts of labelled boxes through the LDM layout2img-openimages256 model.

A layout file holds objects with an OpenImages label and a box `[x0, y0, x1, y1]` (corners), either in
pixels or as fractions 0..1 of the image:

    {"size": [256, 256], "objects": [{"label": "Person", "box": [40, 60, 120, 250]},
                                     {"label": "Dog", "box": [0.5, 0.6, 0.9, 0.95], "group_of": false}]}

`units` ("pixels" | "relative") may be given; otherwise boxes whose numbers all lie in 0..1 are relative.
Pixel boxes are measured in the layout's `size` when given, else in the output size. The output size is
`--width/--height` when given (one of them alone keeps the layout's aspect), else the layout's `size`, else
the model's native size (`layout_output_size`). A bare list of objects
is also a layout. Each object may set `group_of`, `occluded`, `depiction`, `inside` (OpenImages flags).
The boxes become the model's token sequence (see layout_tokens) and, for ldmtool's own layout models, also
a coverage map per class concatenated to the UNet input (see box_raster); with `--draw-boxes` a copy of each
result with the boxes drawn is written beside it as `<name>.boxes.png` (no part of the job's identity: a rerun
with it draws the previews of done items). Above the model's native size the tiled
engine gives every tile its own context: the objects keep their image coordinates and the last two tokens
name the tile's crop, as the reference does per patch of a large image.
"""
from __future__ import annotations

import functools
import glob
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

import numpy as np
import torch
import yaml

from ldmtool.checkpoints.bundle import LatentDiffusionBundle
from ldmtool.diffusion.cond import Cond
from ldmtool.errors import FatalError, ItemError, LdmError, UsageError
from ldmtool.families.info import Conditioning
from ldmtool.io.discover import (  # the image inputs' rules
    GLOB_CHARS,
    GeneratedItems,
    Item,
    glob_root,
    list_file_lines,
    list_lines,
)
from ldmtool.io.files import read_text_file, shown
from ldmtool.io.unique_yaml import UniqueKeyLoader
from ldmtool.pipelines.base import input_path
from ldmtool.pipelines.box_raster import box_raster
from ldmtool.pipelines.engine import Engine, method
from ldmtool.pipelines.layout_tokens import BoxTokenizer, LayoutObject, category_name, category_number, tokenizer_for
from ldmtool.pipelines.sample import GeneratorTask, check_sample_count
from ldmtool.runtime.jobs import Job, Output

LAYOUT_SUFFIXES = frozenset({".json", ".yaml", ".yml"})
_FLAGS = ("group_of", "occluded", "depiction", "inside")
_MAX_LAYOUT_BYTES = 1 << 20
# Box outline colours of the preview, cycled per object.
_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


# ---------------------------------------------------------------- finding layout files


def find_layouts(inputs: Sequence[str], *, recursive: bool = False, samples: int = 1,
                 stdin: Optional[TextIO] = None) -> Sequence[Item]:
    """Items for layout files, folders, globs, @list.txt files and '-' (a list on stdin), as image inputs are
    given; with `samples` > 1, one item per (file, sample), made when they are asked for (`LayoutSamples`)."""
    if not inputs:
        raise UsageError("no inputs given; name layout files (.json/.yaml) or folders of them")
    if samples < 1:
        raise UsageError(f"--n {samples}: must be at least 1")
    found: list[tuple[Path, Path]] = []
    for raw in inputs:
        found += _expand(raw, recursive, stdin or sys.stdin)
    if not found:
        raise UsageError(f"no layout files (.json, .yaml, .yml) in {', '.join(inputs)}")
    files = _unique(found)
    check_sample_count(samples, labels=len(files))  # --n 10**11 built 10**11 items before anything ran
    if samples > 1 and _names_apart(files):
        return LayoutSamples(files, samples)
    return [_item(path, root, sample if samples > 1 else None) for path, root in files for sample in range(samples)]


def _expand(raw: str, recursive: bool, stdin: TextIO, *, base: Optional[Path] = None) -> list[tuple[Path, Path]]:
    """(layout file, the folder its output name is relative to) for one input; `base`: the folder of the
    @list it came from (its relative lines start there, and a missing one fails as an item)."""
    raw = raw.strip()
    from_list = base is not None
    if raw == "-" and not from_list:
        return [f for line in list_lines(stdin.read()) for f in _expand(line, recursive, stdin, base=Path("."))]
    if raw.startswith("@") and not from_list:
        list_file = Path(raw[1:])
        return [f for line in list_file_lines(list_file) for f in _expand(line, recursive, stdin, base=list_file.parent)]
    path = Path(raw).expanduser()
    path = path if base is None or path.is_absolute() else base / path
    if path.is_dir():
        return [(p, path) for p in _walk(path, recursive)]
    if path.is_file() or from_list:
        return [(path, path.parent)]
    if GLOB_CHARS.search(raw):
        files = [Path(m) for m in sorted(glob.glob(str(path), recursive=True))
                 if Path(m).is_file() and Path(m).suffix.lower() in LAYOUT_SUFFIXES and not Path(m).name.startswith(".")]
        if not files:
            raise UsageError(f"{raw}: no layout files (.json, .yaml, .yml) match this pattern")
        return [(file, glob_root(str(path))) for file in files]
    raise UsageError(f"{raw}: no such file or folder")


def _walk(folder: Path, recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern)
                  if p.is_file() and p.suffix.lower() in LAYOUT_SUFFIXES and not p.name.startswith("."))


def _unique(found: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    seen: set[Path] = set()
    unique = []
    for path, root in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append((path, root))
    return unique


def _item(path: Path, root: Path, sample: Optional[int]) -> Item:
    """The item of a layout file (`sample` None: its only one) or of one of its `--n` samples."""
    relative = path.relative_to(root)
    subdir = relative.parent.as_posix()
    subdir = "" if subdir == "." else subdir
    key = relative.as_posix()
    if sample is None:
        return Item(key=key, stem=path.stem, path=path, subdir=subdir)
    return Item(key=f"{key}/{sample}", stem=f"{path.stem}-{sample}", path=path, subdir=subdir, data={"sample": sample})


def _names_apart(files: list[tuple[Path, Path]]) -> bool:
    """Whether no two layout files share a folder and a stem (`x.json`, `x.yaml`): their samples' outputs then
    cannot collide, and need no plan of every output to find out."""
    names = {(_item(path, root, None).subdir, path.stem) for path, root in files}
    return len(names) == len(files)


class LayoutSamples(GeneratedItems):
    """The `--n` items of each layout file, file-major, made when they are asked for as generated items are:
    `--n 100000000` holds only the list of files. The same keys, stems and seeds as an eager list."""

    lazy = True  # the inputs are layout files: never an output of the run, nothing to keep apart from them

    def __init__(self, files: list[tuple[Path, Path]], samples: int):
        super().__init__([str(path) for path, _ in files], samples, "layout", None)
        self.files = files

    def _item(self, position: int) -> Item:
        index, sample = divmod(position, self.samples)
        path, root = self.files[index]
        return _item(path, root, sample)


# ---------------------------------------------------------------- reading layouts


@dataclass(frozen=True)
class Layout:
    """A layout read for one item: its objects (boxes as fractions) and the item's output (width, height)."""

    objects: list[LayoutObject]
    size: tuple[int, int]


def layout_output_size(layout_size: Optional[tuple[float, float]], width: Optional[int], height: Optional[int],
                       native: tuple[int, int]) -> tuple[int, int]:
    """An item's output (width, height): `--width/--height` when both are given; one of them alone keeps the
    layout's aspect (or takes the model's native other side); neither: the layout's `size`, else `native`."""
    if width and height:
        return width, height
    if layout_size is None:
        return width or native[0], height or native[1]
    layout_w, layout_h = layout_size
    if width:
        return width, max(1, round(layout_h * width / layout_w))
    if height:
        return max(1, round(layout_w * height / layout_h)), height
    return max(1, round(layout_w)), max(1, round(layout_h))


def read_layout(path: Path, width: int, height: int) -> list[LayoutObject]:
    """The objects of a layout file with boxes as fractions of the image; ItemError naming the problem."""
    return layout_objects(_load_document(path), path, width, height)


def layout_objects(doc: Any, path: Path | str, width: int, height: int) -> list[LayoutObject]:
    """The objects of a layout document (the parsed JSON/YAML; `path` names it in errors)."""
    size, units, objects = _layout_parts(doc, path)
    ref_w, ref_h = size or (width, height)
    guessed = units is None
    if units is None:
        units = "relative" if all(0 <= v <= 1 for o in objects for v in _raw_box(o, path, 0)) else "pixels"
    read = [_layout_object(o, index, path, units, ref_w, ref_h) for index, o in enumerate(objects)]
    if guessed and units == "pixels":
        _refuse_subpixel_boxes(objects, read, path, ref_w, ref_h)
    return read


def _refuse_subpixel_boxes(objects: list[Any], read: list[LayoutObject], path: Path | str, width: float,
                           height: float) -> None:
    """ItemError for a box under one pixel where the units were guessed: `[0.1, 0.1, 1.5, 0.5]` meant as
    fractions, read in pixels because of its 1.5, would silently be a speck."""
    for index, (obj, layout_object) in enumerate(zip(objects, read)):
        x0, y0, x1, y1 = layout_object.box
        if (x1 - x0) * width < 1 or (y1 - y0) * height < 1:
            raise ItemError(f"{shown(path)}: object {index} ({obj['label']}): box {_raw_box(obj, path, index)} is "
                            "under one pixel; its numbers are read in pixels, as one is above 1: for fractions of "
                            "the image keep every number within 0..1, or give \"units\"")


def _load_document(path: Path) -> Any:
    try:
        text = read_text_file(path, _MAX_LAYOUT_BYTES)
    except (OSError, UnicodeDecodeError) as err:
        raise ItemError(f"{shown(path)}: cannot read the layout ({getattr(err, 'strerror', None) or err})") from None
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    text = text.removeprefix("\ufeff")  # the byte order mark Windows editors write (YAML skips it, JSON refuses it)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys) if kind == "JSON" else yaml.load(text, UniqueKeyLoader)
    except (ValueError, yaml.YAMLError) as err:  # ValueError: also a JSON number of over 4300 digits
        raise ItemError(f"{shown(path)}: not valid {kind} ({' '.join(str(err).split())[:200]})") from None
    except RecursionError:
        raise ItemError(f"{shown(path)}: not a layout ({kind} nested too deep)") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json keeps the last silently: a second "objects" list
    would drop the first)."""
    mapping: dict[str, Any] = {}
    for key, value in pairs:
        if key in mapping:
            raise ValueError(f"the key {key!r} is given twice")
        mapping[key] = value
    return mapping


def _layout_parts(doc: Any, path: Path | str) -> tuple[Optional[tuple[float, float]], Optional[str], list[Any]]:
    if isinstance(doc, list):
        doc = {"objects": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("objects"), list) or not doc["objects"]:
        raise ItemError(f"{shown(path)}: a layout needs \"objects\": a list of {{\"label\": ..., \"box\": [x0, y0, x1, y1]}}")
    size = doc.get("size")
    if size is not None:
        if not (isinstance(size, list) and len(size) == 2 and all(_number(v) and v > 0 for v in size)):
            raise ItemError(f"{shown(path)}: \"size\" must be [width, height] in pixels, not {size!r}")
        size = (float(size[0]), float(size[1]))
    units = doc.get("units")
    if units not in (None, "pixels", "relative"):
        raise ItemError(f"{shown(path)}: \"units\" must be \"pixels\" or \"relative\", not {units!r}")
    return size, units, doc["objects"]


def _number(value: Any) -> bool:
    """A finite number a float can hold (JSON/YAML also give NaN, infinities and ints of any size)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _raw_box(obj: Any, path: Path | str, index: int) -> list[float]:
    box = obj.get("box") if isinstance(obj, dict) else None
    if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)):
        raise ItemError(f"{shown(path)}: object {index} needs \"box\": [x0, y0, x1, y1], not {box!r}")
    return [float(v) for v in box]


def _layout_object(obj: Any, index: int, path: Path | str, units: str, width: float, height: float) -> LayoutObject:
    if not isinstance(obj, dict) or not isinstance(obj.get("label"), str):
        raise ItemError(f"{shown(path)}: object {index} needs a \"label\" (an OpenImages class name)")
    label = obj["label"]
    try:
        category = category_number(label)
    except UsageError as err:
        raise ItemError(f"{shown(path)}: object {index}: {err}") from None
    x0, y0, x1, y1 = _raw_box(obj, path, index)
    limit_w, limit_h = (1.0, 1.0) if units == "relative" else (width, height)
    if x1 <= x0 or y1 <= y0:
        raise ItemError(f"{shown(path)}: object {index} ({label}): box {[x0, y0, x1, y1]} is empty (need x0 < x1 and y0 < y1)")
    if min(x0, y0) < 0 or x1 > limit_w or y1 > limit_h:
        where = "0..1" if units == "relative" else f"the {width:g}x{height:g} image"
        raise ItemError(f"{shown(path)}: object {index} ({label}): box {[x0, y0, x1, y1]} lies outside {where}")
    flags = {name: obj.get(name, False) for name in _FLAGS}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise ItemError(f"{shown(path)}: object {index}: {', '.join(_FLAGS)} must be true or false")
    box = (x0 / limit_w, y0 / limit_h, x1 / limit_w, y1 / limit_h)
    return LayoutObject(category=category, box=box, **flags)


# ---------------------------------------------------------------- the task


class Layout2ImgTask(GeneratorTask):
    command = "layout2img"

    def __init__(self, engine: Engine, *, width: Optional[int] = None, height: Optional[int] = None,
                 draw_boxes: bool = False):
        super().__init__(engine, width=width, height=height)
        self.draw_boxes = draw_boxes
        self.tokenizer: Optional[BoxTokenizer] = None
        self.raster_classes: Optional[list[int]] = None  # category number of each box-raster channel

    def check_conditioning(self, bundle: LatentDiffusionBundle) -> None:
        self.tokenizer = tokenizer_for(bundle.info)
        if self.tokenizer is None:
            raise UsageError(f"{self.engine.model_path}: a {bundle.info.family} model cannot do layout2img (it needs a "
                             "box-token model such as layout2img-openimages256)")
        self.raster_classes = raster_classes(self.engine)
        self.params.update(draw_boxes=self.draw_boxes)

    def default_size(self) -> tuple[Optional[int], Optional[int]]:
        # any size, as a layout's own "size" gives: the canvas is padded to the model's multiple and cropped back
        return self.width, self.height  # per layout, see layout_output_size

    def own_defaults(self, info: Any) -> dict[str, Any]:
        return {}  # --width/--height left out: each layout's own size, not the model's

    def output_size(self, doc: Any, path: Path | str) -> tuple[int, int]:
        """The output (width, height) of an item with this layout document (after `check_model`)."""
        size, _, _ = _layout_parts(doc, path)
        return layout_output_size(size, self.width, self.height, self.engine.info.defaults.size)

    def planned_size(self, item: Item) -> Optional[tuple[int, int]]:
        """The output (width, height) an item will have, from its layout file and the options; None when it
        cannot be known yet (the model's native size before it is open) or the layout cannot be read (the item
        fails when it loads)."""
        path = item.path if item.path is not None else Path(item.key)
        try:
            size, _, _ = _layout_parts(_load_document(path), path)
        except ItemError:
            return None
        native = self.engine.info.defaults.size if getattr(self.engine, "bundle", None) is not None else None
        if native is None and not (self.width and self.height) and size is None:
            return None
        return layout_output_size(size, self.width, self.height, native or (0, 0))

    def layout(self, doc: Any, path: Path | str) -> Layout:
        """A layout document read at its item's output size, checked against the model."""
        size = self.output_size(doc, path)
        return Layout(self.check_input(layout_objects(doc, path, *size), path), size)

    def load(self, job: Job) -> Layout:
        path = input_path(job)
        return self.layout(_load_document(path), path)

    def canvas(self, job: Job) -> tuple[int, int]:
        layout: Layout = job.payload
        return layout.size

    def check_input(self, objects: list[LayoutObject], path: Path | str) -> list[LayoutObject]:
        """The layout's objects when this model can draw them (ItemError naming the layout otherwise)."""
        try:
            self._box_tokenizer().tokens(objects)
        except LdmError as err:
            raise ItemError(f"{shown(path)}: {err}") from None
        if self.raster_classes is not None:
            unknown = [o for o in objects if o.category not in self.raster_classes]
            if unknown:
                known = ", ".join(category_name(c) for c in self.raster_classes)
                raise ItemError(f"{shown(path)}: {category_name(unknown[0].category)!r} is not a class this model "
                                f"draws ({known})")
        return objects

    def _box_tokenizer(self) -> BoxTokenizer:
        assert self.tokenizer is not None, "check_conditioning() found the model's box tokenizer"
        return self.tokenizer

    def conditioning(self, engine: Engine, job: Job, latent_hw: tuple[int, int]) -> tuple[Cond, Optional[Cond]]:
        objects = job.payload.objects
        tokenizer = self._box_tokenizer()
        stage = method(engine.cond_stage("encode box tokens"), "encode")

        @functools.cache  # a tile keeps its place from step to step: encode it once
        def encode(crop: tuple[float, float, float, float]) -> torch.Tensor:
            tokens = torch.tensor([tokenizer.tokens(objects, crop)], dtype=torch.long, device=engine.device)
            with torch.inference_mode():
                return stage(tokens).to(engine.dtype)

        def tile_context(rect: tuple[int, int, int, int], canvas: tuple[int, int]) -> torch.Tensor:
            top, left, height, width = rect
            rows, cols = canvas
            return encode((left / cols, top / rows, min(1.0, (left + width) / cols), min(1.0, (top + height) / rows)))

        tile = tile_context if tokenizer.encode_crop else None
        return Cond(crossattn=encode((0.0, 0.0, 1.0, 1.0)), concat=self.raster(engine, job, latent_hw),
                    tile_crossattn=tile), None

    def raster(self, engine: Engine, job: Job, latent_hw: tuple[int, int]) -> Optional[torch.Tensor]:
        """The box raster of a hybrid layout model at latent resolution (None for token-only models)."""
        if self.raster_classes is None:
            return None
        width, height = self.canvas(job)
        boxes = [(self.raster_classes.index(o.category), o.box) for o in job.payload.objects]
        raster = box_raster(boxes, len(self.raster_classes), (height, width), latent_hw, engine.info.downsampling)
        return torch.from_numpy(raster)[None].to(engine.device, engine.dtype)

    def item_params(self, job: Job) -> dict[str, Any]:
        return {"layout": str(job.item.path),
                "objects": [{"label": category_name(o.category), "box": [round(v, 6) for v in o.box]}
                            for o in job.payload.objects]}

    def run(self, jobs: list[Job]) -> list[Output]:
        outputs = super().run(jobs)
        if self.draw_boxes:
            for job, output in zip(jobs, outputs):
                write_preview(job.output, output.image, job.payload.objects)
        return outputs

    def beside_done(self, job: Job) -> None:
        """With --draw-boxes, the preview of a done output that a run without it wrote (the preview is no
        part of the job: the rerun skips the item and draws its boxes over the output that is there)."""
        if not self.draw_boxes or preview_path(job.output).exists():
            return
        from ldmtool.io.images import read_image

        image = read_image(job.output).rgb
        path = input_path(job)
        write_preview(job.output, image, layout_objects(_load_document(path), path, image.shape[1], image.shape[0]))


def raster_classes(engine: Engine) -> Optional[list[int]]:
    """Category numbers of the box-raster channels of a hybrid layout model (its config's `classes`, in
    order), None for a token-only model; FatalError when the config and the UNet disagree."""
    info = engine.info
    if info.conditioning is not Conditioning.HYBRID:
        return None
    names, channels = info.raster_classes, info.concat_channels
    if not info.box_raster or len(names) != channels:
        raise FatalError(f"{engine.model_path}: a layout model with {channels} concatenated channels needs "
                         f"`ldmtool: box_raster: true` and one `classes` entry per channel (found {len(names)})")
    try:
        return [category_number(name) for name in names]
    except UsageError as err:
        raise FatalError(f"{engine.model_path}: {err}") from None


def preview_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.boxes.png")


def write_preview(output: Path, image: np.ndarray, objects: Sequence[LayoutObject]) -> None:
    """`output`'s image with each box outlined and labelled, as `<name>.boxes.png` (written atomically), with
    metadata that names what it previews (so `ldmtool info` reads it; no recipe: it replays nothing)."""
    from PIL import Image, ImageDraw

    from ldmtool import __version__
    from ldmtool.io.images import to_uint8
    from ldmtool.io.metadata import ImageMetadata
    from ldmtool.io.writer import write_image

    canvas = Image.fromarray(to_uint8(image))
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    line = max(1, min(width, height) // 128)
    for index, obj in enumerate(objects):
        colour = _COLOURS[index % len(_COLOURS)]
        x0, y0, x1, y1 = obj.box
        rect = [x0 * (width - 1), y0 * (height - 1), x1 * (width - 1), y1 * (height - 1)]
        draw.rectangle(rect, outline=colour, width=line)
        draw.text((rect[0] + line + 1, rect[1] + line), category_name(obj.category), fill=colour)
    path = preview_path(output)
    os.makedirs(path.parent, exist_ok=True)
    boxes = [{"label": category_name(o.category), "box": [round(v, 6) for v in o.box]} for o in objects]
    metadata = ImageMetadata(parameters=f"Box preview of {output.name}: {len(objects)} box(es) drawn over it",
                             recipe={"tool": "ldmtool", "version": __version__, "preview_of": output.name,
                                     "objects": boxes})
    write_image(path, np.asarray(canvas), metadata=metadata)
