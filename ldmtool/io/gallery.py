"""The output folder's gallery: a static `index.html` of every done item of its manifests (issue 27, item 4).

One file to open in a browser, with nothing beside it but the images and their thumbnails (`.thumbs/`, JPEG,
made once per output version): no server, no external assets, a few lines of inline script for the text
filter. It is rebuilt from the whole manifest each time (every `ldmtool-manifest*.jsonl` in the folder, shard
parts included), never from one run's memory, and written atomically (temporary name, rename), so runs that
share a folder never drop each other's entries: the last rebuild sees every record appended before it.
Every text put in the page is escaped (prompts are user text), and names that are not UTF-8 are linked by
their bytes and shown with `\\x` escapes.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import html
import io
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence
from urllib.parse import quote

from ldmtool.errors import LdmError
from ldmtool.io.files import shown
from ldmtool.io.images import display_rgb
from ldmtool.io.manifest import MANIFEST_PATTERN, read_manifest
from ldmtool.io.writer import atomic_write_bytes, os_reason, remove_stale_temps_in

GALLERY_NAME = "index.html"
THUMBS = ".thumbs"
THUMB_SIZE = 256
MAX_ENTRIES = 5000  # the page shows the newest; a 10^8-sample run's gallery stays a page
STALE_THUMB_SECONDS = 600.0  # older unreferenced thumbnails go; younger ones may be a cooperating run's
_SHOWN_PARAMS = ("steps", "cfg", "sampler", "strength", "scale", "size")


@dataclass(frozen=True)
class Entry:
    """One done item as the page shows it."""

    relative: str  # the output's path inside the folder (surrogate-escaped when not UTF-8)
    record: dict[str, Any]
    thumb: Optional[str]  # relative path of its thumbnail, None when it could not be made
    thumb_size: tuple[int, int]


def done_records(folder: Path, manifests: Optional[Sequence[str]] = None,
                 limit: int = MAX_ENTRIES) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
    """The newest `limit` done records of the folder's manifests (`manifests`, else every one there), one per
    output (the last record wins) whose file is still there, oldest first; and whether older ones were left
    out. Streams the manifests: memory holds `limit` records whatever their length."""
    newest: OrderedDict[str, dict[str, Any]] = OrderedDict()
    dropped = False
    paths = sorted(folder.glob(MANIFEST_PATTERN)) if manifests is None else [folder / m for m in manifests]
    for manifest in paths:
        for record in read_manifest(manifest):
            if record.get("status") == "done" and isinstance(record.get("output"), str):
                newest.pop(record["output"], None)
                newest[record["output"]] = record
                if len(newest) > limit:
                    newest.popitem(last=False)
                    dropped = True
    found: dict[str, dict[str, Any]] = {}
    for output, record in newest.items():
        relative = _inside(folder, output)
        if relative is not None:
            found.pop(relative, None)
            found[relative] = record
    return sorted(found.items(), key=lambda pair: str(pair[1].get("time") or "")), dropped


def _inside(folder: Path, output: str) -> Optional[str]:
    """The output's path relative to `folder`: the longest tail of its path that names a file there."""
    parts = Path(output).parts
    for start in range(len(parts)):
        tail = Path(*parts[start:])
        if not tail.is_absolute() and (folder / tail).is_file():
            return tail.as_posix()
    return None


def build_gallery(folder: Path, *, manifests: Optional[Sequence[str]] = None, prune: bool = False,
                  thumb_size: int = THUMB_SIZE) -> Optional[Path]:
    """(Re)write `folder/index.html` from the folder's manifests (`manifests`, names in it: a run names its
    own, so it never lists a folder that may hold 10^5 files; else every one there); None (nothing written)
    when no item is done. `prune` removes thumbnails no entry uses (`ldmtool gallery`)."""
    folder = Path(folder)
    records, dropped = done_records(folder, manifests)
    if not records:
        return None
    entries = [_entry(folder, relative, record, thumb_size) for relative, record in records]
    page = render(folder, entries, more=dropped)
    target = folder / GALLERY_NAME
    atomic_write_bytes(target, page.encode("utf-8"))
    if prune:
        _remove_stale_thumbs(folder, {entry.thumb for entry in entries if entry.thumb})
        remove_stale_temps_in([folder / THUMBS])
    return target


def _entry(folder: Path, relative: str, record: dict[str, Any], size: int) -> Entry:
    from PIL import Image, UnidentifiedImageError

    path = folder / relative
    try:
        info = path.stat()
    except OSError:
        return Entry(relative, record, None, (size, size))
    digest = hashlib.sha256(os.fsencode(relative) + f"|{info.st_size}|{info.st_mtime_ns}|{size}".encode()).hexdigest()
    thumb = f"{THUMBS}/{digest[:24]}.jpg"
    thumb_path = folder / thumb
    try:
        if thumb_path.is_file():  # this version of the output has its thumbnail already
            with Image.open(thumb_path) as made:
                return Entry(relative, record, thumb, made.size)
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # a JPEG decodes at a reduced scale
            image.thumbnail((size, size))
            small = display_rgb(image)
        buffer = io.BytesIO()
        small.save(buffer, "JPEG", quality=85)
        atomic_write_bytes(thumb_path, buffer.getvalue())
        return Entry(relative, record, thumb, small.size)
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError, LdmError):
        return Entry(relative, record, None, (size, size))


def _remove_stale_thumbs(folder: Path, used: set[str]) -> None:
    now = time.time()
    try:
        names = list((folder / THUMBS).iterdir())
    except OSError:
        return
    for path in names:
        if f"{THUMBS}/{path.name}" in used or not path.name.endswith(".jpg"):
            continue
        try:
            if now - path.stat().st_mtime > STALE_THUMB_SECONDS:
                path.unlink()
        except OSError:
            pass


def render(folder: Path, entries: list[Entry], *, more: bool = False) -> str:
    """The page: a filter box, then one figure per entry (thumbnail linked to the image, prompt, recipe)."""
    title = f"ldmtool: {shown(folder.resolve().name)}"
    when = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    figures = "\n".join(_figure(entry) for entry in reversed(entries))  # newest first
    count = f"The newest {len(entries)} images" if more else f"{len(entries)} images"
    return _PAGE.format(title=_e(title), count=count, when=_e(when), figures=figures)


def _figure(entry: Entry) -> str:
    record = entry.record
    found = record.get("params")
    params: dict[str, Any] = found if isinstance(found, dict) else {}
    name = shown(entry.relative)
    prompt = str(params.get("prompt") or "")
    summary = ", ".join(f"{key} {params[key]}" for key in _SHOWN_PARAMS if params.get(key) is not None)
    summary = ", ".join(filter(None, [f"seed {record.get('seed')}", summary]))
    recipe = {key: record.get(key) for key in ("command", "key", "seed", "base_seed", "time", "model_sha256")}
    recipe["params"] = params
    recipe_text = json.dumps(recipe, indent=1, ensure_ascii=False, default=str)
    searchable = " ".join([name, prompt, str(params.get("negative") or ""), summary, str(record.get("command"))])
    href = _e(quote(os.fsencode(entry.relative)))
    width, height = entry.thumb_size
    image = (f'<img src="{_e(entry.thumb)}" width="{width}" height="{height}" alt="{_e(name)}" loading="lazy">'
             if entry.thumb else f'<span class="missing">{_e(name)}</span>')
    return (f'<figure data-text="{_e(searchable.lower())}"><a href="{href}">{image}</a><figcaption>'
            f'<div class="name">{_e(name)}</div><div class="prompt">{_e(prompt)}</div>'
            f'<div class="params">{_e(summary)}</div>'
            f'<details><summary>recipe</summary><pre>{_e(recipe_text)}</pre></details></figcaption></figure>')


def _e(text: str) -> str:
    """Escaped for HTML text and attribute values; lone surrogates (bytes that were not UTF-8) as escapes."""
    return html.escape(text.encode("utf-8", "backslashreplace").decode("utf-8"), quote=True)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px sans-serif; margin: 12px; background: #fafafa; color: #222; }}
#filter {{ font-size: 16px; padding: 4px 8px; width: 24em; }}
main {{ display: flex; flex-wrap: wrap; gap: 12px; margin-top: 12px; }}
figure {{ margin: 0; width: 256px; background: #fff; border: 1px solid #ddd; padding: 6px; }}
figure img {{ display: block; max-width: 256px; height: auto; }}
figcaption {{ overflow-wrap: anywhere; }}
.name {{ font-weight: bold; }} .params {{ color: #666; }} pre {{ white-space: pre-wrap; font-size: 11px; }}
</style></head>
<body>
<h1>{title}</h1>
<p>{count}, newest first; built {when}.
<input id="filter" type="search" placeholder="filter: words in the name, prompt or settings" autofocus></p>
<main>
{figures}
</main>
<script>
document.getElementById("filter").addEventListener("input", function (event) {{
  var words = event.target.value.toLowerCase().split(/\\s+/).filter(Boolean);
  document.querySelectorAll("figure").forEach(function (figure) {{
    var text = figure.getAttribute("data-text");
    figure.hidden = !words.every(function (word) {{ return text.indexOf(word) >= 0; }});
  }});
}});
</script>
</body></html>
"""


class GalleryUpdater:
    """The runner's hook: rebuild after a done record at most every `interval` seconds (longer when rebuilds
    grow slow: at most a tenth of the run's time), and once at the end. Reads the run's own manifest names
    (`manifests`). A gallery that cannot be written is noted once and never stops the run."""

    def __init__(self, folder: Path, note: Callable[[str], None], *, manifests: Optional[Sequence[str]] = None,
                 interval: float = 3.0):
        self.folder = folder
        self.note = note
        self.manifests = manifests
        self.interval = interval
        self.wait = interval
        self.last = float("-inf")
        self.pending = False
        self.failed = False

    def recorded(self, record: dict[str, Any]) -> None:
        if record.get("status") != "done":
            return
        self.pending = True
        if time.monotonic() - self.last >= self.wait:
            self._build()

    def finish(self) -> None:
        if self.pending or not (self.folder / GALLERY_NAME).exists():
            self._build()

    def _build(self) -> None:
        started = time.monotonic()
        self.pending = False
        if not self.failed:
            try:
                build_gallery(self.folder, manifests=self.manifests)
            except (OSError, LdmError) as err:
                self.failed = True
                self.note(f"{shown(self.folder / GALLERY_NAME)}: not written ({_why_not_written(err)}); "
                          "the outputs are")
        self.last = time.monotonic()
        self.wait = max(self.interval, 10 * (self.last - started))


def _why_not_written(err: BaseException) -> str:
    """The file system's reason (the disk is full, ...), not the output writer's "cannot write the output
    ...; stopping", which names the page again and says the run stops, as it does not for the gallery."""
    cause = err if isinstance(err, OSError) else err.__cause__
    if isinstance(cause, OSError) and cause.errno is not None:
        return os_reason(cause)
    return " ".join(str(err).split())
