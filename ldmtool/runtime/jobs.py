"""What a task and a run are made of: the Task contract, its jobs and outputs, and the run's options.

A pipeline implements `Task` (usually by subclassing `BaseTask`):

    class Upscale(BaseTask):
        command = "superres"
        def open(self): self.model = load(...)                    # once; FatalError if it cannot load
        def load(self, job): return read_image(job.item.path)     # per item; ItemError for bad input
        def run(self, jobs): return [Output(image=...) for job in jobs]   # one Output per job

and `ldmtool.runtime.runner.run_task(task, items, RunOptions(...))` runs it. The runner first calls
`validate()`: run-wide settings are checked (UsageError, exit 2) before the output folder is made or any
item runs. It then starts the task with `start(progress)`, which keeps the `Progress` that sampler steps
are reported to and calls `open()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence, Union

import numpy as np

from ldmtool.errors import ItemError
from ldmtool.io.discover import Item
from ldmtool.io.outputs import DEFAULT_TEMPLATE
from ldmtool.io.writer import DEFAULT_QUALITY
from ldmtool.runtime.shard import Shard

EXISTING_POLICIES = ("check", "skip", "overwrite")
ENGINE_NAMES = ("local", "ray")


@dataclass
class Output:
    """One result image: (H, W, 3) or (H, W) in [0, 1] (float) or uint8, optional alpha, extra metadata."""

    image: np.ndarray
    alpha: Optional[np.ndarray] = None
    params: dict[str, Any] = field(default_factory=dict)  # per-item parameters (prompt, strength, ...)


@dataclass
class Job:
    """An item as the task sees it: with its position, its own seed, its output path and loaded payload."""

    item: Item
    index: int
    seed: int
    output: Path
    payload: Any = None
    load_seconds: float = 0.0
    planned_output: Optional[tuple[int, int, int, int]] = None  # the output file when planned (None: absent)


class Progress(Protocol):
    """Where a task reports progress inside a batch (the reporter, or a Ray worker's collector)."""

    def steps(self, done: int, total: int, label: str = "steps") -> None: ...
    def note(self, message: str) -> None: ...


class Task(Protocol):
    command: str
    model_path: Optional[Path]

    @property
    def params(self) -> Mapping[str, Any]: ...  # read-only here, so BaseTask's dict (or any mapping) fits

    def validate(self) -> None: ...
    def start(self, progress: Optional[Progress]) -> None: ...
    def open(self) -> None: ...
    def load(self, job: Job) -> Any: ...
    def run(self, jobs: list[Job]) -> Sequence[Union[Output, ItemError]]: ...


class BaseTask:
    """Defaults for a Task: nothing to open, nothing to load; `start` keeps the run's progress and opens."""

    command: str = "task"
    item_options: tuple[str, ...] = ()  # options that only make items (each item's data records them)

    def __init__(self, *, params: Optional[Mapping[str, Any]] = None, model_path: Optional[Path] = None):
        self.params: dict[str, Any] = dict(params or {})
        self.model_path = model_path
        self.progress: Optional[Progress] = None

    def validate(self) -> None:
        """UsageError for a run-wide setting that every item would fail on (an option, an environment limit);
        called once before the output folder is made and before the model loads. Checks that need the model
        belong in `open()`, which also runs before any item."""
        return None

    def start(self, progress: Optional[Progress]) -> None:
        """Open the task for a run that reports sampler steps to `progress` (what the runner calls)."""
        self.progress = progress
        self.open()

    @property
    def reporter(self) -> Optional[Progress]:
        """The earlier name of `progress`, for tasks written against it."""
        return self.progress

    def model_file(self) -> Optional[Path]:
        """The weights file this task will load, known before it loads (the job's identity names it)."""
        return self.model_path

    def open(self) -> None:
        return None

    def load(self, job: Job) -> Any:
        return None

    def run(self, jobs: list[Job]) -> Sequence[Union[Output, ItemError]]:
        raise NotImplementedError


@dataclass
class RunOptions:
    """The batch options every task command shares (DESIGN.md §6 names)."""

    output: Optional[Path] = None
    name_template: str = DEFAULT_TEMPLATE
    fmt: Optional[str] = None
    quality: int = DEFAULT_QUALITY
    existing: str = "check"  # an existing output: check (skip if this job wrote it), skip, or overwrite
    fail_fast: bool = False
    batch_size: int = 1
    seed: Optional[int] = None  # the run's base seed; None or -1: adopt the same job's, else random
    item_seed: Optional[int] = None  # run every item with exactly this seed (how replay reproduces one)
    cli: Mapping[str, Any] = field(default_factory=dict)  # the command's options: the job's identity, replay
    json_events: bool = False
    quiet: bool = False
    argv: Optional[list[str]] = None  # recorded in the recipe; default sys.argv
    write_manifest: bool = True
    shard: Optional[Shard] = None  # run only this shard's items (job arrays); needs a fixed seed
    engine: str = "local"  # one of ENGINE_NAMES (ldmtool.runtime.runner.ENGINES)
    ray_address: Optional[str] = None  # join this Ray cluster; a local one otherwise
