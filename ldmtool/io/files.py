"""Reading input files safely (issue 26): regular files only, bounded, never blocking.

A FIFO, device or socket named like an image (or a link to one, such as `/dev/zero`) is refused after
`os.stat` and before any open, so nothing can block or read without end; the open itself uses
`O_NONBLOCK` and the opened file is checked again (it may have been swapped). Every read is bounded by
`$LDMTOOL_MAX_FILE_BYTES` (default 1 GiB).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from ldmtool.errors import UsageError

DEFAULT_MAX_FILE_BYTES = 1 << 30
MAX_CONFIG_BYTES = 16 << 20  # a YAML config or palette: far larger than any real one
MAX_FILE_BYTES_ENV = "LDMTOOL_MAX_FILE_BYTES"


class NotRegularFile(OSError):
    """The path is not a regular file (after resolving links)."""


class FileTooLarge(OSError):
    """The file is over the size bound."""


def max_file_bytes() -> int:
    """The size bound for one input file: `$LDMTOOL_MAX_FILE_BYTES` when set, else 1 GiB."""
    return positive_int_env(MAX_FILE_BYTES_ENV, DEFAULT_MAX_FILE_BYTES, "bytes")


def positive_int_env(name: str, default: int, unit: str) -> int:
    """A limit from the environment variable `name` (a whole number, at least 1), else `default`."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a whole number of {unit}") from None
    if value < 1:
        raise UsageError(f"{name}={raw!r} must be at least 1")
    return value


def shown(path: Path | str) -> str:
    """A path as messages show it: bytes that are not UTF-8 escaped (b'caf\\xe9' -> 'caf\\\\xe9'), and control
    characters too (a name holding '\\r' or '\\n' must not cut or split the one-line message)."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


def file_in_the_way(folder: Path) -> str | None:
    """Why `folder` cannot be made or written into when a part of it is not a folder: 'out.png is a file, not a
    folder' for the nearest existing part (`folder` or a parent); None when that part is a folder."""
    for part in (folder, *folder.parents):
        try:
            mode = part.stat().st_mode
        except OSError:
            continue
        if stat.S_ISDIR(mode):
            return None
        kind = "a file" if stat.S_ISREG(mode) else file_kind(mode)
        return f"{shown(part)} is {kind}, not a folder"
    return None


def file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"


def _check(path: Path | str, result: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(result.st_mode):
        if stat.S_ISDIR(result.st_mode):
            raise _with_reason(IsADirectoryError(f"{shown(path)}: is a folder, not an image file"), "is a folder")
        reason = f"not a regular file ({file_kind(result.st_mode)})"
        raise _with_reason(NotRegularFile(f"{shown(path)}: {reason}"), reason)
    if result.st_size > limit:
        reason = (f"the file is {result.st_size} bytes, over the limit of {limit} "
                  f"(raise it with {MAX_FILE_BYTES_ENV} if the file is trusted)")
        raise _with_reason(FileTooLarge(f"{shown(path)}: {reason}"), reason)


def _with_reason(err: OSError, reason: str) -> OSError:
    """The error with `strerror` set, as callers that name the file themselves show it."""
    err.strerror = reason
    return err


def open_regular(path: Path | str, limit: int | None = None) -> int:
    """An O_RDONLY|O_NONBLOCK descriptor of a regular file within the bound; OSError otherwise."""
    limit = max_file_bytes() if limit is None else limit
    _check(path, os.stat(path), limit)  # follows links; a FIFO is never opened
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        _check(path, os.fstat(fd), limit)  # swapped between the stat and the open
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bounded(path: Path | str, limit: int | None = None) -> bytes:
    """The whole content of a regular file no larger than the bound."""
    limit = max_file_bytes() if limit is None else limit
    fd = open_regular(path, limit)
    with os.fdopen(fd, "rb") as handle:
        # read(limit + 1) would allocate a buffer of the whole limit (1 GiB) for every small file
        chunks = [handle.read(min(os.fstat(fd).st_size, limit) + 1)]
        total = len(chunks[0])
        while total <= limit and chunks[-1]:  # until the end of a file that grew since the stat
            chunks.append(handle.read(min(1 << 16, limit + 1 - total)))
            total += len(chunks[-1])
        data = b"".join(chunks)
    if len(data) > limit:
        raise FileTooLarge(f"{shown(path)}: the file grew over the limit of {limit} bytes while being read")
    return data


def read_text_file(path: Path | str, limit: int | None = None) -> str:
    """A UTF-8 text file given by the user (prompt list, `@list.txt`, palette, config), read as
    `read_bounded` reads: a FIFO or device is refused, never waited on. OSError (with a short `strerror`)
    or UnicodeDecodeError otherwise. A leading byte order mark (Windows Notepad writes one) is not text: it
    made a JSON-lines prompt file plain text, and the first path of a list a file that does not exist."""
    return read_bounded(path, limit).decode("utf-8-sig")


def check_unicode_text(text: str, where: str) -> None:
    """A UsageError naming `where` unless all of `text` can be written as UTF-8. A command-line argument
    with bytes that are not UTF-8 arrives with lone surrogates in their place (Python's surrogateescape), as does
    a JSON `\\ud800` escape; no tokenizer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = ord(text[err.start])
        what = f"the byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"a lone surrogate U+{bad:04X}"
        raise UsageError(f"{where}: not UTF-8 text (character {err.start + 1} is {what})") from None


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one of another user counts as alive). A process
    that has exited but was not yet reaped by its parent (a zombie, as a killed Ray worker is until the raylet
    waits on it) is gone: it holds nothing and will never finish what it started."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        pass
    return _process_state(pid) not in ("Z", "X")


def _process_state(pid: int) -> str:
    """The one-letter state of process `pid` (Linux /proc: R, S, Z, ...), or "" where unknown."""
    fields = proc_stat_fields(pid)
    return fields[0].decode("ascii", "replace") if fields else ""


def proc_stat_fields(pid: int) -> list[bytes]:
    """The fields of /proc/<pid>/stat after the process name (state first, so field N of proc(5) is at
    N - 3), or [] where unknown (no such process, not Linux). The name may hold spaces and parentheses."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2 :].split()
    except (OSError, ValueError):
        return []


def json_line(record: object) -> str:
    """One JSON line, UTF-8 as it is; names with bytes that are not UTF-8 (surrogate-escaped) are written
    as JSON `\\udcXX` escapes, which load back to the same name (os.fsencode gives the bytes)."""
    import json

    line = json.dumps(record, ensure_ascii=False, default=str)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record, ensure_ascii=True, default=str)
    return line + "\n"
