"""Atomic image writing (DESIGN.md §6), in PNG, JPEG, WebP or TIFF.

An output carries ldmtool's metadata (`io/metadata.py`) and what it keeps of its input (`io/source.py`: EXIF
and ICC profile); a 16-bit input's float result is written at 16 bits in PNG and TIFF (16-bit colour PNG
through OpenCV, 16-bit colour TIFF by hand: Pillow holds neither).

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
from typing import Any, BinaryIO, Callable, Iterable, Optional

import numpy as np

from ldmtool.errors import FatalError, ItemError, UsageError
from ldmtool.io.files import file_in_the_way, process_alive, shown
from ldmtool.io.images import to_uint8
from ldmtool.io.metadata import ImageMetadata, MetadataTooLarge, exif_bytes, png_info
from ldmtool.io.source import SourceInfo, icc_fits

FORMATS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp", ".tif": "tiff", ".tiff": "tiff"}
EXTENSIONS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp", "tif": "tiff", "tiff": "tiff"}
KEEP = "keep"  # --format keep: each input's own format where it is one of these, else png
SIXTEEN_BIT = ("png", "tiff")  # formats written at 16 bits per channel when the input had 16
TEMP_SUFFIX = ".ldmtool-tmp"
DEFAULT_QUALITY = 95
_WRITABLE = "use .png, .jpg, .webp or .tif"
MAX_SIDE = {"webp": 16383, "jpg": 65535}  # the largest side (pixels) each encoder takes; PNG and TIFF: none
_EXIF_LIMITS = {"jpg": 65533}  # bytes of EXIF (with its 'Exif' header) in JPEG's one APP1 segment
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def format_name(name: str) -> str:
    """'PNG', 'jpeg', '.jpg', 'TIF', 'keep' -> 'png' | 'jpg' | 'webp' | 'tiff' | 'keep'; else a usage error."""
    key = name.lower().lstrip(".")
    if key == KEEP:
        return KEEP
    if key not in EXTENSIONS:
        raise UsageError(f"output format {name!r} is not supported; use png, jpg, webp, tiff or keep")
    return EXTENSIONS[key]


def format_for_path(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"{shown(path)}: ldmtool cannot write '{shown(suffix) or 'no extension'}' images; {_WRITABLE}")
    return FORMATS[suffix]


def encode_image(
    image: np.ndarray,
    fmt: str,
    *,
    alpha: Optional[np.ndarray] = None,
    quality: int = DEFAULT_QUALITY,
    metadata: Optional[ImageMetadata] = None,
    source: Optional[SourceInfo] = None,
    bit_depth: int = 8,
    grey: bool = False,
) -> bytes:
    """Encode an (H, W, 3) or (H, W) image in [0, 1] (float) or uint8, with optional alpha, to bytes.

    `source` is what the input file carried (its EXIF and ICC profile are embedded, the EXIF merged with
    `metadata` where the format keeps metadata in EXIF); `bit_depth` 16 writes a float image at 16 bits per
    channel in PNG and TIFF; `grey` writes an image without alpha as one luminance channel."""
    buffer = io.BytesIO()
    encode_into(buffer, image, fmt, alpha=alpha, quality=quality, metadata=metadata, source=source,
                bit_depth=bit_depth, grey=grey)
    return buffer.getvalue()


def encode_into(out: BinaryIO, image: np.ndarray, fmt: str, *, alpha: Optional[np.ndarray] = None,
                quality: int = DEFAULT_QUALITY, metadata: Optional[ImageMetadata] = None,
                source: Optional[SourceInfo] = None, bit_depth: int = 8, grey: bool = False) -> None:
    """`encode_image` written into the seekable file `out` as it is encoded (a file: no copy of the encoded
    image is held in memory, 40 MB for a 16-megapixel PNG)."""
    from PIL import Image

    check_format(fmt)
    deep = bit_depth == 16 and fmt in SIXTEEN_BIT and np.asarray(image).dtype != np.uint8
    pixels = _as_pixels(image, alpha, deep=deep, grey=grey and alpha is None)
    if fmt == "webp" and pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)  # WebP has no grey mode
    icc = source.icc_profile if source is not None and icc_fits(source.icc_profile, grey=pixels.ndim == 2) else None
    carried = source.exif if source is not None else None
    if fmt == "png":
        _encode_png(out, pixels, metadata, carried, icc)
        return
    if fmt == "tiff" and pixels.dtype == np.uint16 and pixels.ndim == 3:
        out.write(_encode_colour_tiff16(pixels, metadata, carried, icc))
        return
    picture = Image.fromarray(pixels)
    if fmt == "jpg" and picture.mode == "RGBA":
        picture = picture.convert("RGB")  # JPEG has no alpha
    settings: dict[str, object] = {"quality": quality} if fmt in ("jpg", "webp") else {}
    if icc is not None:
        settings["icc_profile"] = icc
    kind = {"jpg": "JPEG", "webp": "WEBP", "tiff": "TIFF"}[fmt]
    if metadata or carried:
        settings["exif"] = exif_bytes(metadata, carried, limit=_EXIF_LIMITS.get(fmt))
    picture.save(out, kind, **settings)


def side_problem(size: tuple[int, int], fmt: str) -> Optional[str]:
    """Why a `fmt` image cannot be `size` (width, height) pixels, known before anything is computed (the
    encoder would refuse it only at the end); None when it can."""
    side = MAX_SIDE.get(fmt)
    width, height = size
    if side is None or max(width, height) <= side:
        return None
    return f"the output would be {width}x{height} pixels, and {fmt} images hold at most {side} pixels a side"


def check_format(fmt: str) -> None:
    if fmt not in EXTENSIONS.values():
        raise UsageError(f"output format {fmt!r} is not supported; use png, jpg, webp or tiff")


def _encode_png(out: BinaryIO, pixels: np.ndarray, metadata: Optional[ImageMetadata], carried: Optional[bytes],
                icc: Optional[bytes]) -> None:
    """PNG with the text chunks, the carried EXIF (eXIf) and ICC profile (iCCP). Pillow cannot hold 16-bit
    colour, so such pixels are encoded by OpenCV and the metadata chunks Pillow makes are spliced in."""
    from PIL import Image

    settings: dict[str, Any] = {"compress_level": 6}
    if metadata is not None:
        settings["pnginfo"] = png_info(metadata)
    if carried:
        settings["exif"] = carried
    if icc is not None:
        settings["icc_profile"] = icc
    if pixels.dtype == np.uint8 or pixels.ndim == 2:
        Image.fromarray(pixels).save(out, "PNG", **settings)  # a 2-D uint16 array is Pillow's 16-bit grey
        return
    import cv2

    channels = [2, 1, 0] + ([3] if pixels.shape[2] == 4 else [])  # RGB(A) -> OpenCV's BGR(A)
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(pixels[:, :, channels]),
                               [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise ItemError("cannot encode the 16-bit PNG")
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG", **settings)
    out.write(_with_chunks(encoded.tobytes(), _metadata_chunks(buffer.getvalue())))


def _encode_colour_tiff16(pixels: np.ndarray, metadata: Optional[ImageMetadata], carried: Optional[bytes],
                          icc: Optional[bytes]) -> bytes:
    """An uncompressed 16-bit RGB(A) TIFF, which Pillow cannot write: a TIFF file is an EXIF block's own
    structure, so the image tags join the merged EXIF and the pixels follow it as one strip (Pillow points
    StripOffsets past the directory's data)."""
    from PIL import Image

    exif = Image.Exif()
    exif.load(exif_bytes(metadata, carried))
    height, width, channels = pixels.shape
    image_tags = {256: width, 257: height, 258: (16,) * channels, 259: 1, 262: 2, 273: 0, 277: channels,
                  278: height, 279: pixels.nbytes, 284: 1}  # size, bits, uncompressed, RGB, one strip
    for tag, value in image_tags.items():
        exif[tag] = value
    if channels == 4:
        exif[338] = 2  # ExtraSamples: unassociated alpha
    if icc is not None:
        exif[34675] = icc
    structure = exif.tobytes()[len(b"Exif\0\0"):]
    order = ">u2" if structure.startswith(b"MM") else "<u2"
    return structure + np.ascontiguousarray(pixels).astype(order).tobytes()


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, whole chunk bytes) of a PNG, in order."""
    chunks, offset = [], 8
    while offset + 8 <= len(data):
        length = int.from_bytes(data[offset: offset + 4], "big")
        end = offset + 12 + length
        chunks.append((data[offset + 4: offset + 8], data[offset:end]))
        offset = end
    return chunks


def _metadata_chunks(png: bytes) -> bytes:
    return b"".join(chunk for kind, chunk in _png_chunks(png) if kind not in (b"IHDR", b"IDAT", b"IEND"))


def _with_chunks(png: bytes, extra: bytes) -> bytes:
    """`extra` chunks inserted right after IHDR (where iCCP and eXIf must come, before the pixel data)."""
    kind, header = _png_chunks(png)[0]
    if kind != b"IHDR":
        raise ItemError("cannot encode the 16-bit PNG (no header chunk)")
    cut = 8 + len(header)
    return png[:cut] + extra + png[cut:]


def _as_pixels(image: np.ndarray, alpha: Optional[np.ndarray], *, deep: bool = False,
               grey: bool = False) -> np.ndarray:
    """uint8 (uint16 when `deep`) pixels (H, W), (H, W, 3) or (H, W, 4); `grey` reduces colour to luminance."""
    image = np.asarray(image)
    if image.dtype != np.uint8 and not np.all(np.isfinite(image)):
        raise ItemError("the result contains non-finite values (NaN/Inf); nothing was written")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(f"an image must be (H, W), (H, W, 3) or (H, W, 4), not {image.shape}")
    if grey and image.ndim == 3:
        values = image[:, :, :3].astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        image = np.clip(values @ _LUMA, 0.0, 1.0)
        if not deep:
            image = to_uint8(image)
    convert = _to_uint16 if deep else to_uint8
    pixels = convert(image)
    if alpha is None:
        return pixels
    alpha = np.asarray(alpha)
    if alpha.dtype != np.uint8 and not np.all(np.isfinite(alpha)):
        raise ItemError("the alpha channel contains non-finite values (NaN/Inf); nothing was written")
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return np.concatenate([pixels[:, :, :3], convert(alpha)[:, :, None]], axis=2)


def _to_uint16(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.uint16) * 257
    deep: np.ndarray = (np.clip(array, 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)
    return deep


def write_image(
    path: Path | str,
    image: np.ndarray,
    *,
    alpha: Optional[np.ndarray] = None,
    quality: int = DEFAULT_QUALITY,
    metadata: Optional[ImageMetadata] = None,
    fmt: Optional[str] = None,
    source: Optional[SourceInfo] = None,
    bit_depth: int = 8,
    grey: bool = False,
) -> Path:
    """Encode and write atomically; the format follows the extension unless `fmt` is given (see
    `encode_image` for `source`, `bit_depth` and `grey`)."""
    path = Path(path)
    fmt = fmt or format_for_path(path)
    check_format(fmt)
    try:
        atomic_write(path, lambda out: encode_into(out, image, fmt, alpha=alpha, quality=quality,
                                                   metadata=metadata, source=source, bit_depth=bit_depth, grey=grey))
    except MetadataTooLarge as err:
        raise ItemError(f"{shown(path)}: {err}") from None
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
    atomic_write(path, lambda out: out.write(data))


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` into a temporary file in `path`'s folder, then rename it to `path`: `path` is either
    absent or whole. A disk error is fatal (the next item would meet it too); an error of `write` itself
    (an encoder's) is raised as it is, with the temporary file removed."""
    temp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            with io.BufferedWriter(_FdFile(fd), buffer_size=1 << 20) as out:
                write(out)
                out.flush()
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        _fsync_folder(path.parent)
    except OSError as err:
        _remove_quietly(temp)
        if err.errno is None:  # raised by the encoder, not by the file system
            raise
        if err.errno == errno.ENAMETOOLONG:  # this item's name, not the disk: the batch goes on (issue 26)
            raise ItemError(f"{shown(path)}: cannot write the output (file name too long: "
                            f"{len(os.fsencode(path.name))} bytes)") from err
        reason = file_in_the_way(path.parent) or os_reason(err)
        raise FatalError(f"{path}: cannot write the output ({reason}); stopping") from err
    except BaseException:
        _remove_quietly(temp)  # Ctrl-C mid-write: no partial file stays behind
        raise


class _FdFile(io.RawIOBase):
    """A seekable file over an open descriptor, written with `os.write` (a short write is finished by the buffer
    above it; the descriptor stays the caller's to close). It has no `fileno()`, so encoders write through it."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return os.write(self.fd, data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self.fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def truncate(self, size: Optional[int] = None) -> int:
        size = self.tell() if size is None else size
        os.ftruncate(self.fd, size)
        return size


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


def os_reason(err: OSError) -> str:
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
    return sum(_tidy(folder, names, listings) for folder, names in names_by_folder.items())


def remove_stale_temps_in(folders: Iterable[Path], listings: Optional[dict[Path, list[str]]] = None) -> int:
    """Delete every temporary file that a killed ldmtool process left in these folders, whatever output it
    was for: for a run whose outputs are too many to name (a streamed `--n`)."""
    return sum(_tidy(folder, None, listings) for folder in folders)


def _tidy(folder: Path, names: Optional[set[str]], listings: Optional[dict[Path, list[str]]]) -> int:
    listing = None if listings is None else listings.get(folder)  # listed already at the run's start
    if listing is None:
        listing = folder_names(folder)
        if listing is None:
            return 0
    if listings is not None:
        listings[folder] = listing
    stale = _stale_temps(folder, listing, names)
    for temp in stale:
        _remove_quietly(temp)
    return len(stale)


def folder_names(folder: Path) -> Optional[list[str]]:
    """The names of a folder's entries (one listing, never recursive); None when it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return [entry.name for entry in entries]
    except OSError:
        return None


def _stale_temps(folder: Path, listing: list[str], names: Optional[set[str]]) -> list[Path]:
    """The temporary files in `listing` of dead processes, for outputs in `names` (None: any output)."""
    stale = []
    temps = [temp for temp in listing if temp.endswith(TEMP_SUFFIX)]
    targets = None if names is None else (names | {_name_digest(name) for name in names} if temps else names)
    for temp in temps:
        owner = _temp_owner(temp)
        if owner is not None and (targets is None or owner[0] in targets) and not _alive(owner[1]):
            stale.append(folder / temp)
    return stale


def _temp_owner(temp: str) -> Optional[tuple[str, int]]:
    """'.x.png.123.ldmtool-tmp' -> ('x.png', 123): the output it was written for, and the writer's pid."""
    target, _, pid = temp[1: -len(TEMP_SUFFIX)].rpartition(".")
    if not temp.startswith(".") or not target or not pid.isdigit():
        return None
    return target, int(pid)


def _alive(pid: int) -> bool:
    """A temporary file's writer is alive, unless it is this process (whose run has not started writing)."""
    return pid != os.getpid() and process_alive(pid)
