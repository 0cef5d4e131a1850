"""Atomic image writing (DESIGN.md §6).

An image is encoded in memory, written to a hidden temporary name in the target folder, flushed and
fsynced, then renamed over the final name; so the final name only ever holds a complete file, whatever
happens (Ctrl-C, SIGKILL, power loss after the fsync). Failures of the disk itself (full, read-only,
not permitted) remove the temporary file and raise FatalError: nothing more can be written, the run stops.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ldmtool.errors import FatalError, ItemError, UsageError
from ldmtool.io.files import shown
from ldmtool.io.images import to_uint8
from ldmtool.io.metadata import ImageMetadata, exif_bytes, png_info

FORMATS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}
EXTENSIONS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}
TEMP_SUFFIX = ".ldmtool-tmp"
DEFAULT_QUALITY = 95


def format_name(name: str) -> str:
    """'PNG', 'jpeg', '.jpg' -> 'png' | 'jpg' | 'webp'; anything else is a usage error."""
    key = name.lower().lstrip(".")
    if key not in EXTENSIONS:
        raise UsageError(f"output format {name!r} is not supported; use png, jpg or webp")
    return EXTENSIONS[key]


def format_for_path(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        shown = suffix or "no extension"
        raise UsageError(f"{path}: cannot tell the output format from '{shown}'; use .png, .jpg or .webp")
    return FORMATS[suffix]


def encode_image(
    image: np.ndarray,
    fmt: str,
    *,
    alpha: Optional[np.ndarray] = None,
    quality: int = DEFAULT_QUALITY,
    metadata: Optional[ImageMetadata] = None,
) -> bytes:
    """Encode an (H, W, 3) or (H, W) image in [0, 1] (float) or uint8, with optional alpha, to bytes."""
    from PIL import Image

    pixels = _as_uint8(image, alpha)
    picture = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if fmt == "png":
        picture.save(buffer, "PNG", pnginfo=png_info(metadata) if metadata else None, compress_level=6)
    elif fmt == "jpg":
        if picture.mode == "RGBA":
            picture = picture.convert("RGB")  # JPEG has no alpha
        extra = {"exif": exif_bytes(metadata)} if metadata else {}
        picture.save(buffer, "JPEG", quality=quality, **extra)
    elif fmt == "webp":
        extra = {"exif": exif_bytes(metadata)} if metadata else {}
        picture.save(buffer, "WEBP", quality=quality, **extra)
    else:
        raise UsageError(f"output format {fmt!r} is not supported; use png, jpg or webp")
    return buffer.getvalue()


def _as_uint8(image: np.ndarray, alpha: Optional[np.ndarray]) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 and not np.all(np.isfinite(image)):
        raise ItemError("the result contains non-finite values (NaN/Inf); nothing was written")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(f"an image must be (H, W), (H, W, 3) or (H, W, 4), not {image.shape}")
    pixels = to_uint8(image)
    if alpha is None:
        return pixels
    alpha = np.asarray(alpha)
    if alpha.dtype != np.uint8 and not np.all(np.isfinite(alpha)):
        raise ItemError("the alpha channel contains non-finite values (NaN/Inf); nothing was written")
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return np.concatenate([pixels[:, :, :3], to_uint8(alpha)[:, :, None]], axis=2)


def write_image(
    path: Path | str,
    image: np.ndarray,
    *,
    alpha: Optional[np.ndarray] = None,
    quality: int = DEFAULT_QUALITY,
    metadata: Optional[ImageMetadata] = None,
    fmt: Optional[str] = None,
) -> Path:
    """Encode and write atomically; the format follows the extension unless `fmt` is given."""
    path = Path(path)
    data = encode_image(image, fmt or format_for_path(path), alpha=alpha, quality=quality, metadata=metadata)
    atomic_write_bytes(path, data)
    return path


def temp_name(path: Path) -> Path:
    """Hidden, per-process temporary name beside `path` (never mistaken for an image by discovery):
    `.NAME.PID.ldmtool-tmp`, or with a fixed-length digest for NAME when that would be longer than a file
    name may be, so any output name that can exist can be written."""
    readable = f".{path.name}.{os.getpid()}{TEMP_SUFFIX}"
    if len(os.fsencode(readable)) <= _NAME_MAX:
        return path.with_name(readable)
    return path.with_name(f".{_name_digest(path.name)}.{os.getpid()}{TEMP_SUFFIX}")


_NAME_MAX = 255  # bytes in one file name on the common Linux, macOS and Windows file systems


def _name_digest(name: str) -> str:
    return hashlib.sha256(os.fsencode(name)).hexdigest()[:32]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, then rename."""
    temp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        _fsync_folder(path.parent)
    except OSError as err:
        _remove_quietly(temp)
        if err.errno == errno.ENAMETOOLONG:  # this item's name, not the disk: the batch goes on (issue 26)
            raise ItemError(f"{shown(path)}: cannot write the output (file name too long: "
                            f"{len(os.fsencode(path.name))} bytes)") from err
        raise FatalError(f"{path}: cannot write the output ({_os_reason(err)}); stopping") from err
    except BaseException:
        _remove_quietly(temp)  # Ctrl-C mid-write: no partial file stays behind
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; some filesystems cannot fsync a folder, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _os_reason(err: OSError) -> str:
    reasons: dict[Optional[int], str] = {
        errno.ENOSPC: "the disk is full",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EDQUOT: "disk quota exceeded",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EISDIR: "a folder with that name is in the way",
    }
    return reasons.get(err.errno, err.strerror or str(err))


def remove_stale_temps(outputs: Iterable[Path], listings: Optional[dict[Path, list[str]]] = None) -> int:
    """Delete the temporary files of these planned outputs that killed ldmtool processes left behind
    (their process id is no longer alive). Only the outputs' own folders are listed, each once and never
    recursively, so `-o /tmp/x.png` looks at /tmp's entries, not its tree; each folder's entry names go
    into `listings` when given (other housekeeping reuses them). This is housekeeping: a folder that
    vanished or cannot be listed is skipped quietly."""
    names_by_folder: dict[Path, set[str]] = {}
    for output in outputs:
        names_by_folder.setdefault(Path(output).parent, set()).add(Path(output).name)
    removed = 0
    for folder, names in names_by_folder.items():
        try:
            with os.scandir(folder) as entries:
                listing = [entry.name for entry in entries]
        except OSError:
            continue
        if listings is not None:
            listings[folder] = listing
        for temp in _stale_temps(folder, listing, names):
            _remove_quietly(temp)
            removed += 1
    return removed


def _stale_temps(folder: Path, listing: list[str], names: set[str]) -> list[Path]:
    stale = []
    temps = [temp for temp in listing if temp.endswith(TEMP_SUFFIX)]
    targets = names | {_name_digest(name) for name in names} if temps else names  # long names: a digest
    for temp in temps:
        owner = _temp_owner(temp)
        if owner is not None and owner[0] in targets and not _alive(owner[1]):
            stale.append(folder / temp)
    return stale


def _temp_owner(temp: str) -> Optional[tuple[str, int]]:
    """'.x.png.123.ldmtool-tmp' -> ('x.png', 123): the output it was written for, and the writer's pid."""
    target, _, pid = temp[1: -len(TEMP_SUFFIX)].rpartition(".")
    if not temp.startswith(".") or not target or not pid.isdigit():
        return None
    return target, int(pid)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers: this run has not started writing yet
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # another user's live process
    return True
