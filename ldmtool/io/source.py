"""What an output keeps of its input file (issue 16): the EXIF (camera, dates, GPS), the ICC profile, and
whether the input was grey; its bit depth travels on `LoadedImage`.

The EXIF is rebuilt from known tags on read, never copied as a blob: the orientation is dropped (it was
applied to the pixels when the image was read), so are the tags that describe the old file's layout (its
size, strips, thumbnail). A block over `MAX_CARRIED_BYTES`, or one that does not parse, is dropped without
failing the item: metadata is carried where it can be, never at the price of an output. The writer
(`io/writer.py`) merges the carried EXIF with ldmtool's own metadata.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from PIL.Image import Exif, Image

MAX_CARRIED_BYTES = 1 << 20  # an EXIF block or ICC profile larger than this is not carried
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})

_EXIF_IFD = 0x8769
_GPS_IFD = 0x8825
# Tags of the main directory a photo's EXIF keeps: who and what made it, when, and its resolution.
_KEPT_BASE_TAGS = frozenset({
    0x010F,  # Make
    0x0110,  # Model
    0x0131,  # Software
    0x0132,  # DateTime
    0x013B,  # Artist
    0x8298,  # Copyright
    0x011A, 0x011B, 0x0128,  # XResolution, YResolution, ResolutionUnit
})
# Tags of the EXIF directory that describe the old file, not the scene: its pixel size, its interop pointer,
# and its UserComment (where an earlier run's generation parameters live; the output gets its own).
_DROPPED_EXIF_TAGS = frozenset({0xA002, 0xA003, 0xA005, 0x9286})


@dataclass(frozen=True)
class SourceInfo:
    """What an input file carries that its output keeps: EXIF (without orientation) and ICC profile as bytes
    ready to embed (None: none, too large or unreadable), and whether its pixels were grey."""

    exif: Optional[bytes] = None
    icc_profile: Optional[bytes] = None
    grey: bool = False


def source_info(image: Image) -> SourceInfo:
    """The SourceInfo of an opened Pillow image (after `load()`); never raises for bad metadata."""
    return SourceInfo(exif=_carried_exif(image), icc_profile=checked_icc(image.info.get("icc_profile")),
                      grey=image.mode in GREY_MODES)


def icc_fits(profile: Optional[bytes], *, grey: bool) -> bool:
    """Whether an ICC profile describes pixels of this kind: a grey profile for grey output, an RGB one for
    colour (a CMYK input's profile never fits: its pixels were converted to sRGB when read)."""
    return profile is not None and profile[16:20] == (b"GRAY" if grey else b"RGB ")


def checked_icc(profile: object) -> Optional[bytes]:
    """The profile if it is bytes of a sane size that the colour engine can parse, else None."""
    if not isinstance(profile, bytes) or not profile or len(profile) > MAX_CARRIED_BYTES:
        return None
    from PIL import ImageCms

    try:
        ImageCms.ImageCmsProfile(io.BytesIO(profile))
    except Exception:  # a hostile or broken profile is dropped, not an error
        return None
    return profile


def _carried_exif(image: Image) -> Optional[bytes]:
    raw = image.info.get("exif")
    if isinstance(raw, bytes) and len(raw) > MAX_CARRIED_BYTES:
        return None
    try:
        exif = image.getexif()
        kept = kept_exif(exif)
        data = kept.tobytes() if len(kept) else None
    except Exception:  # a broken EXIF block must not make a readable image fail
        return None
    return data if data is not None and len(data) <= MAX_CARRIED_BYTES else None


def kept_exif(exif: Exif) -> Exif:
    """A new Exif with the tags a derived image keeps: the main directory's known tags (no orientation, no
    layout), the EXIF directory less its size tags, and the GPS directory."""
    from PIL import Image

    kept = Image.Exif()
    for tag in _KEPT_BASE_TAGS:
        if tag in exif:
            kept[tag] = exif[tag]
    details = {tag: value for tag, value in exif.get_ifd(_EXIF_IFD).items() if tag not in _DROPPED_EXIF_TAGS}
    if details:
        kept.get_ifd(_EXIF_IFD).update(details)
    gps = dict(exif.get_ifd(_GPS_IFD))
    if gps:
        kept.get_ifd(_GPS_IFD).update(gps)
    return kept
