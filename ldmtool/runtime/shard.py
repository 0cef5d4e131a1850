"""Deterministic shards of a batch for job arrays (`--shard K/N`), and merging their manifests.

An item belongs to shard `1 + h(key) mod N`, where h is a hash of the item's stable key (its relative
path, or prompt index), never its position: adding files to a folder does not move finished items to
another shard, so shards compose with resume. Every shard writes its own manifest part and a membership
file listing the keys it owns; `merge_manifests` combines the parts and reports what is missing or failed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from ldmtool.errors import FatalError, UsageError
from ldmtool.io.files import shown
from ldmtool.io.manifest import MANIFEST_NAME, Manifest
from ldmtool.io.writer import atomic_write_bytes, temp_name

T = TypeVar("T")
_PART = re.compile(r"^ldmtool-manifest\.shard-(\d+)-of-(\d+)\.jsonl$")
_MEMBERS = re.compile(r"^ldmtool-shard-(\d+)-of-(\d+)\.json$")
MISSING_SHARDS_LISTED = 1000  # a report names at most this many missing shards; the count is always exact
# Options that only schedule a run; they are left out of the recipe recorded in each output, so the
# same item gets the same bytes whichever shard or engine wrote it.
SCHEDULING_OPTIONS = {"--shard": 1, "--engine": 1, "--ray-address": 1}


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, key: str) -> bool:
        return shard_of(key, self.count) == self.index

    @property
    def manifest_name(self) -> str:
        return f"ldmtool-manifest.shard-{self.index}-of-{self.count}.jsonl"

    @property
    def members_name(self) -> str:
        return f"ldmtool-shard-{self.index}-of-{self.count}.json"


def shard_of(key: str, count: int) -> int:
    """The 1-based shard an item key belongs to among `count` shards."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return 1 + int.from_bytes(digest[:8], "little") % count


def parse_shard(text: str) -> Shard:
    """'K/N' with 1 <= K <= N."""
    match = re.fullmatch(r"\s*([0-9]{1,18})\s*/\s*([0-9]{1,18})\s*", text or "")  # no int() of 5000 digits
    if not match:
        raise UsageError(f"--shard {text!r} is not of the form K/N (e.g. --shard 2/8)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise UsageError(f"--shard {index}/{count}: K must be between 1 and N (got K={index}, N={count})")
    return Shard(index, count)


def select(items: Sequence[T], shard: Shard, key: Callable[[T], str]) -> list[T]:
    return [item for item in items if shard.owns(key(item))]


def write_members(folder: Path, shard: Shard, keys: Sequence[str]) -> None:
    """Record which keys this shard owns, so a merge can tell what never finished: atomically, through a
    temporary file of this process's own (two runs of one shard may write it at once); FatalError when the
    folder cannot hold it."""
    data = json.dumps({"shard": str(shard), "keys": list(keys)}) + "\n"
    atomic_write_bytes(Path(folder) / shard.members_name, data.encode("utf-8"))


def strip_scheduling(argv: Sequence[str]) -> list[str]:
    """argv without the options that only decide where or how a run is scheduled."""
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in SCHEDULING_OPTIONS:
            skip = 0 if "=" in arg else SCHEDULING_OPTIONS[name]
            continue
        out.append(arg)
    return out


@dataclass
class MergeReport:
    parts: int = 0
    shard_count: int = 0
    missing_shards: list[int] = field(default_factory=list)  # the first MISSING_SHARDS_LISTED of them
    missing_shard_count: int = 0
    done: int = 0
    failed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped: int = 0  # manifest lines or membership files that could not be used (cut short, not records)

    @property
    def complete(self) -> bool:
        return not (self.missing_shard_count or self.failed or self.missing)

    def as_dict(self) -> dict[str, Any]:
        return {"parts": self.parts, "shards": self.shard_count, "missing_shards": self.missing_shards,
                "missing_shard_count": self.missing_shard_count, "done": self.done, "failed": self.failed,
                "missing": self.missing, "skipped": self.skipped, "complete": self.complete}


def _shard_files(folder: Path, pattern: re.Pattern[str]) -> dict[Path, tuple[int, int]]:
    """The files in `folder` named like `pattern`, with their (K, N); names with K outside 1..N are left out."""
    found = {}
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match:
            index, count = int(match.group(1)), int(match.group(2))
            if 1 <= index <= count and path.is_file():
                found[path] = (index, count)
    return found


def _usable_record(line: str) -> dict[str, Any] | None:
    """A manifest line as a record with a string key, or None for anything else (a line a crash cut short,
    JSON that is not an object, a key that is not a string, text that cannot be written back as UTF-8)."""
    try:
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("key"), str):
            return None
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError, UnicodeError, TypeError):
        return None
    return record


def _part_records(path: Path, report: MergeReport) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        report.skipped += 1
        return []
    records = []
    for line in text.split("\n"):  # not splitlines(): JSON strings may hold U+2028, U+0085, ...
        if not line.strip():
            continue
        record = _usable_record(line)
        if record is None:
            report.skipped += 1
        else:
            records.append(record)
    return records


def _member_keys(path: Path) -> list[str] | None:
    """The keys a membership file lists, or None when it is not one (unreadable, odd JSON)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list):
        return None
    return [key for key in keys if isinstance(key, str)]


def merge_manifests(folder: Path) -> MergeReport:
    """Combine every shard's manifest part in `folder` with the records `ldmtool-manifest.jsonl` holds already
    (unsharded runs, earlier merges) into `ldmtool-manifest.jsonl`: one record per item and output (a --sweep
    item has an output per cell), the newest, sorted; and report shards that never started, failed items and
    owned items that have no record. Only the files present are read: the work never grows with the shard
    count N."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a folder (give the output folder the shards wrote to)")
    found = _shard_files(folder, _PART)
    parts = sorted(found, key=lambda p: p.name)
    if not parts:
        raise UsageError(f"{folder}: no shard manifests (ldmtool-manifest.shard-K-of-N.jsonl) to merge")
    counts = {count for _, count in found.values()}
    if len(counts) != 1:
        raise UsageError(f"{folder}: manifests of different shard counts ({sorted(counts)}); merge one run at a time")
    count = counts.pop()
    report = MergeReport(parts=len(parts), shard_count=count)
    latest: dict[tuple[str, str], dict[str, Any]] = {}  # by item and output: a --sweep item has one per cell
    main = folder / MANIFEST_NAME
    for part in ([main] if main.is_file() else []) + parts:  # what was merged or run unsharded before, then the parts
        for record in _part_records(part, report):
            output = (record["key"], str(record.get("output") or ""))
            earlier = latest.get(output)
            if earlier is None or str(record.get("time") or "") >= str(earlier.get("time") or ""):
                latest[output] = record
    owned: list[str] = []
    started: set[int] = set()
    for members, (index, members_count) in sorted(_shard_files(folder, _MEMBERS).items()):
        if members_count != count:
            continue
        keys = _member_keys(members)
        if keys is None:
            report.skipped += 1
            continue
        started.add(index)
        owned += keys
    report.missing_shard_count = count - len(started)
    index = 1
    while index <= count and len(report.missing_shards) < MISSING_SHARDS_LISTED:  # skips at most len(started)
        if index not in started:
            report.missing_shards.append(index)
        index += 1
    merged = main
    temp = temp_name(merged)  # this process's own: two merges at once do not interleave their records
    temp.unlink(missing_ok=True)
    manifest = Manifest(temp)
    for output in sorted(latest):
        manifest.append(latest[output])
    if temp.exists():
        try:
            os.replace(temp, merged)
        except OSError as err:
            temp.unlink(missing_ok=True)
            raise FatalError(f"{shown(merged)}: cannot write the merged manifest ({err.strerror or err})") from None
    report.done = sum(1 for r in latest.values() if r.get("status") == "done")
    report.failed = sorted({key for (key, _), r in latest.items() if r.get("status") == "failed"})
    recorded = {key for key, _ in latest}
    report.missing = sorted(set(k for k in owned if k not in recorded))
    return report
