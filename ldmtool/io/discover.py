"""Turning command-line inputs into items (DESIGN.md §6).

Inputs are files, folders (`recursive` to descend), globs, `@list.txt` files (one entry per line,
relative to the list's folder) and `-` (entries from stdin, relative to the working folder). Every item
has a stable key, the posix path relative to its input root (a folder or glob prefix; a named file's
root is its own folder), which the per-item seed and the output's subfolder derive from.

Mask pairing (for inpainting): `x.png` pairs with `x_mask.<ext>` beside it, which is then not an item
itself, or with the same relative name in a `--masks DIR` folder; two files named on the command line,
the second with no mask of its own, are an explicit (image, mask) pair, and that named mask wins.
"""
from __future__ import annotations

import glob
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, TextIO, overload

from ldmtool.errors import ItemError, UsageError
from ldmtool.io.files import read_text_file, shown
from ldmtool.io.images import IMAGE_SUFFIXES, is_image_path

MASK_SUFFIX = "_mask"
GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Item:
    """One unit of work: an input file, or something generated (a prompt and sample number, ...)."""

    key: str  # stable identity: relative posix path, or e.g. "prompt-0003/s1" for generated items
    stem: str  # output name stem ({stem} in the name template)
    path: Optional[Path] = None  # the input file; None for generated items
    mask: Optional[Path] = None
    subdir: str = ""  # folder mirrored under the output folder (posix, "" for none)
    data: Mapping[str, Any] = field(default_factory=dict)  # task-specific fields of generated items
    seed_offset: Optional[int] = None  # generated items: the run's seed + this (A1111's N, N+1, ...)
    seed: Optional[int] = None  # the item's own seed (a JSON prompt line's), used as it is

    @classmethod
    def generated(cls, key: str, stem: Optional[str] = None, **data: Any) -> "Item":
        """An item with no input file (txt2img prompts, unconditional samples)."""
        return cls(key=key, stem=sanitize_name(stem or key), data=data)

    @property
    def label(self) -> str:
        """How reports name the item: its input file, or its key, escaped as `shown` does (one line whatever
        the name holds)."""
        return shown(self.path if self.path is not None else self.key)

    def require_mask(self) -> Path:
        """The paired mask, or an ItemError that says where it was looked for."""
        if self.mask is None:
            raise ItemError(f"{self.label}: no mask found (expected {self.stem}{MASK_SUFFIX}.png beside it, "
                            "or the same name in --masks DIR)")
        return self.mask


@dataclass
class Discovery:
    """Items found plus the non-image files that were passed over (reported once)."""

    items: Sequence[Item]  # a list, or generated items made on demand (`generated_items`)
    skipped: list[Path] = field(default_factory=list)

    def notes(self) -> list[str]:
        if not self.skipped:
            return []
        names = ", ".join(shown(p) for p in self.skipped[:3]) + (" ..." if len(self.skipped) > 3 else "")
        return [f"skipped {len(self.skipped)} non-image file(s): {names}"]


@dataclass(frozen=True)
class _Candidate:
    path: Path
    root: Path
    explicit: bool  # named directly (command line or list), not found by a folder walk or glob

    @property
    def relative(self) -> Path:
        return self.path.relative_to(self.root)


def sanitize_name(text: str, max_length: int = 80) -> str:
    """A safe file-name stem from free text (prompts, layout names): no separators, dots or controls."""
    cleaned = re.sub(r"[^\w\-]+", "-", text, flags=re.UNICODE).strip("-_")
    return cleaned[:max_length].rstrip("-_") or "item"


def generated_items(labels: Sequence[str], *, samples: int = 1, kind: str = "item",
                    finish: Optional[Callable[[Item], Item]] = None) -> "GeneratedItems":
    """Items for generators: one per (label, sample), in label-major order; the n-th item's seed is the
    run's seed + n. Keys ('prompt-0003/1') and stems ('0003-1-a-red-fox') keep outputs apart and readable.
    Each item's `data` holds `label`, `index` and `sample`; `finish(item)` may add to it (a prompt line).
    The items are made when they are asked for, so `--n 100000000` takes no memory until they run."""
    return GeneratedItems(labels, samples, kind, finish)


class GeneratedItems(Sequence[Item]):
    """The items of `generated_items`, made on demand: a sequence of known length that holds only its
    labels. `representatives()` gives each label's first item with its number of samples (they share
    every planned property but the seed), so a run plan of 10^8 samples costs one item per label."""

    lazy = True  # no item has an input file: nothing to pair, hash or keep apart from the outputs

    def __init__(self, labels: Sequence[str], samples: int, kind: str, finish: Optional[Callable[[Item], Item]]):
        self.labels = list(labels)
        self.samples = samples
        self.kind = kind
        self.finish = finish
        self._slugs = [sanitize_name(label, max_length=60) if label.strip() else "" for label in self.labels]

    def __len__(self) -> int:
        return len(self.labels) * self.samples

    @overload
    def __getitem__(self, position: int) -> Item: ...
    @overload
    def __getitem__(self, position: slice) -> list[Item]: ...

    def __getitem__(self, position: int | slice) -> Item | list[Item]:
        if isinstance(position, slice):
            return [self._item(p) for p in range(*position.indices(len(self)))]
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"item {position} of {len(self)}")
        return self._item(position)

    def __iter__(self) -> Iterator[Item]:
        return (self._item(position) for position in range(len(self)))

    def representatives(self) -> Iterator[tuple[Item, int]]:
        return ((self._item(index * self.samples), self.samples) for index in range(len(self.labels)))

    def _item(self, position: int) -> Item:
        index, sample = divmod(position, self.samples)
        slug = self._slugs[index]
        stem = f"{index:04d}-{sample}" + (f"-{slug}" if slug and slug != "item" else "")
        item = Item(key=f"{self.kind}-{index:04d}/{sample}", stem=stem, seed_offset=position,
                    data={"label": self.labels[index], "index": index, "sample": sample})
        return item if self.finish is None else self.finish(item)


def discover(
    inputs: Iterable[str],
    *,
    recursive: bool = False,
    pair_masks: bool = False,
    masks_dir: Optional[Path] = None,
    stdin: Optional[TextIO] = None,
) -> Discovery:
    """Expand inputs into sorted items; a command-line path that does not exist is a UsageError."""
    inputs = list(inputs)
    if not inputs:
        raise UsageError("no inputs given; name image files, folders, globs, @list.txt or '-'")
    if masks_dir is not None and not Path(masks_dir).is_dir():
        raise UsageError(f"--masks {shown(masks_dir)}: no such folder")
    candidates: list[_Candidate] = []
    skipped: list[Path] = []
    for raw in inputs:
        _expand(raw, recursive, candidates, skipped, stdin or sys.stdin, from_list=False)
    candidates = _unique(candidates)
    if pair_masks:
        explicit_pair = _explicit_pair(inputs, candidates, masks_dir)
        if explicit_pair is not None:
            return Discovery([explicit_pair], skipped)
        candidates = [c for c in candidates if not _is_mask_of_another(c, candidates)]
    items = [_to_item(c, pair_masks, masks_dir) for c in candidates]
    _check_unique_keys(items)
    if not items:
        raise UsageError(f"no input images found in {' '.join(shown(raw) for raw in inputs)}")
    items.sort(key=lambda item: _natural_key(item.key))
    return Discovery(items, skipped)


def _expand(raw: str, recursive: bool, out: list[_Candidate], skipped: list[Path], stdin: TextIO,
            *, from_list: bool, base: Optional[Path] = None) -> None:
    raw = raw.strip()
    if "\x00" in raw:
        raise UsageError(f"{raw!r}: a path cannot contain a NUL character")
    if raw == "-" and not from_list:
        for line in list_lines(stdin.read()):
            _expand(line, recursive, out, skipped, stdin, from_list=True)
        return
    if raw.startswith("@") and not from_list:
        list_file = Path(raw[1:])
        for line in list_file_lines(list_file):
            _expand(line, recursive, out, skipped, stdin, from_list=True, base=list_file.parent)
        return
    path = Path(raw).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    try:
        is_dir, exists = path.is_dir(), path.exists() or path.is_symlink()
    except OSError as err:  # a name too long for the file system, a permission denied on the way
        raise UsageError(f"{shown(raw)}: cannot use this path ({err.strerror or err})") from None
    if is_dir:
        _walk(path, path, recursive, out, skipped)
    elif exists:
        out.append(_Candidate(path, path.parent, explicit=True))
    elif GLOB_CHARS.search(str(path)):
        _glob(path, out, skipped)
    elif from_list:
        out.append(_Candidate(path, path.parent, explicit=True))  # fails as an item: the batch goes on
    else:
        raise UsageError(f"{shown(raw)}: no such file or folder")


def list_file_lines(list_file: Path) -> list[str]:
    """The entries of an `@list.txt` input (a UsageError naming it when it cannot be read)."""
    try:
        text = read_text_file(list_file)
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{shown(list_file)}: cannot read the list file ({getattr(err, 'strerror', None) or err})") from None
    return list_lines(text)


def list_lines(text: str) -> list[str]:
    # lines end at '\n' only (and a '\r' before it): a file name may hold U+0085, U+2028, U+001C, ...
    return [line.strip() for line in text.split("\n") if line.strip() and not line.lstrip().startswith("#")]


def _walk(folder: Path, root: Path, recursive: bool, out: list[_Candidate], skipped: list[Path],
          visited: Optional[set[Path]] = None) -> None:
    visited = set() if visited is None else visited
    real = folder.resolve()
    if real in visited:
        return  # a symlink loop, or the same folder reached twice
    visited.add(real)
    try:
        entries = sorted(folder.iterdir())
    except OSError as err:
        raise UsageError(f"{shown(folder)}: cannot list the folder ({err.strerror or err})") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue  # hidden files, and our own temporary files
        if entry.is_dir():
            if recursive:
                _walk(entry, root, recursive, out, skipped, visited)
        elif is_image_path(entry):
            out.append(_Candidate(entry, root, explicit=False))
        elif not _bookkeeping(entry.name):
            skipped.append(entry)


# What ldmtool itself writes beside its outputs (gallery, manifests, shard membership, workflow record): an
# output folder read as input passes over them without naming them as skipped files.
_BOOKKEEPING = re.compile(r"^(index\.html|ldmtool-manifest.*\.jsonl|ldmtool-shard-\d+-of-\d+\.json|workflow\.jsonl)$")


def _bookkeeping(name: str) -> bool:
    return _BOOKKEEPING.match(name) is not None


def _glob(pattern: Path, out: list[_Candidate], skipped: list[Path]) -> None:
    text = str(pattern)
    root = glob_root(text)
    matches = sorted(glob.glob(text, recursive=True))
    # every entry but folders: a FIFO or device named *.png is an item that fails, naming itself
    files = [Path(m) for m in matches if not Path(m).is_dir() and not Path(m).name.startswith(".")]
    if not files:
        raise UsageError(f"{shown(text)}: no files match this pattern")
    for path in files:
        if is_image_path(path):
            out.append(_Candidate(path, root, explicit=False))
        else:
            skipped.append(path)


def glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard ('photos/*/x*.png' -> 'photos')."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if GLOB_CHARS.search(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _unique(candidates: list[_Candidate]) -> list[_Candidate]:
    seen: set[Path] = set()
    unique = []
    for candidate in candidates:
        resolved = candidate.path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(candidate)
    return unique


def _partner_of_mask(path: Path) -> Optional[str]:
    """'x_mask.png' -> 'x' (the stem of the image it belongs to)."""
    stem = path.stem
    return stem[: -len(MASK_SUFFIX)] if stem.endswith(MASK_SUFFIX) and len(stem) > len(MASK_SUFFIX) else None


def _is_mask_of_another(candidate: _Candidate, candidates: list[_Candidate]) -> bool:
    base = _partner_of_mask(candidate.path)
    if base is None:
        return False
    return any(other.path.parent == candidate.path.parent and other.path.stem == base for other in candidates)


def _find_mask(path: Path, relative: Path, masks_dir: Optional[Path]) -> Optional[Path]:
    if masks_dir is not None:
        found = _with_any_image_suffix(Path(masks_dir) / relative.parent, relative.stem, path.suffix)
        if found is not None:
            return found
    return _with_any_image_suffix(path.parent, path.stem + MASK_SUFFIX, path.suffix)


def _with_any_image_suffix(folder: Path, stem: str, preferred: str) -> Optional[Path]:
    suffixes = [preferred] + sorted(IMAGE_SUFFIXES - {preferred.lower()})
    for suffix in suffixes:
        for variant in {suffix, suffix.upper()}:
            candidate = folder / f"{stem}{variant}"
            if candidate.is_file():
                return candidate
    return None


def _explicit_pair(inputs: list[str], candidates: list[_Candidate], masks_dir: Optional[Path]) -> Optional[Item]:
    """`inpaint img.png mask.png`: two named files, the second with no mask of its own. The named mask wins
    over an `img_mask.png` beside the image or one in `--masks DIR`."""
    if len(inputs) != 2 or len(candidates) != 2 or not all(c.explicit for c in candidates):
        return None
    if any(raw.strip() == "-" or raw.strip().startswith("@") for raw in inputs):
        return None
    image, mask = candidates
    if _find_mask(mask.path, mask.relative, masks_dir) is not None:
        return None  # `inpaint a.png b.png` with b_mask.png beside b: two images, each with its own mask
    return Item(key=image.relative.as_posix(), stem=image.path.stem, path=image.path, mask=mask.path)


def _to_item(candidate: _Candidate, pair_masks: bool, masks_dir: Optional[Path]) -> Item:
    relative = candidate.relative
    mask = _find_mask(candidate.path, relative, masks_dir) if pair_masks else None
    subdir = relative.parent.as_posix()
    return Item(
        key=relative.as_posix(),
        stem=candidate.path.stem,
        path=candidate.path,
        mask=mask,
        subdir="" if subdir == "." else subdir,
    )


def _check_unique_keys(items: list[Item]) -> None:
    by_key: dict[str, Item] = {}
    for item in items:
        other = by_key.setdefault(item.key, item)
        if other is not item:
            raise UsageError(f"{shown(str(other.path))} and {shown(str(item.path))} would both be item "
                             f"'{shown(item.key)}' (same name); "
                             "pass their common parent folder instead so their subfolders keep them apart")


def _natural_key(text: str) -> list[tuple[int, str] | str]:
    """'img10' sorts after 'img9': runs of digits (any script's, odd places of the split) compare by value."""
    return [_number_key(part) if i % 2 else part.lower() for i, part in enumerate(re.split(r"(\d+)", text))]


def _number_key(digits: str) -> tuple[int, str]:
    """A digit run's value as (length, ASCII digits): no int() of thousands of digits, no '²' (isdigit but
    not a decimal digit)."""
    value = "".join(str(unicodedata.decimal(c)) for c in digits).lstrip("0")
    return len(value), value
