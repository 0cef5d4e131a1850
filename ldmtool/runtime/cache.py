"""The process-wide model cache, the disk cache folder, and cached file hashes (DESIGN.md §7).

`model_cache()` is the one in-memory cache of the process: every pipeline asks it for networks, keyed by
the checkpoint's file identity (resolved path, device, inode, size, mtime and ctime) plus device and dtype, so two
commands in one process (or one command called twice from Python) never load the same weights twice.
Entries are evicted least-recently-used when their total size passes a byte budget.

`cache_dir()` is where converted weights and the hash index live: `$LDMTOOL_CACHE`, else
`$XDG_CACHE_HOME/ldmtool`, else `~/.cache/ldmtool`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal, InvalidOperation, localcontext
from pathlib import Path
from typing import Any, Callable, Hashable, Optional

from ldmtool.errors import UsageError
from ldmtool.runtime.watch import note_hashed, note_loaded

CACHE_ENV = "LDMTOOL_CACHE"
BUDGET_ENV = "LDMTOOL_MODEL_CACHE"
DEFAULT_BUDGET_BYTES = 8 * 1024**3
HASH_INDEX = "file-hashes.json"
MAX_BYTES = 2**63  # no budget is this large; refusing it keeps '1e999999999' from becoming a huge int
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3,
          "t": 1024**4, "tb": 1024**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def cache_dir(*, create: bool = False) -> Path:
    """The disk cache folder; `create=True` makes sure it exists."""
    override = os.environ.get(CACHE_ENV)
    if override:
        path = Path(override).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base).expanduser() / "ldmtool"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def parse_bytes(text: str) -> int:
    """'4GB', '512 MiB', '1e9' -> bytes (binary units: 1 GB = 1024**3 bytes)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise UsageError(f"{text!r} is not a size; write e.g. 512MB, 4GB or a number of bytes")
    try:
        number = Decimal(match.group(1))  # exact; '1e400' is a number, not float infinity
    except InvalidOperation:
        raise UsageError(f"{text!r} is not a size; write e.g. 512MB, 4GB or a number of bytes") from None
    with localcontext() as context:  # exact: the product keeps every digit of its whole part
        context.prec, context.rounding = 80, ROUND_DOWN
        value = number * _UNITS[unit] if number < MAX_BYTES else number
    if value >= MAX_BYTES:
        raise UsageError(f"{text!r} is too large a size (the limit is 8 EiB)")
    return int(value)


# ---------------------------------------------------------------- file identity and hashes


@dataclass(frozen=True)
class FileIdentity:
    """What makes two opens of a file 'the same weights' without reading them: the resolved path, and
    the device, inode, size, modification and status-change times of what it names now. A file replaced
    by another (new inode) or rewritten in place (new ctime, even when its mtime is forced back) is a
    different identity."""

    path: str
    size: int
    mtime_ns: int
    device: int = 0
    inode: int = 0
    ctime_ns: int = 0

    @classmethod
    def of(cls, path: Path | str) -> "FileIdentity":
        resolved = Path(path).expanduser().resolve()
        stat = resolved.stat()
        return cls(str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_dev, stat.st_ino, stat.st_ctime_ns)

    def stamp(self) -> dict[str, int]:
        """The stat fields a disk index entry must match to be trusted."""
        return {"device": self.device, "inode": self.inode, "size": self.size, "mtime_ns": self.mtime_ns,
                "ctime_ns": self.ctime_ns}


# How a file hash was obtained: its bytes were hashed, or a disk index entry whose stat fields all match
# the file now (FileIdentity.stamp) gave it. Recorded in recipes as `model_sha256_source`.
HASH_COMPUTED = "computed"
HASH_CACHE = "cache"

_hash_lock = threading.Lock()
_hash_memo: dict[FileIdentity, tuple[str, str]] = {}


def file_sha256(path: Path | str) -> str:
    """The file's sha256 (hex); see `file_hash`."""
    return file_hash(path)[0]


def file_hash(path: Path | str) -> tuple[str, str]:
    """(sha256 hex, how it was obtained: HASH_COMPUTED or HASH_CACHE). Remembered in memory and in the disk
    index by path, and trusted only while the file's device, inode, size, mtime_ns and ctime_ns are all
    unchanged; any difference re-hashes the bytes."""
    identity = FileIdentity.of(path)
    note_hashed(identity)  # a run that loads this file must have loaded this version (runtime/watch.py)
    with _hash_lock:
        if identity in _hash_memo:
            return _hash_memo[identity]
    index = _read_hash_index()
    found = index.get(identity.path)
    entry: dict[str, Any] = found if isinstance(found, dict) else {}
    digest = entry.get("sha256")
    if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) and _stamp_of(entry) == identity.stamp():
        result = (digest, HASH_CACHE)
    else:
        result = (hash_file(Path(identity.path)), HASH_COMPUTED)
        if FileIdentity.of(identity.path) == identity:  # unchanged while it was read: safe to remember
            index[identity.path] = {**identity.stamp(), "sha256": result[0]}
            _write_hash_index(index)
        else:
            return result
    with _hash_lock:
        _hash_memo[identity] = result
    return result


def _stamp_of(entry: dict[str, Any]) -> dict[str, Any]:
    return {name: entry.get(name) for name in ("device", "inode", "size", "mtime_ns", "ctime_ns")}


def short_hash(sha256_hex: str) -> str:
    """The 10-character form shown as 'Model hash' in A1111-style parameters."""
    return sha256_hex[:10]


def hash_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (uncached: `file_sha256` caches)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_hash_index() -> dict[str, Any]:
    """path -> {device, inode, size, mtime_ns, ctime_ns, sha256}; entries of the older 'path|size|mtime'
    form (never verified against the inode) are dropped."""
    try:
        data = json.loads((cache_dir() / HASH_INDEX).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {path: entry for path, entry in data.items() if isinstance(entry, dict)}


def _write_hash_index(index: dict[str, Any]) -> None:
    """Best effort: a read-only or full cache folder only costs a re-hash next time."""
    try:
        folder = cache_dir(create=True)
        fd, temp = tempfile.mkstemp(prefix=".hashes.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w") as handle:
            json.dump(index, handle)
        os.replace(temp, folder / HASH_INDEX)
    except OSError:
        return


# ---------------------------------------------------------------- in-memory model cache


@dataclass
class _Entry:
    value: Any
    nbytes: int


def object_nbytes(value: Any) -> int:
    """Bytes held by a torch module or tensor (parameters and buffers, deduplicated); 0 for others."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, torch.nn.Module):
        seen: set[int] = set()
        total = 0
        for tensor in list(value.parameters()) + list(value.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
        return total
    return 0


class ModelCache:
    """Least-recently-used cache of loaded networks under a byte budget.

    The entry just loaded is always kept, even when it alone is over the budget: evicting it would only
    make the caller load it again.
    """

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.budget_bytes = budget_bytes
        self._entries: "OrderedDict[Hashable, _Entry]" = OrderedDict()
        self._lock = threading.RLock()
        self.loads: list[Hashable] = []  # every key loaded, in order (a workflow reports what each step loaded)
        self.hits = 0  # requests answered from the cache

    @staticmethod
    def key_for(path: Path | str, device: Any, dtype: Any, *extra: Hashable) -> tuple[Hashable, ...]:
        """The cache key: file identity + device + dtype (+ anything else that changes the result)."""
        return (FileIdentity.of(path), str(device), str(dtype), *extra)

    def get_or_load(
        self,
        key: Hashable,
        loader: Callable[[], Any],
        *,
        nbytes: Optional[Callable[[Any], int]] = None,
    ) -> Any:
        """The cached value for `key`, or `loader()`'s result, stored and returned. The files the key names
        are noted as used by the open runs (runtime/watch.py)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                note_loaded(*_identities(key))
                return entry.value
            value = loader()
            note_loaded(*_identities(key))
            self.loads.append(key)
            size = (nbytes or object_nbytes)(value)
            self._entries[key] = _Entry(value, size)
            self._evict(keep=key)
            return value

    def load_file(self, path: Path | str, device: Any, dtype: Any, loader: Callable[[], Any], *extra: Hashable) -> Any:
        """Shorthand for the usual case: a checkpoint file on a device in a dtype."""
        return self.get_or_load(self.key_for(path, device, dtype, *extra), loader)

    def loaded_files(self, since: int = 0) -> list[str]:
        """The files of the entries loaded after the first `since` loads (keys made by `key_for`)."""
        return [key[0].path for key in self.loads[since:] if isinstance(key, tuple) and isinstance(key[0], FileIdentity)]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def total_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _evict(self, keep: Hashable) -> None:
        while self.total_bytes > self.budget_bytes and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            del self._entries[oldest]


def _identities(key: Hashable) -> list[FileIdentity]:
    """The file identities in a cache key (the add-ons' sit in nested tuples)."""
    if isinstance(key, FileIdentity):
        return [key]
    return [found for part in key for found in _identities(part)] if isinstance(key, tuple) else []


_process_cache: Optional[ModelCache] = None


def model_cache() -> ModelCache:
    """The one cache of this process (budget from `$LDMTOOL_MODEL_CACHE`, e.g. '6GB'; default 8 GiB)."""
    global _process_cache
    if _process_cache is None:
        raw = os.environ.get(BUDGET_ENV)
        _process_cache = ModelCache(parse_bytes(raw) if raw else DEFAULT_BUDGET_BYTES)
    return _process_cache
