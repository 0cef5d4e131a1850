"""The one reporter every command uses for progress and per-item events (DESIGN.md §6).

- stdout gets machine output only: with `--json`, one JSON object per line, one per item
  (`event`: done | skipped | failed, with input, output, seed, seconds, error), then one `summary` with
  the exit code, however the run ends (with `error` when it stopped on one). Items that are to run are
  preceded by one `plan` event (runtime/plan.py: items, pixels, largest [w, h], peak_memory and
  available_memory in bytes, seconds or null, device), sent when the model is open and before the first of
  them runs (an item skipped by resume is reported before it).
- stderr gets human output: a rich progress bar when stderr is a terminal, a one-line message per failed
  item (always, even with `--quiet`), notes (e.g. skipped non-image files), the plan of a run expected to
  take over a minute (`ldmtool: plan: ...`, even when stderr is not a terminal) and a closing summary line.
- stdout that cannot be written (its reader is gone: `--json | head -1`; its disk is full) stops the run as a
  full output disk does: one line on stderr, exit 3, the items written so far kept; later writes go nowhere.
"""
from __future__ import annotations

import errno
import os
import sys
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, TextIO

from ldmtool.io.files import json_line, shown

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from ldmtool.runtime.plan import RunPlan


class Status(str, Enum):
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass
class ItemEvent:
    """What happened to one item."""

    status: Status
    key: str
    input: Optional[str]
    output: Optional[str]
    seed: Optional[int]
    seconds: float = 0.0
    error: Optional[str] = None
    reason: Optional[str] = None  # why a skipped item was left alone, when not because its output is there

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record.pop("status")
        record = {"event": self.status.value, **record, "seconds": round(self.seconds, 3)}
        for name in ("error", "reason"):
            if record[name] is None:
                record.pop(name)
        return record


@dataclass
class Summary:
    """Counts of a finished run, and the exit code they mean."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    base_seed: Optional[int] = None
    failures: list[str] = field(default_factory=list)
    elsewhere: int = 0  # of the skipped: items another run on the same folder has claimed or written
    dry_run: dict[str, int] = field(default_factory=dict)  # a --dry-run's counts: run, skip, fail

    @property
    def exit_code(self) -> int:
        from ldmtool.errors import EXIT_ITEMS_FAILED, EXIT_OK

        return EXIT_ITEMS_FAILED if self.failed else EXIT_OK

    def count(self, status: Status) -> None:
        setattr(self, status.value, getattr(self, status.value) + 1)

    def add(self, event: ItemEvent) -> None:
        """Count one reported item."""
        self.count(event.status)
        if event.error is not None:
            self.failures.append(event.error)
        if event.reason is not None:
            self.elsewhere += 1

    def line(self) -> str:
        skipped = f"{self.skipped} skipped" + (f" ({self.elsewhere} by another run)" if self.elsewhere else "")
        text = f"{self.done} done, {skipped}, {self.failed} failed in {self.seconds:.1f}s"
        return text + (f" (seed {self.base_seed})" if self.base_seed is not None else "")


class Reporter:
    """Progress on stderr, JSON events on stdout; `quiet` silences progress, notes and the summary line."""

    def __init__(self, *, json_events: bool = False, quiet: bool = False,
                 out: Optional[TextIO] = None, err: Optional[TextIO] = None):
        self.json_events = json_events
        self.quiet = quiet
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._progress: Optional[Progress] = None
        self._task_id: Optional[TaskID] = None
        self._steps_id: Optional[TaskID] = None

    # -- lifecycle

    def start(self, total: int, label: str = "") -> None:
        if self.quiet or not _is_terminal(self.err):
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), console=Console(file=self.err), transient=True)
        self._progress.start()
        self._task_id = self._progress.add_task(label or "items", total=total)

    def finish(self, summary: Summary, *, final: bool = True) -> None:
        """The closing summary line; with `--json` the final `summary` event (not for a part of a run, such
        as one cell of a sweep)."""
        self._stop_progress()
        if self.json_events and final:
            self._emit(_summary_event(summary, summary.exit_code, None))
            _FINAL["sent"] = True
        if not self.quiet:
            self._say(summary.line())

    def finish_with_error(self, summary: Summary, code: int, message: str) -> None:
        """End a run that stopped (fatal error, usage error found late, interruption): with `--json`, the
        final `summary` event carries its exit code and the one-line error; stderr gets the error from
        the CLI, not here."""
        self._stop_progress()
        if self.json_events:
            self._emit(_summary_event(summary, code, message))
            _FINAL["sent"] = True

    def close(self) -> None:
        """Stop the progress bar without a summary (fatal error, interruption)."""
        self._stop_progress()

    # -- events

    def item(self, event: ItemEvent) -> None:
        if self.json_events:
            self._emit(event.to_json())
        if event.status is Status.FAILED:
            self._say(f"ldmtool: failed: {event.error}", always=True)
        if self._progress is not None and self._task_id is not None:
            self._progress.advance(self._task_id)
            if self._steps_id is not None:
                self._progress.update(self._steps_id, visible=False)

    def plan(self, plan: "RunPlan") -> None:
        """The run's plan: a JSON `plan` event with --json; on stderr (unless quiet) when it is long."""
        from ldmtool.runtime.plan import ANNOUNCE_SECONDS

        if self.json_events:
            self._emit(plan.to_json())
        if plan.seconds is not None and plan.seconds > ANNOUNCE_SECONDS:
            self._say(f"ldmtool: plan: {plan.line()}")

    def dry_run_item(self, action: str, *, key: str, input: Optional[Path], output: Path, seed: int,
                     reason: Optional[str]) -> None:
        """One item of a `--dry-run`: what a run would do with it (run, skip or fail) and why."""
        if self.json_events:
            event: dict[str, Any] = {"event": "dry-run", "action": action, "key": key,
                                     "input": None if input is None else str(input), "output": str(output),
                                     "seed": seed}
            if reason is not None:
                event["reason"] = reason
            self._emit(event)
            return
        source = shown(key if input is None else input)
        self._write(f"{action:<4} {source} -> {shown(output)} (seed {seed})" + (f": {reason}" if reason else "")
                    + "\n")

    def dry_run_finish(self, plan: "RunPlan", counts: Mapping[str, int], seed: Optional[int], *,
                       final: bool = True) -> None:
        """The end of a `--dry-run`: the plan, and how many items would run, be skipped or fail (with
        `--json`, the final `summary` event unless this is one cell of a sweep, which sends one for all)."""
        if self.json_events:
            self._emit(plan.to_json())
            if final:
                self.dry_run_summary(counts, seed)
            return
        self._write(f"plan: {plan.line()}\n"
                    f"dry run: {counts['run']} to run, {counts['skip']} skipped, {counts['fail']} would fail "
                    f"(seed {seed}); nothing was loaded or written\n")

    def dry_run_summary(self, counts: Mapping[str, int], seed: Optional[int]) -> None:
        """With `--json`, the final `summary` event of a `--dry-run`."""
        if self.json_events:
            self._emit({"event": "summary", "dry_run": True, "to_run": counts["run"], "skipped": counts["skip"],
                        "failing": counts["fail"], "seed": seed, "exit_code": 0})
            _FINAL["sent"] = True

    def note(self, message: str) -> None:
        self._say(f"ldmtool: {message}")

    def steps(self, done: int, total: int, label: str = "steps") -> None:
        """Progress inside one batch (sampler steps); shown only on a terminal."""
        if self._progress is None:
            return
        if self._steps_id is None:
            self._steps_id = self._progress.add_task(label, total=total)
        self._progress.update(self._steps_id, completed=done, total=total, description=label, visible=True)

    # -- output

    def _emit(self, record: dict[str, Any]) -> None:
        self._write(json_line(record))

    def _write(self, text: str) -> None:
        """`text` on stdout, flushed; a FatalError when stdout cannot take it (see the module docstring)."""
        try:
            self.out.write(text)
            self.out.flush()
        except OSError as err:
            _discard_output(self.out)
            why = "its reader closed it" if err.errno == errno.EPIPE else (err.strerror or str(err)).lower()
            from ldmtool.errors import FatalError

            raise FatalError(f"stdout: cannot write the run's output ({why}); stopping") from None

    def _say(self, text: str, *, always: bool = False) -> None:
        if self.quiet and not always:
            return
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.err, flush=True)

    def _stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


# Whether this process has written its final `--json` event (the CLI writes one for runs that end before
# a reporter could: usage errors, a model that does not load).
_FINAL = {"sent": False}


def reset_final_event() -> None:
    _FINAL["sent"] = False


def final_event_sent() -> bool:
    return _FINAL["sent"]


def emit_final_event(out: TextIO, code: int, message: Optional[str]) -> None:
    """The final `summary` event of a command that ended before any item was processed."""
    out.write(json_line(_summary_event(Summary(), code, message)))
    out.flush()
    _FINAL["sent"] = True


def _summary_event(summary: Summary, code: int, message: Optional[str]) -> dict[str, Any]:
    event: dict[str, Any] = {"event": "summary", "done": summary.done, "skipped": summary.skipped,
                             "failed": summary.failed, "seconds": round(summary.seconds, 3),
                             "seed": summary.base_seed, "exit_code": code}
    if message is not None:
        event["error"] = message
    return event


def closed_stdout() -> Exception:
    """The FatalError of a command other than a batch run whose stdout reader went away (`ldmtool info *.png
    --json | head -1`): one line and exit 3 as a run gives (`Reporter._write`), not Click's silent exit 1."""
    from ldmtool.errors import FatalError

    _discard_output(sys.stdout)
    return FatalError("stdout: cannot write the command's output (its reader closed it); stopping")


def _discard_output(stream: TextIO) -> None:
    """Point the stream's descriptor at /dev/null: what it still buffers, and the final summary event, go
    nowhere instead of failing again (and again at exit, in a message of Python's own)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's StringIO)
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
