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

Before any item runs, the runner plans the run (runtime/plan.py) from two optional methods: `planned_size(item)`,
the item's output (width, height) read from options or an image header, never from decoded pixels (None: not
known until the item loads), and `planned_demand(sizes, batch_size)`, the peak memory and time those need.
An output too large for `--max-output-pixels` or the memory fails its item unrun, or stops the run (exit 2)
when it is the size the run's options set for every item (`options_size()`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence, Union, overload

import numpy as np

from ldmtool.errors import ItemError
from ldmtool.io.discover import Item
from ldmtool.io.outputs import DEFAULT_TEMPLATE
from ldmtool.io.source import SourceInfo
from ldmtool.io.writer import DEFAULT_QUALITY
from ldmtool.runtime.plan import Demand, Size, output_demand, weighted
from ldmtool.runtime.shard import Shard

if TYPE_CHECKING:
    from ldmtool.runtime.sweep import Axis

EXISTING_POLICIES = ("check", "skip", "overwrite")
ENGINE_NAMES = ("local", "ray")


@dataclass
class Output:
    """One result image: (H, W, 3) or (H, W) in [0, 1] (float) or uint8, optional alpha, extra metadata."""

    image: np.ndarray
    alpha: Optional[np.ndarray] = None
    params: dict[str, Any] = field(default_factory=dict)  # per-item parameters (prompt, strength, ...)
    source: Optional[SourceInfo] = None  # the input file's EXIF, ICC profile and greyness, kept in the output
    bit_depth: int = 8  # the input's bits per channel: 16 writes a float image at 16 bits (PNG, TIFF)


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


class PlannedJobs(Sequence[Job]):
    """The jobs of a lazy item sequence (`io.discover.GeneratedItems`), made when they are asked for with the
    same index, seed and output path an eager plan gives them: planning 10^8 samples holds no job."""

    lazy = True

    def __init__(self, items: Sequence[Item], seed_of: Callable[[Item], int],
                 output_of: Callable[[Item, int, int], Path]):
        self.items = items
        self.seed_of = seed_of
        self.output_of = output_of

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> Job: ...
    @overload
    def __getitem__(self, index: slice) -> list[Job]: ...

    def __getitem__(self, index: int | slice) -> Job | list[Job]:
        if isinstance(index, slice):
            return [self._job(i) for i in range(*index.indices(len(self)))]
        return self._job(index if index >= 0 else index + len(self))

    def __iter__(self) -> Iterator[Job]:
        return (self._job(index) for index in range(len(self)))

    def representatives(self) -> Iterator[tuple[Item, int]]:
        """Each kind of item with how many items it stands for (runtime/plan.py)."""
        return weighted(self.items)

    def _job(self, index: int) -> Job:
        item = self.items[index]
        seed = self.seed_of(item)
        return Job(item, index, seed, self.output_of(item, index, seed))


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

    def planned_size(self, item: Item) -> Optional[Size]:
        """The item's output (width, height), known before it loads (from options, or the input's image
        header); None when only loading it can tell. The run plan fails an item whose output is too large."""
        return None

    def options_size(self) -> Optional[Size]:
        """The output size the run's options set for every item (--width/--height of a generator; an item
        may still set its own), known before any item loads; None when each item's size is its own."""
        return None

    def option_defaults(self) -> Mapping[str, Any]:
        """`{option: value}`: what the run's options whose default is the model's (or the task's) resolve to
        when left out, known before the model loads; giving one as that value is the same job (resume, the
        seed a run adopts). {} where it cannot be told cheaply."""
        return {}

    def planned_demand(self, sizes: Mapping[Size, int], batch_size: int) -> Demand:
        """Peak memory (and, once open, time) of running items of these output sizes (size -> number of
        items), `batch_size` at a time; by default the full-size image buffers of the largest batch. The
        plan asks a size's memory alone with a count of 0 (it needs no time: nothing to probe)."""
        return output_demand(dict(sizes), batch_size)

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
    fmt: Optional[str] = None  # png, jpg, webp, tiff, or keep (each input's own format)
    suffix: Optional[str] = None  # added to each output's stem: photo.png -> photo_SUFFIX.png
    quality: int = DEFAULT_QUALITY
    existing: str = "check"  # an existing output: check (skip if this job wrote it), skip, or overwrite
    fail_fast: bool = False
    dry_run: bool = False  # plan and report what would happen; load no model, write nothing
    sweep_cell: bool = False  # one cell of a sweep: the sweep, not the cell, ends with the summary event
    batch_size: int = 1
    seed: Optional[int] = None  # the run's base seed; None or -1: adopt the same job's, else random
    item_seed: Optional[int] = None  # run every item with exactly this seed (how replay reproduces one)
    cli: Mapping[str, Any] = field(default_factory=dict)  # the command's options: the job's identity, replay
    json_events: bool = False
    quiet: bool = False
    argv: Optional[list[str]] = None  # recorded in the recipe; default sys.argv
    write_manifest: bool = True
    gallery: bool = True  # index.html in an output folder with a manifest (io/gallery.py)
    shard: Optional[Shard] = None  # run only this shard's items (job arrays); needs a fixed seed
    engine: str = "local"  # one of ENGINE_NAMES (ldmtool.runtime.runner.ENGINES)
    ray_address: Optional[str] = None  # join this Ray cluster; a local one otherwise
    max_output_pixels: Optional[int] = None  # refuse outputs above this many pixels (None: 16384^2; 0: no limit)
    sweep: tuple["Axis", ...] = ()  # --sweep: run once per cell of these axes (runtime/sweep.py)
