"""Output paths: `-o` file or folder, mirrored subfolders, the name template (DESIGN.md §6).

The template fields are `{stem}` (input file stem or the generated item's name), `{index}` (0-based
position of the item in the sorted run, format specs allowed: `{index:04d}`), `{seed}` (the item's seed)
and `{ext}` (the output format's extension, added when the template has no image extension). No rendered
name may leave the output folder.
"""
from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ldmtool.errors import UsageError
from ldmtool.io.discover import Item
from ldmtool.io.writer import FORMATS, format_for_path, format_name

DEFAULT_TEMPLATE = "{stem}.{ext}"
DEFAULT_OUTPUT_DIR = Path("out")
NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems
TEMPLATE_FIELDS = ("stem", "index", "seed", "ext")


@dataclass(frozen=True)
class OutputSpec:
    """Where outputs go: `target` is the -o value (None: ./out/), `fmt` the --format value."""

    target: Optional[Path] = None
    template: str = DEFAULT_TEMPLATE
    fmt: Optional[str] = None

    @property
    def is_file(self) -> bool:
        """-o names a single image file (an image extension, and not an existing folder)."""
        return self.target is not None and self.target.suffix.lower() in FORMATS and not self.target.is_dir()

    @property
    def folder(self) -> Path:
        """The folder that holds the outputs (and the manifest)."""
        if self.target is None:
            return DEFAULT_OUTPUT_DIR
        return self.target.parent if self.is_file else self.target


def check_template(template: str) -> None:
    """Refuse unknown fields or bad format specs before anything runs."""
    if "\x00" in template:
        raise UsageError(f"--name {template!r}: a file name cannot contain a NUL character")
    try:
        fields = [(name, spec) for _, name, spec, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise UsageError(f"--name {template!r} is not a valid template ({err})") from None
    for name, spec in fields:
        if name not in TEMPLATE_FIELDS:
            raise UsageError(f"--name {template!r}: unknown field {{{name}}}; use {{stem}} {{index}} {{seed}} {{ext}}")
        _check_spec(template, spec or "")
    try:
        shortest = render_name(template, stem="x", index=0, seed=0, ext="png")
    except (ValueError, IndexError, KeyError) as err:
        raise UsageError(f"--name {template!r} is not a valid template ({err})") from None
    longest_part = max((len(os.fsencode(part)) for part in Path(shortest).parts), default=0)
    if longest_part > NAME_MAX:  # the template's fault for every item: stop before anything runs
        raise UsageError(f"--name {template!r} gives file names too long for the file system "
                         f"({longest_part} bytes with a one-letter stem; the limit is {NAME_MAX})")


def _check_spec(template: str, spec: str) -> None:
    """Refuse what would make rendering itself costly: a field inside a format spec (`{index:{seed}}`, whose
    width would be an item's seed) or a width or precision past the file-name limit (`{stem:>999999999}`)."""
    if "{" in spec:
        raise UsageError(f"--name {template!r}: a format spec cannot contain another field ({spec!r})")
    widths = [digits.lstrip("0") or "0" for digits in re.findall(r"[0-9]+", spec)]  # no int() of 5000 digits
    if any(len(width) > 3 or int(width) > NAME_MAX for width in widths):
        raise UsageError(f"--name {template!r}: the format spec {spec!r} is wider than a file name can be "
                         f"({NAME_MAX} bytes)")


def render_name(template: str, *, stem: str, index: int, seed: int, ext: str) -> str:
    name = template.format(stem=stem, index=index, seed=seed, ext=ext)
    if Path(name).suffix.lower() not in FORMATS:
        name = f"{name}.{ext}"
    return name


def plan_outputs(items: Sequence[Item], seeds: Sequence[int], spec: OutputSpec) -> list[Path]:
    """One output path per item; collisions and escapes are usage errors."""
    if spec.is_file:
        return [_single_file(items, spec)]
    check_template(spec.template)
    paths = [output_path(spec, item, index, seed) for index, (item, seed) in enumerate(zip(items, seeds))]
    _check_no_collisions(items, paths)
    return paths


def output_path(spec: OutputSpec, item: Item, index: int, seed: int) -> Path:
    """The output path of the `index`-th item in a folder run (`check_template` first); UsageError when the
    name would leave the folder or has no image format."""
    ext = format_name(spec.fmt) if spec.fmt else "png"
    folder = spec.folder
    name = render_name(spec.template, stem=item.stem, index=index, seed=seed, ext=ext)
    path = folder / item.subdir / name if item.subdir else folder / name
    _check_inside(path, folder, item)
    format_for_path(path)
    return path


def names_apart(template: str) -> bool:
    """Whether the template keeps the outputs of generated items apart by construction: it has `{index}`,
    or `{stem}` as it is (each generated item's stem starts with its own label and sample numbers)."""
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name == "index" or (name == "stem" and not spec and not conversion):
            return True
    return False


def _single_file(items: Sequence[Item], spec: OutputSpec) -> Path:
    target = Path(spec.target or "")
    if len(items) != 1:
        raise UsageError(f"-o {spec.target} names one file but there are {len(items)} items; give a folder instead")
    if spec.fmt and format_name(spec.fmt) != format_for_path(target):
        raise UsageError(f"--format {spec.fmt} disagrees with the extension of -o {spec.target}")
    return target


def _check_inside(path: Path, folder: Path, item: Item) -> None:
    root = folder.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise UsageError(f"{item.label}: its output name {path} would leave the output folder {folder}")
    if resolved == root:
        raise UsageError(f"{item.label}: the name template gives an empty file name")


def _check_no_collisions(items: Sequence[Item], paths: Sequence[Path]) -> None:
    owner: dict[Path, Item] = {}
    for item, path in zip(items, paths):
        other = owner.setdefault(path.resolve(), item)
        if other is not item:
            raise UsageError(f"{other.label} and {item.label} would both be written to {path}; "
                             "add {index} or {seed} to --name")
