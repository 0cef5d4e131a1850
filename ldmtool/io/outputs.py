"""Output paths: `-o` file or folder, mirrored subfolders, the name template (DESIGN.md §6).

The template fields are `{stem}` (input file stem or the generated item's name), `{suffix}` (`_TEXT` for
`--suffix TEXT`, else empty; a template without it gets it after the stem, as Real-ESRGAN's `--suffix`),
`{index}` (0-based position of the item in the sorted run, format specs allowed: `{index:04d}`; positional,
so adding an input renumbers the ones after it), `{seed}` (the item's seed, derived from a file item's name:
stable) and `{ext}` (the output format's extension, added when the template has no image extension).
`--format keep` gives each item its input's format (png for inputs ldmtool cannot write). No rendered name
may leave the output folder. `-o` with any image extension names a file, never a folder; one ldmtool cannot
write (.gif, .bmp) is a usage error.
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
from ldmtool.io.files import shown
from ldmtool.io.images import IMAGE_SUFFIXES
from ldmtool.io.writer import FORMATS, KEEP, format_for_path, format_name

DEFAULT_TEMPLATE = "{stem}.{ext}"
DEFAULT_OUTPUT_DIR = Path("out")
NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems
TEMPLATE_FIELDS = ("stem", "suffix", "index", "seed", "ext")


@dataclass(frozen=True)
class OutputSpec:
    """Where outputs go: `target` is the -o value (None: ./out/), `fmt` the --format value, `suffix` the
    --suffix value. An -o file ldmtool cannot write is a usage error here, before anything is made."""

    target: Optional[Path] = None
    template: str = DEFAULT_TEMPLATE
    fmt: Optional[str] = None
    suffix: Optional[str] = None

    def __post_init__(self) -> None:
        if self.fmt:
            format_name(self.fmt)
        if self.suffix is not None and (not self.suffix or any(sep in self.suffix for sep in "/\\\0")):
            raise UsageError(f"--suffix {self.suffix!r}: give a non-empty text without path separators")
        if self.is_file:
            _file_format(Path(self.target or ""), self.fmt)

    @property
    def is_file(self) -> bool:
        """-o names a single image file (any image extension, and not an existing folder)."""
        return self.target is not None and self.target.suffix.lower() in IMAGE_SUFFIXES and not self.target.is_dir()

    @property
    def folder(self) -> Path:
        """The folder that holds the outputs (and the manifest)."""
        if self.target is None:
            return DEFAULT_OUTPUT_DIR
        return self.target.parent if self.is_file else self.target


def _file_format(target: Path, fmt: Optional[str]) -> str:
    """The format of an -o file: its extension's (which must be one ldmtool writes), agreeing with --format."""
    kind = format_for_path(target)
    if fmt and format_name(fmt) not in (kind, KEEP):
        raise UsageError(f"--format {fmt} disagrees with the extension of -o {shown(target)}")
    return kind


def kept_extension(item: Item) -> Optional[str]:
    """With --format keep: the extension of the item's input when ldmtool writes that format ('jpeg' stays
    'jpeg', '.TIF' becomes 'tif'), else None (the output is png)."""
    suffix = item.path.suffix.lower() if item.path is not None else ""
    return suffix[1:] if suffix in FORMATS else None


def format_notes(items: Sequence[Item], spec: OutputSpec) -> list[str]:
    """The note --format keep gives once for the inputs whose format ldmtool cannot write."""
    if spec.is_file or not spec.fmt or format_name(spec.fmt) != KEEP:
        return []
    others = sorted({shown(item.path.suffix.lower()) or "(none)" for item in items
                     if item.path is not None and kept_extension(item) is None})
    if not others:
        return []
    return [f"--format keep: ldmtool cannot write {', '.join(others)} images; those outputs are png"]


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
            raise UsageError(f"--name {template!r}: unknown field {{{name}}}; use {{stem}} {{suffix}} {{index}} "
                             "{seed} {ext}")
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


def render_name(template: str, *, stem: str, index: int, seed: int, ext: str, suffix: Optional[str] = None) -> str:
    """One output name; `suffix` TEXT renders as `_TEXT` at {suffix}, or after {stem} when the template has
    no {suffix}."""
    tail = f"_{suffix}" if suffix else ""
    if tail and "{suffix" not in template:
        stem, tail = stem + tail, ""
    name = template.format(stem=stem, suffix=tail, index=index, seed=seed, ext=ext)
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
    fmt = format_name(spec.fmt) if spec.fmt else "png"
    ext = (kept_extension(item) or "png") if fmt == KEEP else fmt
    folder = spec.folder
    name = render_name(spec.template, stem=item.stem, index=index, seed=seed, ext=ext, suffix=spec.suffix)
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
        raise UsageError(f"-o {shown(target)} names one file but there are {len(items)} items; give a folder instead")
    _file_format(target, spec.fmt)
    return target


def _check_inside(path: Path, folder: Path, item: Item) -> None:
    root = folder.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise UsageError(f"{item.label}: its output name {shown(path)} would leave the output folder {shown(folder)}")
    if resolved == root:
        raise UsageError(f"{item.label}: the name template gives an empty file name")


def _check_no_collisions(items: Sequence[Item], paths: Sequence[Path]) -> None:
    owner: dict[Path, Item] = {}
    for item, path in zip(items, paths):
        other = owner.setdefault(path.resolve(), item)
        if other is not item:
            raise UsageError(f"{other.label} and {item.label} would both be written to {shown(path)}; "
                             "add {seed} to --name (a file item's seed comes from its name, so it stays put "
                             "when inputs are added; {index} is the position in the run and renumbers)")
