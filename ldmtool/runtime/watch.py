"""Model and add-on files that change while a run uses them (README, "Checkpoints").

Weights are memory-mapped (safetensors, zip `.ckpt`), and an fp32 CPU run computes from the mapping itself:
a file rewritten in place (`cp new m.safetensors`, `wget -O m.safetensors`) changes the weights under a running
job, whose recipes still record the sha256 taken when it started. A `FileWatch` belongs to one run. While it
is open it notes the identity (device, inode, size, mtime_ns, ctime_ns; `cache.FileIdentity`) of every file
the run loads weights from (`note_loaded`: the model cache's keys, embeddings, text encoders) and of every
file hashed for a job's identity (`note_hashed`). `check()`, before each item starts and before each output
is written, stats each loaded file once (a few microseconds per item) and raises `ModelFileChanged` when:

- a loaded file was written in place since (same inode, another size, mtime or ctime), or
- a path the run loaded was hashed or loaded again as another file (replaced, then read again: an fp32
  retry, another LoRA combination, a recipe's hash), so that an output would record one file's hash and
  compute with another's weights.

A file replaced by renaming another over it (`mv`, `rsync`), or removed, is not a change on its own: the run
keeps the file it mapped (the kernel keeps an unlinked file alive while it is mapped), so its outputs are that
file's, as their recipes say. Folders (diffusers layouts) are not watched.

A mapped file cut short while an item computes ends the process with SIGBUS (exit 135) at the first read past
its new end, before any check can run. That cannot become one line naming the file: Python's own signal
handler only sets a flag and returns to the faulting read, which faults again forever, and a C-level handler
that jumped out of torch's kernels would leave them in an unknown state. `report_crashes()` (the CLI calls it)
has `faulthandler` print "Fatal Python error: Bus error" and the Python stack instead of dying silently.
"""
from __future__ import annotations

import os
import stat
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Optional

from ldmtool.errors import FatalError

if TYPE_CHECKING:
    from ldmtool.runtime.cache import FileIdentity

_lock = threading.Lock()
_open: "weakref.WeakSet[FileWatch]" = weakref.WeakSet()  # an unclosed watch goes with its run


class ModelFileChanged(FatalError):
    """A file the run computes from changed under it: no output of it may be written, the run stops."""

    def __init__(self, path: str):
        super().__init__(f"{path} changed while this run used it; its outputs would not match their recorded "
                         "model; rerun")


class FileWatch:
    """The weight files one run uses, as they were when it first used them; see the module docstring."""

    def __init__(self) -> None:
        self._loaded: dict[str, "FileIdentity"] = {}  # path -> the identity the run loaded it as
        self._seen: dict[str, set["FileIdentity"]] = {}  # path -> every identity the run hashed or loaded
        self._folders: set[str] = set()
        self._changed: Optional[str] = None
        with _lock:
            _open.add(self)

    def close(self) -> None:
        with _lock:
            _open.discard(self)

    def note(self, identity: "FileIdentity", *, loaded: bool) -> None:
        path = identity.path
        if loaded and path not in self._loaded:
            if path in self._folders or os.path.isdir(path):
                self._folders.add(path)
                return
            self._loaded[path] = identity
        seen = self._seen.setdefault(path, set())
        seen.add(identity)
        if path in self._loaded and len(seen) > 1 and self._changed is None:
            self._changed = path

    def check(self) -> None:
        """ModelFileChanged naming the first file the run loaded that changed (module docstring)."""
        if self._changed is not None:
            raise ModelFileChanged(self._changed)
        for path, was in self._loaded.items():
            try:
                now = os.stat(path)
            except OSError:
                continue  # removed: the run still holds the file it mapped
            if (now.st_dev, now.st_ino) != (was.device, was.inode) or not stat.S_ISREG(now.st_mode):
                continue  # another file renamed over it: the same
            if (now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (was.size, was.mtime_ns, was.ctime_ns):
                self._changed = path
                raise ModelFileChanged(path)


def note_loaded(*identities: "FileIdentity") -> None:
    """Every open watch: the run reads weights from these files (as they are now)."""
    _note(identities, loaded=True)


def note_hashed(identity: "FileIdentity") -> None:
    """Every open watch: a hash of this file (as it is now) may be recorded with the run's outputs."""
    _note((identity,), loaded=False)


def _note(identities: tuple["FileIdentity", ...], *, loaded: bool) -> None:
    with _lock:
        watches = list(_open)
    for watch in watches:
        for identity in identities:
            watch.note(identity, loaded=loaded)



def report_crashes() -> None:
    """A fatal signal (SIGBUS from a mapped file cut short, SIGSEGV) prints what it was and the Python stack on
    stderr, the process still ending with it; left as it is when already on (PYTHONFAULTHANDLER, pytest) or
    when stderr is no file."""
    import faulthandler

    if faulthandler.is_enabled() or sys.__stderr__ is None:
        return
    try:
        faulthandler.enable(file=sys.__stderr__, all_threads=False)
    except (AttributeError, OSError, ValueError):  # no file descriptor behind stderr (io.UnsupportedOperation)
        return
