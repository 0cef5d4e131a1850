"""Claim files: two runs on one output folder split the work instead of overwriting it (issue 26).

Before an item runs, its output is claimed by creating a hidden claim file beside it, whole: the record is
written to a private file first and hard-linked to the claim's name (exclusive and atomic on local file
systems and on NFSv3+; `O_EXCL` then a write where links are not supported), so a run killed at any moment
never leaves a claim without its record. The file holds the claiming host, process id, the process's start
time, its machine's boot id and PID namespace, and the run token, and its modification time is the
heartbeat, refreshed by a background thread while the claim is held. Another run that finds the claim leaves
the item alone, unless the claim is stale: its heartbeat is older than `$LDMTOOL_CLAIM_TIMEOUT` seconds
(default 120) whatever host made it, or it was made on this host, in this PID namespace, by a process that
no longer exists (a killed run's claims are taken over at once; a process id taken since by another process
does not count, its start time differs), or it has had no whole record for `_PARTIAL_GRACE` seconds.
Containers or machines that share a host name but not a PID namespace (host networking) cannot see each
other's processes: their claims go stale by the heartbeat only. A claim of an older ldmtool, without the
boot id and namespace, is judged by host and process as that version did. Taking over renames the stale file to a private name first, so of two runs that
find the same stale claim only one gets it; such private files a killed run left behind are removed with
the stale claims.

The run's seed is claimed the same way (`seed_claim`), so two runs started together without `--seed` into
one folder agree on one seed and are the same job (DESIGN.md §6).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from ldmtool.io.files import positive_int_env, proc_stat_fields, process_alive

CLAIM_PREFIX = ".ldmtool-claim."
CLAIM_TIMEOUT_ENV = "LDMTOOL_CLAIM_TIMEOUT"
DEFAULT_CLAIM_TIMEOUT = 120
_MAX_CLAIM_BYTES = 4096
# Seconds after which a claim file without a whole record, or a private file of a claim being made or taken
# over, is a dead run's leftover: a live run completes either within microseconds.
_PARTIAL_GRACE = 10.0
_PRIVATE_SUFFIXES = (".new", ".stale")


def claim_timeout() -> int:
    """Seconds without a heartbeat after which a claim is stale: `$LDMTOOL_CLAIM_TIMEOUT`, else 120."""
    return positive_int_env(CLAIM_TIMEOUT_ENV, DEFAULT_CLAIM_TIMEOUT, "seconds")


def claim_path(folder: Path, name: str) -> Path:
    """The claim file for `name` in `folder`: fixed length, so any output name that can exist has one."""
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:24]
    return Path(folder) / f"{CLAIM_PREFIX}{digest}"


def is_claim_name(name: str) -> bool:
    """A claim file's name (not a claim moved aside while being taken over)."""
    return name.startswith(CLAIM_PREFIX) and "." not in name[len(CLAIM_PREFIX):]


class Claims:
    """The claims one runner holds, with the heartbeat that keeps them fresh."""

    def __init__(self, *, timeout: Optional[float] = None):
        self.timeout = float(timeout if timeout is not None else claim_timeout())
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.namespace = process_namespace()
        self._held: dict[Path, str] = {}  # claim file -> what it claims
        self._unclaimable: set[Path] = set()  # claims that could not be written: the item runs unclaimed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    # -- claiming

    def acquire(self, folder: Path, name: str, extra: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
        """Claim `name` in `folder`. Returns None when this runner now holds it, else the live holder's
        record (host, pid, ...; {} while the holder is still writing it)."""
        path = claim_path(folder, name)
        for _ in range(3):  # a stale claim taken over by someone else in between: look again
            record = {"host": self.host, "pid": os.getpid(), "started": process_start(os.getpid()),
                      **self.namespace, "run": self.token, "claims": name, **(extra or {})}
            try:
                created = _create(path, record, private=path.with_name(f"{path.name}.{self.token}.new"))
            except OSError:  # a folder that cannot hold the claim cannot hold the output: writing says why
                self._unclaimable.add(path)
                return None
            if created:
                self._hold(path, name)
                return None
            holder = _read(path)
            if holder is None:
                continue  # released in between
            if not self._stale(path, holder):
                return holder
            self._take_over(path, holder)
        return _read(path) or {}

    def still_mine(self, folder: Path, name: str) -> bool:
        """Whether this runner still holds the claim (a run suspended past the timeout may have lost it)."""
        path = claim_path(folder, name)
        if path in self._unclaimable:
            return True
        holder = _read(path)
        return holder is not None and holder.get("run") == self.token

    def release(self, folder: Path, name: str) -> None:
        path = claim_path(folder, name)
        with self._lock:
            self._held.pop(path, None)
        if path in self._unclaimable:
            self._unclaimable.discard(path)
        elif self.still_mine(folder, name):
            _unlink(path)

    def close(self) -> None:
        """Release every claim still held and stop the heartbeat."""
        self._stop.set()
        with self._lock:
            held = list(self._held.items())
        for path, name in held:
            self.release(path.parent, name)

    # -- staleness and takeover

    def _stale(self, path: Path, holder: dict[str, Any]) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return False  # gone: the next attempt creates it
        if age > self.timeout or (not holder and age > _PARTIAL_GRACE):
            return True
        return self._gone(holder)

    def _gone(self, holder: dict[str, Any]) -> bool:
        """Whether the record names another run's process on this host, in this PID namespace, that no longer
        exists (a pid given to another process since counts as gone)."""
        pid = holder.get("pid")
        if holder.get("host") != self.host or not isinstance(pid, int) or holder.get("run") == self.token:
            return False
        if any(key in holder and holder[key] != mine for key, mine in self.namespace.items()):
            return False  # another machine or container under the same host name: its pids are not ours
        if not process_alive(pid):
            return True
        started, current = holder.get("started"), process_start(pid)  # None where unknown: the pid decides
        return started is not None and current is not None and started != current

    def _take_over(self, path: Path, seen: dict[str, Any]) -> bool:
        """Remove the stale claim: move it aside first, and if what was moved is not the claim judged stale
        (it was replaced in between), put it back. True when the stale claim is gone."""
        aside = path.with_name(f"{path.name}.{self.token}.stale")
        try:
            os.rename(path, aside)
        except OSError:
            return False
        moved = _read(aside)
        taken = moved is None or moved == seen
        if not taken:
            try:
                os.link(aside, path)  # a fresh claim: give it back (fails if yet another run claimed it)
            except OSError:
                pass
        _unlink(aside)
        return taken

    def remove_stale(self, listings: Mapping[Path, Iterable[str]]) -> int:
        """Delete the stale claims (killed runs' leftovers, whatever they claimed) among each folder's
        listed entry names."""
        removed = 0
        for folder, names in listings.items():
            for name in names:
                path = Path(folder) / name
                if name.startswith(CLAIM_PREFIX) and name.endswith(_PRIVATE_SUFFIXES):
                    removed += self._remove_private(path)
                if not is_claim_name(name):
                    continue
                holder = _read(path)
                if holder is not None and self._stale(path, holder) and self._take_over(path, holder):
                    removed += 1
        return removed

    def _remove_private(self, path: Path) -> int:
        """A private file of a claim being made (.new) or taken over (.stale) is a killed run's leftover once
        it is older than a live run ever keeps one, or at once for a .new file whose record (its maker's)
        names a process that is gone. A .stale file holds the old holder's record, not its taker's: age only."""
        if path.name.endswith(".new"):
            maker = _read(path)
            if maker and self._gone(maker):
                return _remove_if_older(path, float("-inf"))  # whatever its age
        return _remove_if_older(path, _PARTIAL_GRACE)

    # -- heartbeat

    def _hold(self, path: Path, name: str) -> None:
        with self._lock:
            self._held[path] = name
            if self._beat is None:
                self._beat = threading.Thread(target=self._heartbeat, name="ldmtool-claims", daemon=True)
                self._beat.start()

    def _heartbeat(self) -> None:
        interval = max(self.timeout / 6, 0.05)
        while not self._stop.wait(interval):
            with self._lock:
                held = list(self._held)
            for path in held:
                try:
                    os.utime(path)
                except OSError:
                    pass  # lost or released: still_mine says so before the output is written


def _create(path: Path, record: dict[str, Any], private: Path) -> bool:
    """Create the claim file with its whole record; False when it exists (OSError when it cannot be made).
    The record goes to `private` first, which is then linked to `path`: no one ever sees it half written."""
    data = json.dumps(record, ensure_ascii=True).encode("ascii")
    try:
        _write_file(private, data, os.O_TRUNC)
    except FileNotFoundError:  # the output's subfolder does not exist yet
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(private, data, os.O_TRUNC)
    try:
        os.link(private, path)
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: exclusive create, then the record
        try:
            _write_file(path, data, os.O_EXCL)
        except FileExistsError:
            return False
    finally:
        _unlink(private)
    return True


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Create `path` (`mode`: os.O_TRUNC to replace, os.O_EXCL to fail if it exists) holding `data`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def process_start(pid: int) -> Optional[int]:
    """When process `pid` started (clock ticks since boot, Linux /proc), or None where unknown: with the pid
    it names one process, where a pid alone may have been given to another since."""
    fields = proc_stat_fields(pid)
    try:
        return int(fields[19])  # proc(5) field 22, starttime
    except (IndexError, ValueError):
        return None


def process_namespace() -> dict[str, Any]:
    """Where this process's id means something: the kernel's boot id (one per machine and boot) and the
    inode of its PID namespace (one per container); None for each where unknown (not Linux)."""
    try:
        boot_id: Optional[str] = Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        boot_id = None
    try:
        pid_namespace: Optional[int] = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pid_namespace = None
    return {"boot_id": boot_id, "pid_ns": pid_namespace}


def _remove_if_older(path: Path, seconds: float) -> int:
    try:
        if time.time() - path.stat().st_mtime <= seconds:
            return 0
        os.unlink(path)
    except OSError:
        return 0
    return 1


def _read(path: Path) -> Optional[dict[str, Any]]:
    """A claim's record; {} when it exists but is not (yet) a whole record; None when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = os.read(fd, _MAX_CLAIM_BYTES)
    except OSError:
        return {}
    finally:
        os.close(fd)
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return record if isinstance(record, dict) else {}


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
