"""Contact sheets (`ldmtool grid DIR -o sheet.png`): a folder of outputs drawn as a labelled X/Y/Z grid.

Each image's recipe (`io/metadata.py`) gives its parameters. The axes are, in order of preference, the names
given (`--x/--y/--z`), the parameters a sweep recorded (`sweep: {"steps": 2, "cfg": 3}` in the recipe or its
parameters), else the parameters whose values vary across the folder (those that tell images apart; at most
three, the one with most values across). The third axis gives one sheet per value (`sheet-<value>.png`, a
short hash of the value added where two values would give one name), as A1111's X/Y/Z plot does. Memory stays
bounded whatever the folder's size: each image is opened, reduced to a thumbnail (JPEG decodes at a reduced
scale through `draft`) and pasted before the next is opened; only the recipes and the sheet itself are held,
and a sheet over `MAX_SHEET_PIXELS` (or over what its format can hold) is refused before any is drawn.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import numpy as np

from ldmtool.errors import ItemError, UsageError
from ldmtool.io.files import shown
from ldmtool.io.images import display_rgb
from ldmtool.io.metadata import read_metadata
from ldmtool.io.writer import FORMATS, MAX_SIDE, format_for_path, write_image

if TYPE_CHECKING:
    from PIL.Image import Image
    from PIL.ImageDraw import ImageDraw
    from PIL.ImageFont import FreeTypeFont, ImageFont

DEFAULT_CELL = 256
MAX_AXES = 3
_PAD = 4
_BACKGROUND = (255, 255, 255)
_CELL_BACKGROUND = (232, 232, 232)
_INK = (0, 0, 0)
# Recipe parameters that never make an axis: the sweep record itself, and what replay needs but a reader does not.
_NOT_AXES = {"sweep", "argv", "key"}
MAX_SHEET_PIXELS = 16384 * 16384  # as a run's default --max-output-pixels: about 800 MB to draw


@dataclass(frozen=True)
class Picture:
    """One image of the folder and the parameter values its recipe records."""

    path: Path
    values: dict[str, Any]
    sweep: tuple[str, ...] = ()


@dataclass
class Sheet:
    """One drawn sheet: where it went, its grid, and the label margins around the cells."""

    path: Path
    size: tuple[int, int]
    columns: int
    rows: int
    left: int  # width of the row-label band
    top: int  # height of the title and column-label bands
    cell: int


@dataclass
class GridResult:
    axes: list[Optional[str]]  # x, y, z; None for an axis not drawn
    sheets: list[Sheet] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_pictures(folder: Path) -> tuple[list[Picture], list[str]]:
    """The images directly in `folder` that carry an ldmtool recipe, by name; and notes on those left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{shown(folder)}: not a folder of images")
    pictures: list[Picture] = []
    without = 0
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or path.suffix.lower() not in FORMATS or not path.is_file():
            continue
        try:
            metadata = read_metadata(path)
        except ItemError:
            metadata = None
        if metadata is None or not metadata.recipe:
            without += 1
            continue
        pictures.append(picture_of(path, metadata.recipe))
    notes = [f"left out {without} image(s) without an ldmtool recipe"] if without else []
    return pictures, notes


def picture_of(path: Path, recipe: dict[str, Any]) -> Picture:
    """A recipe's parameters as one flat record: its parameters, seed and model name, sweep values first."""
    found = recipe.get("parameters")
    params: dict[str, Any] = found if isinstance(found, dict) else {}
    values: dict[str, Any] = {name: _scalar(value) for name, value in params.items() if name not in _NOT_AXES}
    values.setdefault("seed", recipe.get("seed"))
    if recipe.get("model"):
        values.setdefault("model", Path(str(recipe["model"])).name)
    sweep = recipe.get("sweep") if isinstance(recipe.get("sweep"), dict) else params.get("sweep")
    names: tuple[str, ...] = ()
    if isinstance(sweep, dict):
        names = tuple(str(name) for name in sweep)
        values.update({str(name): _scalar(value) for name, value in sweep.items()})
    return Picture(path, values, names)


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def choose_axes(pictures: Sequence[Picture], named: Sequence[Optional[str]] = ()) -> list[Optional[str]]:
    """The sheet's axes (x, y, z; fewer when fewer are needed): see the module docstring. Named axes keep their
    places, None where one is not named (`--y prompt` alone: [None, "prompt"], one column down)."""
    given = [name for name in named if name]
    if given:
        known = {name for picture in pictures for name in picture.values}
        for name in given:
            if name not in known:
                choices = ", ".join(sorted(known)) or "none"
                raise UsageError(f"no image records a parameter {name!r} (they record: {choices})")
        if len(set(given)) != len(given):
            raise UsageError(f"an axis is named twice: {', '.join(given)}")
        places = list(named[:MAX_AXES])
        while places and not places[-1]:
            places.pop()
        return [name or None for name in places]
    swept = list(dict.fromkeys(name for picture in pictures for name in picture.sweep))
    if swept:
        return list(swept[:MAX_AXES])
    names = sorted({name for picture in pictures for name in picture.values})
    varying = [name for name in names if len(_values(pictures, name)) > 1]
    varying.sort(key=lambda name: (len(_values(pictures, name)), name))  # fewest first: they refine best
    chosen: list[str] = []
    groups = 1
    for name in varying:
        count = len({tuple(_key(p.values.get(n)) for n in [*chosen, name]) for p in pictures})
        if count > groups:  # tells images apart that the axes so far do not
            chosen.append(name)
            groups = count
        if len(chosen) == MAX_AXES:
            break
    chosen.sort(key=lambda name: (-len(_values(pictures, name)), name))  # x: most values; z: fewest
    return list(chosen)


def _values(pictures: Iterable[Picture], name: str) -> list[Any]:
    """The distinct values of one parameter, numbers in numeric order, then text."""
    distinct = {_key(p.values.get(name)): p.values.get(name) for p in pictures}
    return [distinct[key] for key in sorted(distinct)]


def _key(value: Any) -> tuple[int, float, str]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), str(value))
    return (1, 0.0, "" if value is None else str(value))


def draw_grid(
    folder: Path,
    output: Path,
    *,
    x: Optional[str] = None,
    y: Optional[str] = None,
    z: Optional[str] = None,
    cell: int = DEFAULT_CELL,
) -> GridResult:
    """Draw the images of `folder` as a labelled grid into `output` (one sheet per z value)."""
    if cell < 16:
        raise UsageError(f"--cell {cell}: must be at least 16 pixels")
    output = sheet_path(output)
    pictures, notes = read_pictures(folder)
    if not pictures:
        raise UsageError(f"{shown(folder)}: no images with an ldmtool recipe to draw")
    axes = choose_axes(pictures, [x, y, z])
    result = GridResult(axes=axes, notes=notes)
    x_axis, y_axis, z_axis = (axes + [None, None, None])[:3]
    z_values = _values(pictures, z_axis) if z_axis else [None]
    paths = _z_paths(output, z_values) if z_axis else [output]
    crowded = 0
    layouts = []
    for z_value, path in zip(z_values, paths):
        members = [p for p in pictures if z_axis is None or _key(p.values.get(z_axis)) == _key(z_value)]
        layouts.append(_layout(members, path, x_axis, y_axis, (z_axis, z_value) if z_axis else None, cell))
    for layout in layouts:  # every sheet fits before the first is drawn
        _check_size(layout, cell)
    for layout in layouts:
        sheet, extra = _draw_sheet(layout)
        result.sheets.append(sheet)
        crowded += extra
    if crowded:
        result.notes.append(f"{crowded} image(s) share a grid cell with another and are not drawn; "
                            "name the axes that tell them apart with --x/--y/--z")
    return result


def sheet_path(output: Path) -> Path:
    """`output` with `.png` added when it has no extension; a usage error when ldmtool cannot write its format."""
    output = Path(output)
    if not output.suffix:
        output = output.with_name(output.name + ".png")
    format_for_path(output)
    return output


def _z_paths(output: Path, values: Sequence[Any]) -> list[Path]:
    """One sheet per z value, `sheet-<value>.png`; values whose names would clash (once made safe, cut to 60
    characters, or only in case, for case-blind file systems) get a short hash of the value as well."""
    names = [re.sub(r"[^A-Za-z0-9._-]+", "_", _text(value)).strip("_")[:60] or "none" for value in values]
    clashing = _clashing(names)
    names = [f"{name}-{_digest(value)}" if name.casefold() in clashing else name for name, value in zip(names, values)]
    if _clashing(names):  # a value's own text looked like another's name and hash
        names = [f"{name}-{index}" for index, name in enumerate(names, 1)]
    return [output.with_name(f"{output.stem}-{name}{output.suffix}") for name in names]


def _clashing(names: Sequence[str]) -> set[str]:
    folded = [name.casefold() for name in names]
    return {name for name in folded if folded.count(name) > 1}


def _digest(value: Any) -> str:
    return hashlib.sha256(repr(_key(value)).encode("utf-8", "surrogateescape")).hexdigest()[:8]


@dataclass
class _Layout:
    """Where everything of one sheet goes, measured before its pixels are allocated."""

    pictures: Sequence[Picture]
    path: Path
    x_axis: Optional[str]
    y_axis: Optional[str]
    title: Optional[tuple[str, Any]]
    cell: int
    columns: list[Any]
    rows: list[Any]
    row_labels: list[str]
    line: int
    left: int
    top: int

    @property
    def size(self) -> tuple[int, int]:
        return self.left + len(self.columns) * self.cell, self.top + len(self.rows) * self.cell


def _layout(pictures: Sequence[Picture], path: Path, x_axis: Optional[str], y_axis: Optional[str],
            title: Optional[tuple[str, Any]], cell: int) -> _Layout:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    columns = _values(pictures, x_axis) if x_axis else [None]
    rows = _values(pictures, y_axis) if y_axis else [None]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = _text_size(probe, "Ag", font)[1] + 2 * _PAD
    row_labels = [_label(y_axis, value) for value in rows] if y_axis else []
    left = min(max((_text_size(probe, text, font)[0] for text in row_labels), default=0) + 2 * _PAD,
               max(3 * cell, 360)) \
        if y_axis else 0
    top = (line if x_axis else 0) + (line if title else 0)
    return _Layout(pictures, path, x_axis, y_axis, title, cell, columns, rows, row_labels, line, left, top)


def _check_size(layout: _Layout, cell: int) -> None:
    """A UsageError, before anything is allocated, for a sheet too large to draw or for its format to hold."""
    width, height = layout.size
    fix = f"use a smaller --cell (now {cell}) or axes with fewer values (--x/--y/--z)"
    if width * height > MAX_SHEET_PIXELS:
        raise UsageError(f"{shown(layout.path)}: the sheet would be {width}x{height} pixels "
                         f"({width * height / 1e6:.1f} MP), more than the {MAX_SHEET_PIXELS / 1e6:.1f} MP "
                         f"a sheet may have; {fix}")
    fmt = format_for_path(layout.path)
    side = MAX_SIDE.get(fmt)
    if side is not None and max(width, height) > side:
        raise UsageError(f"{shown(layout.path)}: the sheet would be {width}x{height} pixels, and {fmt} images hold "
                         f"at most {side} pixels a side; write .png, or {fix}")


def _draw_sheet(layout: _Layout) -> tuple[Sheet, int]:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    pictures, path, x_axis, y_axis, title, cell = (layout.pictures, layout.path, layout.x_axis, layout.y_axis,
                                                   layout.title, layout.cell)
    columns, rows, row_labels, line, left, top = (layout.columns, layout.rows, layout.row_labels, layout.line,
                                                  layout.left, layout.top)
    size = layout.size
    sheet = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((_PAD, _PAD), _fit(draw, _label(*title), font, size[0] - 2 * _PAD), fill=_INK, font=font)
    for column, value in enumerate(columns):
        if x_axis:
            text = _fit(draw, _label(x_axis, value), font, cell - 2 * _PAD)
            width = _text_size(draw, text, font)[0]
            draw.text((left + column * cell + (cell - width) // 2, top - line + _PAD), text, fill=_INK, font=font)
    for row, text in enumerate(row_labels):
        text = _fit(draw, text, font, left - 2 * _PAD)
        draw.text((_PAD, top + row * cell + (cell - line) // 2 + _PAD), text, fill=_INK, font=font)
    column_of = {_key(value): index for index, value in enumerate(columns)}
    row_of = {_key(value): index for index, value in enumerate(rows)}
    taken: set[tuple[int, int]] = set()
    crowded = 0
    for picture in pictures:
        place = (column_of[_key(picture.values.get(x_axis))] if x_axis else 0,
                 row_of[_key(picture.values.get(y_axis))] if y_axis else 0)
        if place in taken:
            crowded += 1
            continue
        taken.add(place)
        box = (left + place[0] * cell, top + place[1] * cell)
        draw.rectangle([box, (box[0] + cell - 1, box[1] + cell - 1)], fill=_CELL_BACKGROUND)
        thumb = thumbnail(picture.path, cell)
        if thumb is not None:
            sheet.paste(thumb, (box[0] + (cell - thumb.width) // 2, box[1] + (cell - thumb.height) // 2))
            thumb.close()
    write_image(path, np.asarray(sheet))  # encoded as its extension says
    sheet.close()
    return Sheet(path, size, len(columns), len(rows), left, top, cell), crowded


def thumbnail(path: Path, cell: int) -> Optional[Image]:
    """`path` reduced to fit `cell` x `cell` (RGB), or None when it cannot be read; one full image at most is
    decoded, and a JPEG only at the reduced scale `draft` allows."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.draft("RGB", (cell, cell))
            image.thumbnail((cell, cell))
            return display_rgb(image)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def _label(name: Optional[str], value: Any) -> str:
    return f"{name}: {_text(value)}"


def _text(value: Any) -> str:
    text = "-" if value is None else str(value)
    return " ".join(text.split())  # one line, whatever the prompt holds


def _text_size(draw: ImageDraw, text: str, font: ImageFont | FreeTypeFont) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return int(x1 - x0), int(y1 - y0)


def _fit(draw: ImageDraw, text: str, font: ImageFont | FreeTypeFont, width: int) -> str:
    """`text`, cut short with '...' to fit `width` pixels."""
    if _text_size(draw, text, font)[0] <= width:
        return text
    low, high = 0, len(text)
    while low < high:  # the longest prefix that fits with the ellipsis
        middle = (low + high + 1) // 2
        if _text_size(draw, text[:middle] + "...", font)[0] <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low] + "..."
