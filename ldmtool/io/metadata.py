"""Generation metadata stored in output images (DESIGN.md §6) and `ldmtool info`.

Two records travel with every image:
- `parameters`: the A1111-style text (prompt, `Negative prompt:` line, then `Key: value, ...`), which
  other tools already read;
- the recipe: JSON with the tool version, the command line, the model file's sha256, every parameter
  and the seed, enough to replay the run.
PNG stores them as text chunks `parameters` and `ldmtool`. JPEG, WebP and TIFF store them in EXIF: the
parameters in UserComment (as A1111 does) and the recipe, ASCII-escaped JSON, in ImageDescription (for
TIFF, the file's own ImageDescription tag). JPEG holds at most 64 KiB of EXIF: a recipe that does not fit
there plainly (a long or non-ASCII prompt, which the recipe repeats) is stored zlib-compressed and base64
-encoded, and read back the same.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, TextIO

from ldmtool.errors import ItemError
from ldmtool.io.files import FileTooLarge, NotRegularFile, open_regular

if TYPE_CHECKING:
    from PIL.Image import Exif
    from PIL.PngImagePlugin import PngInfo

RECIPE_KEY = "ldmtool"
PARAMETERS_KEY = "parameters"
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_IMAGE_DESCRIPTION = 0x010E
_UNICODE_PREFIX = b"UNICODE\x00"
_RECIPE_PREFIX = "ldmtool-recipe:"
_COMPACT_RECIPE_PREFIX = "ldmtool-recipe-zlib:"
_MAX_RECIPE_BYTES = 64 << 20  # a compressed recipe that inflates past this is damaged (or a zip bomb)

# A1111 labels for the parameters it knows; anything else is shown under its own name.
_A1111_LABELS = {"steps": "Steps", "sampler": "Sampler", "schedule_type": "Schedule type", "cfg": "CFG scale",
                 "seed": "Seed", "size": "Size", "model_hash": "Model hash", "model": "Model", "vae_hash": "VAE hash",
                 "vae": "VAE", "strength": "Denoising strength", "clip_skip": "Clip skip", "template": "Template",
                 "negative_template": "Negative Template", "lora_hashes": "Lora hashes", "ti_hashes": "TI hashes"}
_NOT_IN_TEXT = {"prompt", "negative", "karras", "spacing"}  # karras, spacing: A1111's "Schedule type"


@dataclass
class ImageMetadata:
    """What an output image carries: the A1111 text and the JSON recipe."""

    parameters: str
    recipe: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"parameters": self.parameters, "recipe": self.recipe}


def build_metadata(
    *,
    command: str,
    params: Mapping[str, Any],
    seed: int,
    base_seed: Optional[int] = None,
    key: Optional[str] = None,
    argv: Optional[list[str]] = None,
    size: Optional[tuple[int, int]] = None,
    model: Optional[str] = None,
    model_sha256: Optional[str] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> ImageMetadata:
    """The metadata of one output: `params` are every task parameter (prompt, steps, sampler, cfg, ...)."""
    from ldmtool import __version__

    recipe = {
        "tool": "ldmtool",
        "version": __version__,
        "command": command,
        "argv": list(sys.argv if argv is None else argv),
        "model": model,
        "model_sha256": model_sha256,
        "seed": seed,
        "base_seed": base_seed,
        "key": key,
        "size": list(size) if size else None,
        "parameters": _jsonable(dict(params)),
        **_jsonable(dict(extra or {})),
    }
    text_fields = dict(params)
    text_fields.update(seed=seed, model=Path(model).name if model else None,
                       model_hash=model_sha256[:10] if model_sha256 else None,
                       size=f"{size[0]}x{size[1]}" if size else None)
    text = a1111_text(text_fields, version=__version__)
    return ImageMetadata(parameters=text, recipe=recipe)


def a1111_text(fields: Mapping[str, Any], *, version: str) -> str:
    """'prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: DDIM, ..., Version: ldmtool X', with A1111's
    sampler names and 'Schedule type', and no empty first line when there is no prompt (as A1111 writes it)."""
    fields = _a1111_fields(fields)
    lines = [str(fields.get("prompt") or "")]
    if fields.get("negative"):
        lines.append(f"Negative prompt: {fields['negative']}")
    pairs = []
    ordered = [k for k in _A1111_LABELS if k in fields] + [k for k in fields if k not in _A1111_LABELS]
    for name in ordered:
        value = fields[name]
        if name in _NOT_IN_TEXT or value is None or isinstance(value, (dict, list, tuple)):
            continue
        label = _A1111_LABELS.get(name) or name.replace("_", " ").capitalize()
        pairs.append(f"{label}: {_quote(value)}")
    hashes = _hashes(fields)
    if hashes:
        pairs.append(f"Hashes: {json.dumps(hashes)}")
    pairs.append(f"Version: ldmtool {version}")
    lines.append(", ".join(pairs))
    return "\n".join(lines).lstrip("\n")


def _a1111_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The sampler under its A1111 name, and its schedule type."""
    from ldmtool.diffusion.names import A1111_SAMPLERS, sampler_name, schedule_type

    out = dict(fields)
    if isinstance(fields.get("sampler"), str):
        name, named_karras = sampler_name(fields["sampler"])
        karras = fields.get("karras") if fields.get("karras") is not None else named_karras
        out["sampler"] = A1111_SAMPLERS.get(name, fields["sampler"])
        out["schedule_type"] = schedule_type(name, karras, fields.get("spacing"))
    return out


def _hashes(fields: Mapping[str, Any]) -> dict[str, str]:
    """Civitai's `Hashes` JSON (which sd-parsers and Civitai read) when LoRAs or a VAE were used: the same
    hashes as 'Model hash', 'VAE hash' and 'Lora hashes'."""
    if not (fields.get("lora_hashes") or fields.get("vae_hash") or fields.get("ti_hashes")):
        return {}
    hashes = {"model": fields.get("model_hash"), "vae": fields.get("vae_hash")}
    for field_name, kind in (("lora_hashes", "lora"), ("ti_hashes", "embed")):
        for pair in str(fields.get(field_name) or "").split(", "):
            name, _, value = pair.rpartition(": ")
            if name:
                hashes[f"{kind}:{name}"] = value
    return {key: value for key, value in hashes.items() if value}


def _quote(value: Any) -> str:
    text = str(value)
    if any(ch in text for ch in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _jsonable(value: Any) -> Any:
    """Parameters as plain JSON (paths and enums become strings)."""
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------- writing


def png_info(metadata: ImageMetadata) -> PngInfo:
    """A PngInfo with the `parameters` and `ldmtool` text chunks (iTXt when not Latin-1)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PARAMETERS_KEY, metadata.parameters)
    info.add_text(RECIPE_KEY, json.dumps(metadata.recipe, ensure_ascii=False))
    return info


class MetadataTooLarge(ItemError):
    """The metadata does not fit in the format's EXIF block, even with the recipe compressed."""


def exif_bytes(metadata: Optional[ImageMetadata], carried: Optional[bytes] = None, *,
               limit: Optional[int] = None) -> bytes:
    """EXIF for JPEG/WebP/TIFF: parameters in UserComment (UTF-16), the recipe as ASCII JSON in
    ImageDescription, added to the input's `carried` EXIF (`io/source.py`) when there is one.

    With a `limit` in bytes (JPEG's), what does not fit is given up in this order: the plain recipe for its
    compact form while the carried EXIF stays, then the carried EXIF; MetadataTooLarge when even the
    parameters and the compact recipe alone do not fit."""
    attempts = [(kept, compact) for kept in ([carried, None] if carried else [None]) for compact in (False, True)]
    for kept, compact in attempts:
        data = _exif(metadata, kept, compact=compact)
        if limit is None or len(data) <= limit:
            return data
    raise MetadataTooLarge(f"the metadata is {len(data)} bytes even with the recipe compressed, over the {limit} "
                           f"bytes of EXIF this format holds (a very long prompt?); nothing was written; "
                           f"use --format png or webp")


def _exif(metadata: Optional[ImageMetadata], carried: Optional[bytes], *, compact: bool) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    if carried:
        try:
            exif.load(carried)
        except Exception:  # carried EXIF was checked on read; should it not load now, it is dropped
            exif = Image.Exif()
    if metadata is not None:
        exif[_IMAGE_DESCRIPTION] = _compact_recipe(metadata.recipe) if compact else (
            _RECIPE_PREFIX + json.dumps(metadata.recipe, ensure_ascii=True))
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE_PREFIX + metadata.parameters.encode("utf-16-be")
    return exif.tobytes()


def _compact_recipe(recipe: dict[str, Any]) -> str:
    """The recipe as zlib-compressed UTF-8 JSON in base64: the prompt's repeats (the command line, the
    parameters, the job's identity, replay's item) compress to little more than one copy."""
    import base64
    import zlib

    packed = zlib.compress(json.dumps(recipe, ensure_ascii=False).encode("utf-8"), 9)
    return _COMPACT_RECIPE_PREFIX + base64.b64encode(packed).decode("ascii")


# ---------------------------------------------------------------- reading


def read_metadata(path: Path | str, *, max_pixels: Optional[int] = None) -> Optional[ImageMetadata]:
    """The metadata stored in an image, or None when it has none; unreadable files raise ItemError.

    Reading a PNG's text chunks can decode the whole image (Pillow loads it to reach chunks after the
    pixel data), so an image over the pixel limit (`LDMTOOL_MAX_PIXELS`) is refused before that.
    """
    import struct
    import warnings
    import zlib

    from PIL import Image, UnidentifiedImageError

    from ldmtool.io.images import MAX_PIXELS_ENV, max_pixels_default

    path = Path(path)
    limit = max_pixels or max_pixels_default()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with os.fdopen(open_regular(path), "rb") as handle, Image.open(handle) as image:
                width, height = image.size
                if width * height > limit:
                    raise ItemError(f"{path}: {width}x{height} is {width * height} pixels, over the limit of {limit} "
                                    f"(set {MAX_PIXELS_ENV} to raise it); not read, it could be a decompression bomb")
                text = dict(getattr(image, "text", None) or {})
                if PARAMETERS_KEY in text or RECIPE_KEY in text:
                    return _from_png_text(path, text)
                return _from_exif(path, image.getexif())
    except FileNotFoundError:
        raise ItemError(f"{path}: no such file") from None
    except (NotRegularFile, FileTooLarge) as err:
        raise ItemError(str(err)) from None
    except PermissionError:
        raise ItemError(f"{path}: permission denied (the file is not readable)") from None
    except IsADirectoryError:
        raise ItemError(f"{path}: is a folder, not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ItemError(f"{path}: not read, it could be a decompression bomb ({' '.join(str(err).split())})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error,
            IndexError, KeyError, TypeError, MemoryError) as err:
        raise ItemError(f"{path}: not a readable image ({' '.join(str(err).split()) or type(err).__name__})") from None


def _from_png_text(path: Path, text: dict[str, Any]) -> ImageMetadata:
    return ImageMetadata(parameters=text.get(PARAMETERS_KEY, ""), recipe=_parse_recipe(path, text.get(RECIPE_KEY)))


def _from_exif(path: Path, exif: Exif) -> Optional[ImageMetadata]:
    description = exif.get(_IMAGE_DESCRIPTION)
    comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    recipe_text = None
    if isinstance(description, str) and description.startswith(_RECIPE_PREFIX):
        recipe_text = description[len(_RECIPE_PREFIX):]
    elif isinstance(description, str) and description.startswith(_COMPACT_RECIPE_PREFIX):
        recipe_text = _inflate_recipe(path, description[len(_COMPACT_RECIPE_PREFIX):])
    if recipe_text is None and not comment:
        return None  # a camera's own description is not generation metadata
    return ImageMetadata(parameters=_decode_user_comment(comment), recipe=_parse_recipe(path, recipe_text))


def _inflate_recipe(path: Path, text: str) -> str:
    import base64
    import binascii
    import zlib

    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(base64.b64decode(text, validate=True), _MAX_RECIPE_BYTES)
        if inflater.unconsumed_tail or not inflater.eof:
            raise ValueError("cut short or too large")
        return raw.decode("utf-8")
    except (binascii.Error, zlib.error, ValueError):
        raise ItemError(f"{path}: the compressed ldmtool recipe in this image is damaged") from None


def _decode_user_comment(raw: str | bytes | None) -> str:
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw
    if raw.startswith(_UNICODE_PREFIX):
        body = raw[len(_UNICODE_PREFIX):]
        return body.decode("utf-16-be", errors="replace")
    return raw[8:].decode("latin-1", errors="replace")  # ASCII/undefined prefixes are 8 bytes too


def _parse_recipe(path: Path, text: Optional[str]) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise ItemError(f"{path}: the ldmtool recipe in this image is not valid JSON") from None
    return value if isinstance(value, dict) else {}


def print_info(files: Iterable[Path], *, as_json: bool = False, out: Optional[TextIO] = None) -> None:
    """`ldmtool info`: print each file's metadata (text, or one JSON object per line with --json).

    A file that cannot be read or carries no metadata is one line on stderr; after every file has been
    shown the last such problem is raised as an ItemError (exit 1), so the CLI prints it in its place.
    """
    out = out or sys.stdout
    problems: list[ItemError] = []
    for path in files:
        try:
            metadata = read_metadata(path)
            if metadata is None:
                raise ItemError(f"{path}: no generation metadata in this image")
        except ItemError as err:
            problems.append(err)
            continue
        if as_json:
            print(json.dumps({"file": str(path), **metadata.to_json()}, ensure_ascii=False), file=out)
        else:
            print(_info_text(path, metadata), file=out)
    out.flush()
    for problem in problems[:-1]:
        print(f"ldmtool: error: {problem}", file=sys.stderr)
    if problems:
        raise problems[-1]


def _info_text(path: Path, metadata: ImageMetadata) -> str:
    recipe = json.dumps(metadata.recipe, indent=2, ensure_ascii=False) if metadata.recipe else "(none)"
    return f"{path}\n{metadata.parameters}\nRecipe: {recipe}\n"
