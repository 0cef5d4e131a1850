"""The run plan (issue 26): what a run will make and need, known before any item runs.

    plan = check_run(task, jobs, options)   # build_plan, then check_plan: UsageError (exit 2) when the run's
                                            # own size (--width/--height) is over --max-output-pixels, or
                                            # needs more memory than there is, or more than its format holds
    too_large(plan, task, job)              # an item whose own input makes its output too large: it fails, unrun
    unwritable(task, job)                   # an item's output its format cannot hold: it fails, unrun
    reporter.plan(plan)                     # the `plan` event; a line on stderr when it is long

The runner checks the plan before anything is written (the model not yet open), and again, reporting it,
once the engine has opened the model (sizes from the model's defaults, the measured time).

Each item's output size comes from the task (`BaseTask.planned_size`, runtime/jobs.py): generators know it
from their options or their model's defaults, file tasks from the input's image header (never its pixels).
The task also says what the largest item needs at its peak (weights, tile-bounded working memory, the
full-size image buffers it keeps) and, once its model is open, about how long the run takes
(`BaseTask.planned_demand`). An output over `--max-output-pixels`, or whose peak cannot fit in the memory
available, is refused before anything runs, with one line naming the numbers and the way out: when its size is
the run's own (`options_size`: every item would fail) the run stops with exit 2; when it comes from the item's
own input (a photo's header, a layout's "size", a prompt line's) that item fails and the batch goes on. The
plan's peak memory and time are those of the items that will run; a long run says its plan on stderr before
it starts (`Reporter.plan`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from ldmtool.errors import UsageError
from ldmtool.io.discover import Item
from ldmtool.io.writer import FORMATS, MAX_SIDE, side_problem
from ldmtool.runtime.device import available_host_memory

Size = tuple[int, int]  # (width, height) in pixels, as Pillow reports sizes
DEFAULT_MAX_OUTPUT_PIXELS = 16384 * 16384
ANNOUNCE_SECONDS = 60.0  # a run planned to take longer says its plan on stderr, terminal or not
GB = 2**30


@dataclass(frozen=True)
class Demand:
    """What the largest item of a run needs: peak memory on the device that holds it, what that device has
    available, and (once the model is open) about how long the whole run takes."""

    peak_bytes: int
    available_bytes: int
    seconds: Optional[float] = None
    device: str = "cpu"
    parts: dict[str, int] = field(default_factory=dict)  # what the peak is made of (weights, working, images)


@dataclass(frozen=True)
class Refusal:
    """Why outputs of one size cannot run (`reason`, naming the numbers and the way out) and the first item
    of that size (`label`)."""

    label: str
    reason: str


@dataclass
class RunPlan:
    """A run's work before it starts: items, output pixels, the largest output, peak memory and time."""

    items: int
    pixels: int  # total output pixels of the items whose size is known
    largest: Optional[Size]
    largest_label: str = ""
    peak_bytes: int = 0
    available_bytes: int = 0
    seconds: Optional[float] = None
    device: str = "cpu"
    unknown: int = 0  # items whose size is known only when they load
    parts: dict[str, int] = field(default_factory=dict)
    precision: dict[str, str] = field(default_factory=dict)  # the engine's choice and why, once it is open
    refused: dict[Size, "Refusal"] = field(default_factory=dict)  # output sizes too large to run, and why
    too_large: int = 0  # items of those sizes (they fail, unrun; not counted in pixels, peak or time)

    def line(self) -> str:
        """`1 item, 12000x16000 output (192.0 MP), peak memory ~3.1 GB, about 1h 27m on cpu`."""
        text = f"{self.items} item{'s' if self.items != 1 else ''}"
        text += f" ({self.too_large} too large to run)" if self.too_large else ""
        if self.largest is not None:
            w, h = self.largest
            text += f", {w}x{h} output ({w * h / 1e6:.1f} MP)" if self.items == 1 else \
                f", largest output {w}x{h} ({w * h / 1e6:.1f} MP), {self.pixels / 1e6:.1f} MP in all"
        text += f", peak memory ~{size_text(self.peak_bytes)}"
        if self.seconds is not None:
            text += f", about {duration(self.seconds)} on {self.device}"
            text += f" in {self.precision['precision']}" if self.precision else ""
        return text

    def to_json(self) -> dict[str, Any]:
        return {"event": "plan", "items": self.items, "pixels": self.pixels,
                "largest": None if self.largest is None else list(self.largest), "unknown_sizes": self.unknown,
                "too_large": self.too_large,
                "peak_memory": self.peak_bytes, "available_memory": self.available_bytes,
                "seconds": None if self.seconds is None else round(self.seconds, 3), "device": self.device,
                **self.precision, "peak_parts": {name: value for name, value in self.parts.items() if value}}


def size_text(size: int) -> str:
    """'512 MB', '3.1 GB' (powers of 1024, as --max-memory reads them)."""
    return f"{size / GB:.1f} GB" if size >= GB else f"{max(1, round(size / 2**20))} MB"


def duration(seconds: float) -> str:
    """'45s', '3m 20s', '1h 27m', '2d 3h'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def weighted(jobs: Iterable[Any]) -> Iterator[tuple[Item, int]]:
    """(item, how many items it stands for) for each distinct kind of item of `jobs` (Jobs or Items): a lazy
    generated sequence names one representative per label with its number of samples (`representatives()`),
    so a plan of 10^8 samples costs one call, not 10^8."""
    representatives = getattr(jobs, "representatives", None)
    if representatives is not None:
        yield from representatives()
        return
    for job in jobs:
        yield getattr(job, "item", job), 1


def build_plan(task: Any, jobs: Iterable[Any], *, batch_size: int = 1,
               max_output_pixels: Optional[int] = None) -> RunPlan:
    """The plan of running `jobs` (Jobs or Items) through `task`; a task without `planned_size` plans no
    sizes, one without `planned_demand` needs only its output buffers. Sizes over the pixel limit (None:
    the default, 0: none) or whose peak the memory cannot hold are `refused`; the rest make the plan."""
    planned_size = getattr(task, "planned_size", None)
    sizes: dict[Size, int] = {}
    labels: dict[Size, str] = {}
    items = unknown = 0
    for item, count in weighted(jobs):
        items += count
        size = planned_size(item) if planned_size is not None else None
        if size is None:
            unknown += count
            continue
        sizes[size] = sizes.get(size, 0) + count
        labels.setdefault(size, item.label)
    limit = DEFAULT_MAX_OUTPUT_PIXELS if max_output_pixels is None else max_output_pixels
    refused = {size: Refusal(labels[size], pixels_reason(size, limit))
               for size in sizes if limit and _area(size) > limit}
    demand_of = getattr(task, "planned_demand", None) or output_demand
    for size in sorted((s for s in sizes if s not in refused), key=_area, reverse=True):
        alone = demand_of({size: 0}, batch_size)  # the peak is the largest item's; a count of 0: no time probe
        if not alone.available_bytes or alone.peak_bytes <= alone.available_bytes:
            break  # this size fits, and so do the smaller ones
        refused[size] = Refusal(labels[size], memory_reason(size, alone, batch_size))
    running = {size: count for size, count in sizes.items() if size not in refused}
    largest = max(running, key=_area, default=None)
    plan = RunPlan(items=items, pixels=sum(_area(size) * count for size, count in running.items()), largest=largest,
                   largest_label=labels[largest] if largest is not None else "", unknown=unknown,
                   refused=refused, too_large=sum(sizes[size] for size in refused))
    demand = demand_of(running, batch_size) if running else output_demand(running, batch_size)
    plan.peak_bytes, plan.available_bytes = demand.peak_bytes, demand.available_bytes
    plan.seconds, plan.device, plan.parts = demand.seconds, demand.device, demand.parts
    precision = getattr(getattr(task, "engine", None), "precision", None)
    plan.precision = precision.to_json() if precision is not None else {}
    return plan


def _area(size: Size) -> int:
    return size[0] * size[1]


def pixels_reason(size: Size, limit: int) -> str:
    w, h = size
    return (f"the output would be {w}x{h} = {w * h} pixels, over --max-output-pixels {limit}; make it smaller, "
            f"or give --max-output-pixels {w * h} (0 = no limit) if this machine can hold it")


def memory_reason(size: Size, demand: Demand, batch_size: int) -> str:
    w, h = size
    parts = ", ".join(f"{name} {size_text(value)}" for name, value in demand.parts.items() if value)
    smaller = "make the output smaller" + (f" or the --batch-size ({batch_size})" if batch_size > 1 else "")
    return (f"a {w}x{h} output needs about {size_text(demand.peak_bytes)} of memory at its peak ({parts}), more "
            f"than the {size_text(demand.available_bytes)} available on {demand.device}; {smaller}")


def check_plan(plan: RunPlan, task: Any) -> None:
    """UsageError (exit 2) when the run's own size (`options_size`: a generator's --width/--height) is refused:
    every item of that size would fail. Sizes an item's own input gives fail that item only (`too_large`)."""
    options_size = getattr(task, "options_size", None)
    size = options_size() if options_size is not None else None
    refusal = plan.refused.get(size) if size is not None else None
    if refusal is not None:
        raise UsageError(f"{task.command}: {refusal.label}: {refusal.reason}")


def check_run(task: Any, jobs: Iterable[Any], options: Any) -> RunPlan:
    """The plan of running `jobs` with the run's options (`RunOptions`), refused when it cannot run."""
    plan = build_plan(task, jobs, batch_size=options.batch_size, max_output_pixels=options.max_output_pixels)
    check_plan(plan, task)
    check_option_size(task, jobs)
    return plan


def too_large(plan: Optional[RunPlan], task: Any, job: Any) -> Optional[str]:
    """Why a job's output is too large to run (over --max-output-pixels, or more than the memory holds), from
    the plan, before it runs; None when it is not (or cannot be told yet)."""
    if plan is None or not plan.refused:
        return None  # the usual run: no item's size is read again
    refusal = plan.refused.get(task.planned_size(job.item))
    return None if refusal is None else f"{job.item.label}: {refusal.reason}"


def check_option_size(task: Any, jobs: Iterable[Any]) -> None:
    """UsageError (exit 2) when the run's own size (`--width/--height` of a generator: `options_size`) is more
    than the outputs' format can hold (WebP 16383 pixels a side, JPEG 65535): every item would fail at the end."""
    options_size = getattr(task, "options_size", None)
    size = options_size() if options_size is not None else None
    output: Optional[Path] = getattr(next(iter(jobs), None), "output", None)
    if size is None or output is None:
        return
    problem = side_problem(size, FORMATS.get(output.suffix.lower(), "png"))
    if problem is not None:
        raise UsageError(f"{task.command}: {problem}; make --width/--height smaller, or write png or tiff")


def unwritable(task: Any, job: Any) -> Optional[str]:
    """Why a job's output cannot be written in its format (an input whose output, e.g. at --scale, is wider
    than WebP or JPEG can be), known from the plan before it runs; None when it can (or cannot be told yet)."""
    fmt = FORMATS.get(job.output.suffix.lower(), "")
    planned_size = getattr(task, "planned_size", None)
    if fmt not in MAX_SIDE or planned_size is None:
        return None  # png and tiff hold any size: no input header is read for them
    size = planned_size(job.item)
    problem = None if size is None else side_problem(size, fmt)
    return None if problem is None else f"{job.item.label}: {problem}; write png or tiff (--format, or -o's extension)"


# Bytes per output pixel that a task keeps at its peak: the uint8 image (3), a float32 copy (12) and the
# writer's encoding buffer (3).
OUTPUT_BYTES_PER_PIXEL = 18


def output_bytes(sizes: Iterable[Size], batch_size: int = 1) -> int:
    """The full-size image buffers of the largest item, for `batch_size` items at once."""
    return max((w * h for w, h in sizes), default=0) * OUTPUT_BYTES_PER_PIXEL * batch_size


def output_demand(sizes: dict[Size, int], batch_size: int) -> Demand:
    """What a task without a model needs: its output buffers, against the host's available memory."""
    images = output_bytes(sizes, batch_size)
    return Demand(peak_bytes=images, available_bytes=available_host_memory() + resident_bytes(),
                  parts={"images": images})


def resident_bytes() -> int:
    """This process's resident memory (what it holds already, e.g. loaded weights); 0 where unknown."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0

