"""The one error type users see, and the exit codes the CLI maps it to (DESIGN.md §6).

Library code raises these with a message that teaches (what is wrong, with which file, what to do).
Only `ldmtool.cli.app.main` turns them into a one-line message and an exit code.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1
EXIT_USAGE = 2
EXIT_FATAL = 3
EXIT_INTERRUPTED = 130


class LdmError(Exception):
    """A problem the user can fix; `str(err)` is the whole one-line message."""

    exit_code = EXIT_FATAL


class UsageError(LdmError):
    """Bad options or arguments: nothing was processed."""

    exit_code = EXIT_USAGE


class FatalError(LdmError):
    """The run cannot start or go on (model does not load, output not writable, disk full)."""

    exit_code = EXIT_FATAL


class ItemError(LdmError):
    """One input item cannot be processed; the batch goes on without it."""

    exit_code = EXIT_ITEMS_FAILED


class CheckpointError(FatalError):
    """A checkpoint or config cannot be read, or does not match the architecture."""


class Interrupted(LdmError):
    """Ctrl-C: the run stopped cleanly, no partial file left."""

    exit_code = EXIT_INTERRUPTED
