"""Training photographs from installed Debian packages (`--data debian:PACKAGE[,PACKAGE...]`).

Debian ships wallpapers as packages (`apt-get install lomiri-wallpapers-16.04 mate-backgrounds ...`), many of
them large photographs under free licences. This module lists an installed package's files from dpkg's own
file list, keeps the photographs, and records each image's licence and copyright holder from the package's
machine-readable `copyright` file (DEP-5), so a model's weights can carry the notices of what it learned from.

Which files count as photographs: raster JPEG files (the packages deliver renders and vector art as SVG, PNG
or WebP) of at least a megapixel (screenshots and previews are smaller), not nearly flat (a smooth abstract
render has almost no pixel-level detail; `MIN_DETAIL`), and not screenshots by name.

The test split is by image, never by crop: every size of one wallpaper forms one group (`group_key`), and a
group is held out when it is named in `HELD_OUT` or, for packages without a named list, when its hash falls
in the held-out fifth. Adding a package never moves another package's images between splits.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

from ldmtool.errors import UsageError

if TYPE_CHECKING:
    from PIL import Image

PREFIX = "debian:"
DPKG_INFO = Path("/var/lib/dpkg/info")
DOC_ROOT = Path("/usr/share/doc")
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg"})
MIN_PIXELS = 1_000_000
MIN_DETAIL = 0.01  # share of pixels of a 512-px thumbnail with a visible Laplacian (> 8 grey levels)
HELD_OUT_FIFTH = 5  # packages without a named list: a group is held out when its hash % 5 == 0

# Named held-out groups of the packages the shipped defaults train on (chosen by hand: two different
# scenes, a close-up texture and an indoor still life, so the split never moves).
HELD_OUT = frozenset(
    {
        "lomiri-wallpapers-16.04/life_by_Aitzol_Berasategi",
        "lomiri-wallpapers-16.04/Picture_1A_by_freespace",
    }
)
NAMED_PACKAGES = frozenset(key.split("/", 1)[0] for key in HELD_OUT)


@dataclass(frozen=True)
class DebianImage:
    key: str  # "package/path below the package's common image folder", e.g. "mate-backgrounds/nature/Aqua.jpg"
    path: Path
    package: str
    licence: str
    copyright: str

    @property
    def group(self) -> str:
        return group_key(self.key)


def group_key(key: str) -> str:
    """One wallpaper's group: the key without sizes, e.g. `Elephants_3840x2160.jpg` and `Elephants.jpg` ->
    `Elephants`; KDE's `Name/contents/images/2560x1600.jpg` -> `Name`."""
    package, rest = key.split("/", 1)
    if "/contents/" in rest:
        return f"{package}/{rest.split('/contents/', 1)[0]}"
    stem = re.sub(r"[_-]\d+x\d+$", "", rest.rsplit(".", 1)[0])
    return f"{package}/{stem}"


def is_held_out(group: str) -> bool:
    package = group.split("/", 1)[0]
    if package in NAMED_PACKAGES:
        return group in HELD_OUT
    digest = hashlib.sha256(f"ldmtool-held-out/{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_FIFTH == 0


def parse_spec(spec: str) -> list[str]:
    """`debian:a,b` -> ["a", "b"] (package names as Debian spells them)."""
    names = [name.strip() for name in spec[len(PREFIX):].split(",") if name.strip()]
    if not names:
        raise UsageError(f"--data {spec}: name at least one package, e.g. debian:lomiri-wallpapers-16.04")
    for name in names:
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", name):
            raise UsageError(f"--data {spec}: {name!r} is not a Debian package name")
    return names


def package_files(package: str, info_dir: Optional[Path] = None) -> list[Path]:
    """The files dpkg installed for `package` (its `.list`, any architecture)."""
    info_dir = info_dir or DPKG_INFO
    lists = sorted(info_dir.glob(f"{package}.list")) + sorted(info_dir.glob(f"{package}:*.list"))
    if not lists:
        raise UsageError(f"--data debian:{package}: package not installed (apt-get install {package})")
    return [Path(line) for line in lists[0].read_text(encoding="utf-8", errors="replace").splitlines() if line]


@dataclass(frozen=True)
class CopyrightEntry:
    patterns: tuple[str, ...]
    licence: str
    holders: str


def parse_copyright(text: str) -> list[CopyrightEntry]:
    """The `Files:` paragraphs of a DEP-5 copyright file, in order (later ones win, as DEP-5 says)."""
    entries = []
    for paragraph in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        current = None
        for line in paragraph.splitlines():
            if line[:1] in (" ", "\t") and current:
                fields[current] += "\n" + line.strip()
            elif ":" in line:
                current, value = line.split(":", 1)
                current = current.strip().lower()
                fields[current] = value.strip()
        if "files" in fields and "license" in fields:
            licence = fields["license"].splitlines()[0].strip()
            entries.append(CopyrightEntry(tuple(fields["files"].split()), licence, " ".join(fields.get("copyright", "").split())))
    return entries


def licence_of(path: Path, entries: Sequence[CopyrightEntry]) -> Optional[CopyrightEntry]:
    """The last entry with a pattern that matches `path`. Patterns name source-tree paths, which the package
    installs below another folder, so a pattern matches the installed path's tail of the same depth or, by
    its last component, the file name (`16.04/x.jpg` is installed as `/usr/share/backgrounds/x.jpg`)."""
    found = None
    for entry in entries:
        if any(_matches(path, pattern) for pattern in entry.patterns):
            found = entry
    return found


def _matches(path: Path, pattern: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("debian/"):  # the packaging's own files, never installed data
        return False
    tail = "/".join(path.parts[-(pattern.count("/") + 1):])
    name = pattern.rsplit("/", 1)[-1]
    return fnmatch.fnmatchcase(tail, pattern) or (not any(c in name for c in "*?[") and path.name == name)


def detail_share(image: "Path | Image.Image") -> float:
    """Share of a 512-px thumbnail's pixels whose Laplacian exceeds 8 grey levels (photos: 0.05-0.8);
    `image` is a file or an opened image."""
    import cv2
    import numpy as np
    from PIL import Image

    if isinstance(image, Path):
        with Image.open(image) as opened:
            return detail_share(opened)
    image.draft("RGB", (512, 512))
    grey = image.convert("L")
    grey.thumbnail((512, 512), Image.Resampling.BOX)
    array = np.asarray(grey, dtype=np.float32)
    return float((np.abs(cv2.Laplacian(array, cv2.CV_32F)) > 8).mean())


def is_photo(path: Path) -> bool:
    """A large, detailed JPEG that is not a screenshot or a link (the file is opened once)."""
    from PIL import Image

    if path.suffix.lower() not in PHOTO_SUFFIXES or "screenshot" in path.name.lower() or path.is_symlink():
        return False
    try:
        with Image.open(path) as image:
            width, height = image.size
            return width * height >= MIN_PIXELS and detail_share(image) >= MIN_DETAIL
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _copyright(package: str) -> tuple[CopyrightEntry, ...]:
    return _read_copyright(DOC_ROOT / package / "copyright")


@lru_cache(maxsize=32)
def _read_copyright(path: Path) -> tuple[CopyrightEntry, ...]:
    # Cached by path, not by package name, so a different DOC_ROOT (tests, chroots) never sees stale entries.
    return tuple(parse_copyright(path.read_text(encoding="utf-8", errors="replace"))) if path.is_file() else ()


def upstream_source(package: str) -> str:
    """The `Source:` of the copyright file's header paragraph (where the images come from), or ""."""
    path = DOC_ROOT / package / "copyright"
    if not path.is_file():
        return ""
    header = re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace"), maxsplit=1)[0]
    found = re.search(r"^Source:[ \t]*(\S.*)$", header, flags=re.MULTILINE | re.IGNORECASE)
    return found.group(1).strip() if found else ""


def package_version(package: str, info_dir: Optional[Path] = None) -> str:
    """The installed version of `package` from dpkg's status file (beside its info folder), or ""."""
    status = (info_dir or DPKG_INFO).parent / "status"
    if not status.is_file():
        return ""
    for paragraph in re.split(r"\n\s*\n", status.read_text(encoding="utf-8", errors="replace")):
        fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", paragraph, flags=re.MULTILINE))
        if fields.get("Package") == package and "installed" in fields.get("Status", "").split():
            return fields.get("Version", "")
    return ""


def package_images(package: str, info_dir: Optional[Path] = None) -> list[DebianImage]:
    """The photographs of one installed package, sorted by key."""
    files = [path for path in package_files(package, info_dir) if path.is_file() and is_photo(path)]
    if not files:
        return []
    root = Path(*_key_root(_common_parts(files)))
    images = []
    for path in files:
        entry = licence_of(path, _copyright(package))
        key = f"{package}/{path.relative_to(root).as_posix()}"
        images.append(DebianImage(key, path, package, entry.licence if entry else "unknown",
                                  entry.holders if entry else ""))
    return sorted(images, key=lambda image: image.key)


def _key_root(common: tuple[str, ...]) -> tuple[str, ...]:
    """The folder keys are relative to: the files' common folder, but never inside a KDE wallpaper
    (`Name/contents/images/`), so a package with one wallpaper in several sizes keeps `Name` in its keys and
    its sizes in one group."""
    if "contents" in common[1:]:
        return common[: common.index("contents", 1) - 1]
    return common


def _common_parts(paths: Sequence[Path]) -> tuple[str, ...]:
    return Path(os.path.commonpath([path.parent for path in paths])).parts


def debian_images(spec: str, split: str = "train", licences: Optional[Iterable[str]] = None,
                  info_dir: Optional[Path] = None) -> list[DebianImage]:
    """`debian:PKG[,PKG]` images of `split` ("train", "eval" or "all"), with only `licences` if given."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"unknown split {split!r}")
    allowed = {licence.strip() for licence in licences} if licences else None
    images = []
    for package in parse_spec(spec):
        for image in package_images(package, info_dir):
            if allowed is not None and image.licence not in allowed:
                continue
            held = is_held_out(image.group)
            if split == "all" or (split == "eval") == held:
                images.append(image)
    return images
