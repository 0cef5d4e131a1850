"""The run manifest: one JSON line per finished (done or failed) item, appended in the output folder.

Each line is written with a single `write` and fsynced, so after a crash the file holds whole records
plus at most one cut-off last line; readers skip lines that do not parse, and the next append starts
on a fresh line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from ldmtool.errors import FatalError
from ldmtool.io.files import json_line

MANIFEST_NAME = "ldmtool-manifest.jsonl"
MANIFEST_PATTERN = "ldmtool-manifest*.jsonl"  # the folder's own and every shard's part


class Manifest:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # told of each record once it is written

    def append(self, record: dict[str, Any]) -> None:
        line = json_line(record)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab+") as handle:
                if _ends_mid_line(handle):
                    line = "\n" + line
                handle.write(line.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            raise FatalError(f"{self.path}: cannot write the manifest ({err.strerror or err}); stopping") from err
        for listener in self.listeners:
            listener(record)

    def records(self) -> list[dict[str, Any]]:
        return list(read_manifest(self.path))


def _ends_mid_line(handle: BinaryIO) -> bool:
    handle.seek(0, os.SEEK_END)
    if handle.tell() == 0:
        return False
    handle.seek(-1, os.SEEK_END)
    return handle.read(1) != b"\n"


def read_manifest(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a manifest file, skipping any line a crash cut short."""
    try:
        handle = open(path, "rb")  # streamed: a 10^8-item run's manifest is never held whole
    except OSError:  # none yet, or unreadable: no earlier records to go by
        return
    with handle:
        for raw in handle:  # split at b"\n" only: a record's strings may hold U+2028, U+0085, ...
            try:
                record = json.loads(raw.decode("utf-8", "replace"))
            except (ValueError, RecursionError):  # a cut-short line, or JSON nested too deep to parse
                continue
            if isinstance(record, dict):
                yield record
