"""Output paths: `-o` file or folder, mirrored subfolders, the name template (DESIGN.md §6).

The template fields are `{stem}` (input file stem or the generated item's name), `{index}` (0-based
position of the item in the sorted run, format specs allowed: `{index:04d}`; positional, so adding an input
renumbers the ones after it), `{seed}` (the item's seed, derived from a file item's name: stable)
and `{ext}` (the output format's extension, added when the template has no image extension). No rendered
name may leave the output folder.
"""
from __future__ import annotations

import os
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
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise UsageError(f"--name {template!r} is not a valid template ({err})") from None
    for name in fields:
        if name not in TEMPLATE_FIELDS:
            raise UsageError(f"--name {template!r}: unknown field {{{name}}}; use {{stem}} {{index}} {{seed}} {{ext}}")
    try:
        shortest = render_name(template, stem="x", index=0, seed=0, ext="png")
    except (ValueError, IndexError, KeyError) as err:
        raise UsageError(f"--name {template!r} is not a valid template ({err})") from None
    longest_part = max((len(os.fsencode(part)) for part in Path(shortest).parts), default=0)
    if longest_part > NAME_MAX:  # the template's fault for every item: stop before anything runs
        raise UsageError(f"--name {template!r} gives file names too long for the file system "
                         f"({longest_part} bytes with a one-letter stem; the limit is {NAME_MAX})")


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
    ext = format_name(spec.fmt) if spec.fmt else "png"
    folder = spec.folder
    paths = []
    for index, (item, seed) in enumerate(zip(items, seeds)):
        name = render_name(spec.template, stem=item.stem, index=index, seed=seed, ext=ext)
        path = folder / item.subdir / name if item.subdir else folder / name
        _check_inside(path, folder, item)
        format_for_path(path)
        paths.append(path)
    _check_no_collisions(items, paths)
    return paths


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
                             "add {seed} to --name (a file item's seed comes from its name, so it stays put "
                             "when inputs are added; {index} is the position in the run and renumbers)")
