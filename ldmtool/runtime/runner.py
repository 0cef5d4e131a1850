"""The batch runner every task command goes through (DESIGN.md §1, §6).

A pipeline implements `Task` (usually by subclassing `BaseTask`):

    class Upscale(BaseTask):
        command = "superres"
        def open(self): self.model = load(...)                    # once; FatalError if it cannot load
        def load(self, job): return read_image(job.item.path)     # per item; ItemError for bad input
        def run(self, jobs): return [Output(image=...) for job in jobs]   # one Output per job

    summary = run_task(Upscale(params={...}, model_path=path), discovery, RunOptions(output=...))

The runner chooses the run's base seed (`--seed`, else the seed of an earlier run of the same job recorded
in the output folder, else random), gives every item its seed (runtime/seeds.py), plans output paths, and
resumes: an existing output is skipped only when its recipe says this job wrote it (`--existing check`,
the default; runtime/identity.py), kept whatever wrote it (`skip`) or replaced (`overwrite`); an empty or
undecodable one is redone. It loads and runs items in batches of
`batch_size`, writes each output atomically with its metadata, appends done/failed records to the
manifest, reports every item, goes on after an item fails (unless `fail_fast`), and turns Ctrl-C or
SIGTERM into `Interrupted` (exit 130) with no partial file. The returned `Summary.exit_code` is 0 when
every item was done or skipped and 1 when some failed; fatal problems raise FatalError (exit 3).
"""
from __future__ import annotations

import datetime as _dt
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence, Union

import numpy as np

from ldmtool.errors import FatalError, Interrupted, ItemError, LdmError, UsageError
from ldmtool.io.discover import Discovery, Item
from ldmtool.io.manifest import MANIFEST_NAME, Manifest
from ldmtool.io.metadata import build_metadata
from ldmtool.io.outputs import DEFAULT_TEMPLATE, OutputSpec, plan_outputs
from ldmtool.io.writer import DEFAULT_QUALITY, format_name, remove_stale_temps, write_image
from ldmtool.runtime import identity
from ldmtool.runtime.report import ItemEvent, Reporter, Status, Summary
from ldmtool.runtime.resume import Recipes, current_replay
from ldmtool.runtime.seeds import RANDOM, item_seed
from ldmtool.runtime.shard import Shard, select, strip_scheduling, write_members

DEBUG_ENV = "LDMTOOL_DEBUG"


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


class Task(Protocol):
    command: str
    params: Mapping[str, Any]
    model_path: Optional[Path]

    def open(self) -> None: ...
    def load(self, job: Job) -> Any: ...
    def run(self, jobs: list[Job]) -> list[Union[Output, ItemError]]: ...


class BaseTask:
    """Defaults for a Task: nothing to open, nothing to load. `reporter` is set by the runner."""

    command: str = "task"
    item_options: tuple[str, ...] = ()  # options that only make items (each item's data records them)

    def __init__(self, *, params: Optional[Mapping[str, Any]] = None, model_path: Optional[Path] = None):
        self.params: dict[str, Any] = dict(params or {})
        self.model_path = model_path
        self.reporter: Optional[Reporter] = None

    def model_file(self) -> Optional[Path]:
        """The weights file this task will load, known before it loads (the job's identity names it)."""
        engine = getattr(self, "engine", None)
        if engine is None:
            return self.model_path
        from ldmtool.checkpoints.api import resolve_source

        return resolve_source(engine.choice.model)[0]

    def open(self) -> None:
        return None

    def load(self, job: Job) -> Any:
        return None

    def run(self, jobs: list[Job]) -> list[Union[Output, ItemError]]:
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
    engine: str = "local"  # "local", or "ray" (ldmtool.runtime.ray_engine)
    ray_address: Optional[str] = None  # join this Ray cluster; a local one otherwise


def run_task(
    task: Task,
    source: Union[Discovery, Sequence[Item]],
    options: RunOptions,
    *,
    reporter: Optional[Reporter] = None,
) -> Summary:
    """Run `task` over every item; see the module docstring for the rules."""
    replay = current_replay()
    if replay is not None:
        source = [replay.item]
        options = replace(options, output=replay.output, item_seed=replay.seed, existing="overwrite", shard=None,
                          engine="local", write_manifest=False, name_template=DEFAULT_TEMPLATE, fmt=None)
    discovery = source if isinstance(source, Discovery) else Discovery(list(source))
    if not discovery.items:
        raise UsageError("nothing to do: no items to process")
    if options.batch_size < 1:
        raise UsageError(f"--batch-size {options.batch_size}: must be at least 1")
    if options.existing not in EXISTING_POLICIES:
        raise UsageError(f"--existing {options.existing!r}: use {', '.join(EXISTING_POLICIES)}")
    if options.engine not in ("local", "ray"):
        raise UsageError(f"--engine {options.engine!r} is not an engine (use local or ray)")
    if options.shard is not None and options.seed in (None, RANDOM) and options.item_seed is None:
        raise UsageError(f"--shard {options.shard} needs --seed N, so that every shard derives the same per-item seeds")
    reporter = reporter or Reporter(json_events=options.json_events, quiet=options.quiet)
    run = _BatchRun(task, options, reporter)
    with _sigterm_as_interrupt():
        try:
            return run.execute(discovery.items, notes=discovery.notes())
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted after {run.summary.done} item(s) were written; "
                              "run the same command again to resume") from None
        finally:
            reporter.close()


EXISTING_POLICIES = ("check", "skip", "overwrite")


class _BatchRun:
    def __init__(self, task: Task, options: RunOptions, reporter: Reporter):
        self.task = task
        self.options = options
        self.reporter = reporter
        self.base_seed = options.seed if options.seed not in (None, RANDOM) else None  # chosen in execute()
        self.summary = Summary(base_seed=self.base_seed)
        self.spec = OutputSpec(options.output, options.name_template, options.fmt)
        self.manifest: Optional[Manifest] = None
        self.model_sha256 = _model_sha256(task)
        own = {name: value for name, value in options.cli.items() if name not in getattr(task, "item_options", ())}
        self.recipes = Recipes(task.command, self.model_sha256,
                               identity.pixel_options(own, Path("x" + self._output_suffix())),
                               identity.recorded_options(options.cli))
        self.stopped = False
        self.started = time.monotonic()
        self._recipe_argv = strip_scheduling(options.argv if options.argv is not None else sys.argv)

    def _output_suffix(self) -> str:
        if self.spec.is_file:
            return self.spec.target.suffix  # type: ignore[union-attr]
        return "." + (format_name(self.options.fmt) if self.options.fmt else "png")

    # -- the run

    def execute(self, items: Sequence[Item], notes: Sequence[str] = ()) -> Summary:
        items, outputs_as_inputs = (items, 0) if self.spec.is_file else _outside(items, self.spec.folder)
        if outputs_as_inputs:
            notes = [*notes, f"ignored {outputs_as_inputs} input(s) inside the output folder {self.spec.folder}"]
        if not items:
            raise UsageError(f"every input is inside the output folder {self.spec.folder}; choose another -o")
        self._prepare_folder()
        if self.base_seed is None:
            self.base_seed = self.recipes.adopted_seed(self.spec, self.options.shard)
            self.summary.base_seed = self.base_seed
        jobs = self._plan(items)  # before sharding, so {index} and seeds match an unsharded run
        if self.options.shard is not None:
            jobs = select(jobs, self.options.shard, key=lambda job: job.item.key)
        remove_stale_temps(job.output for job in jobs)
        if self.options.shard is not None and not self.spec.is_file:
            write_members(self.spec.folder, self.options.shard, [job.item.key for job in jobs])
        for note in notes:
            self.reporter.note(note)
        self.reporter.start(len(jobs), label=self.task.command)
        pending = self._resume(jobs)
        if pending and self.options.engine == "ray":
            from ldmtool.runtime.ray_engine import process_on_ray

            process_on_ray(self, pending)
        elif pending:
            self._open_task()
            self._process(pending)
        self.summary.seconds = time.monotonic() - self.started
        self.reporter.finish(self.summary)
        return self.summary

    def _plan(self, items: Sequence[Item]) -> list[Job]:
        seeds = [self._seed_of(item) for item in items]
        paths = plan_outputs(items, seeds, self.spec)
        for item, path in zip(items, paths):
            _check_not_an_input(item, path)
        return [Job(item, index, seed, path) for index, (item, seed, path) in enumerate(zip(items, seeds, paths))]

    def _seed_of(self, item: Item) -> int:
        if self.options.item_seed is not None:
            return self.options.item_seed
        assert self.base_seed is not None  # chosen before planning
        return item_seed(self.base_seed, key=item.key, offset=item.seed_offset, own=item.seed)

    def _prepare_folder(self) -> None:
        folder = self.spec.folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise FatalError(f"{folder}: cannot create the output folder ({err.strerror or err})") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise FatalError(f"{folder}: the output folder is not writable")
        if self.options.write_manifest and not self.spec.is_file:
            shard = self.options.shard
            self.manifest = Manifest(folder / (shard.manifest_name if shard else MANIFEST_NAME))

    def _resume(self, jobs: list[Job]) -> list[Job]:
        """The jobs still to run; the others are reported skipped (this job's output is there) or failed
        (another job's output is in the way)."""
        pending = []
        for job in jobs:
            conflict = self.recipes.existing_output(job.output, job.item, job.seed, self.options.existing)
            if conflict is None:
                pending.append(job)
            elif conflict == "":
                self._report(job, Status.SKIPPED)
            elif not self.stopped:
                self._fail(job, ItemError(conflict), 0.0)
        return [] if self.stopped else pending

    def _open_task(self) -> None:
        if hasattr(self.task, "reporter"):
            self.task.reporter = self.reporter
        try:
            self.task.open()
        except LdmError:
            raise
        except Exception as err:  # a model that cannot start: no item can run
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            reason = " ".join(str(err).split()) or type(err).__name__
            raise FatalError(f"{self.task.command}: cannot start ({type(err).__name__}: {reason}); "
                             f"set {DEBUG_ENV}=1 for the full traceback") from err

    def _process(self, jobs: list[Job]) -> None:
        batch: list[Job] = []
        for job in jobs:
            if self.stopped:
                return
            if not self._load(job):
                continue
            batch.append(job)
            if len(batch) == self.options.batch_size:
                self._run_and_release(batch)
                batch = []
        if batch and not self.stopped:
            self._run_and_release(batch)

    def _run_and_release(self, batch: list[Job]) -> None:
        try:
            self._run_batch(batch)
        finally:
            for job in batch:
                job.payload = None  # a long run must not keep every loaded image alive

    def _load(self, job: Job) -> bool:
        started = time.monotonic()
        try:
            job.payload = self.task.load(job)
            job.load_seconds = time.monotonic() - started
            return True
        except FatalError:
            raise
        except Exception as err:
            self._fail(job, err, time.monotonic() - started)
            return False

    def _run_batch(self, jobs: list[Job]) -> None:
        started = time.monotonic()
        try:
            results = list(self.task.run(jobs))
            if len(results) != len(jobs):
                raise RuntimeError(f"task {self.task.command} returned {len(results)} outputs for {len(jobs)} items")
        except FatalError:
            raise
        except Exception as err:
            if len(jobs) > 1:  # find which item is bad: run them one by one
                for job in jobs:
                    if not self.stopped:
                        self._run_batch([job])
                return
            self._fail(jobs[0], err, time.monotonic() - started)
            return
        share = (time.monotonic() - started) / len(jobs)
        for job, result in zip(jobs, results):
            if self.stopped:
                return
            if isinstance(result, Exception):
                self._fail(job, result, share)
            else:
                self._write(job, result, share)

    def _write(self, job: Job, output: Output, seconds: float) -> None:
        started = time.monotonic()
        try:
            image = np.asarray(output.image)
            size = (image.shape[1], image.shape[0])
            metadata = build_metadata(
                command=self.task.command, params={**self.task.params, **output.params}, seed=job.seed,
                base_seed=self.base_seed, key=job.item.key, argv=self._recipe_argv, size=size,
                model=_model_name(self.task), model_sha256=self.model_sha256, extra=self.recipes.recipe_extras(job.item, job.seed),
            )
            write_image(job.output, image, alpha=output.alpha, quality=self.options.quality, metadata=metadata)
        except FatalError as err:
            self._fail(job, err, seconds, record=False)
            raise
        except Exception as err:
            self._fail(job, err, seconds + job.load_seconds + time.monotonic() - started)
            return
        total = seconds + job.load_seconds + time.monotonic() - started
        self._record(job, Status.DONE, total, None, output.params)
        self._report(job, Status.DONE, total)

    def absorb(self, records: Sequence[dict[str, Any]], events: Sequence[ItemEvent]) -> None:
        """Take in what another engine's worker recorded and reported for its items."""
        for record in records:
            if self.manifest is not None:
                self.manifest.append(record)
        for event in events:
            self.summary.count(event.status)
            if event.error is not None:
                self.summary.failures.append(event.error)
            self.reporter.item(event)

    # -- outcomes

    def _fail(self, job: Job, err: BaseException, seconds: float, *, record: bool = True) -> None:
        if os.environ.get(DEBUG_ENV) == "1" and not isinstance(err, LdmError):
            raise err  # developers: see where an unexpected error came from
        reason = _one_line(err, job.item)
        if record:
            self._record(job, Status.FAILED, seconds, reason, {})
        self._report(job, Status.FAILED, seconds, reason)
        if self.options.fail_fast:
            self.stopped = True

    def _record(self, job: Job, status: Status, seconds: float, error: Optional[str], extra: Mapping[str, Any]) -> None:
        if self.manifest is None:
            return
        record = {
            "status": status.value, "key": job.item.key, "input": _text(job.item.path), "mask": _text(job.item.mask),
            "output": str(job.output), "seed": job.seed, "base_seed": self.base_seed,
            "seconds": round(seconds, 3), "command": self.task.command,
            "params": {**self.task.params, **extra}, "model_sha256": self.model_sha256, "run_id": self.recipes.run_id,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if error is not None:
            record["error"] = error
        self.manifest.append(record)

    def _report(self, job: Job, status: Status, seconds: float = 0.0, error: Optional[str] = None) -> None:
        self.summary.count(status)
        if error is not None:
            self.summary.failures.append(error)
        self.reporter.item(ItemEvent(status=status, key=job.item.key, input=_text(job.item.path),
                                     output=str(job.output), seed=job.seed, seconds=seconds, error=error))


def _model_sha256(task: Task) -> Optional[str]:
    model_file = task.model_file() if hasattr(task, "model_file") else getattr(task, "model_path", None)
    if model_file is None or not Path(model_file).is_file():
        return None
    from ldmtool.runtime.cache import file_sha256

    return file_sha256(model_file)


def _check_not_an_input(item: Item, output: Path) -> None:
    """An output may never replace an input (`-o` naming the input folder, or an input file)."""
    for source in (item.path, item.mask):
        if source is not None and os.path.abspath(source) == os.path.abspath(output):
            raise UsageError(f"{source}: its output would replace the input itself; choose another -o")


def _outside(items: Sequence[Item], folder: Path) -> tuple[list[Item], int]:
    """Drop inputs found inside an output folder that lies within their input tree: a rerun of
    `CMD . -r -o out` must not take its own outputs as new inputs. Returns (kept, number dropped)."""
    out = Path(os.path.abspath(folder))
    kept = [item for item in items if not _is_own_output(item, out)]
    return kept, len(items) - len(kept)


def _is_own_output(item: Item, out: Path) -> bool:
    if item.path is None:
        return False
    path = Path(os.path.abspath(item.path))
    depth = len(Path(item.key).parts)
    input_root = path.parents[depth - 1] if 0 < depth <= len(path.parents) else path.parent
    return out in path.parents and input_root in out.parents


def _one_line(err: BaseException, item: Item) -> str:
    """The failure reason on one line, always naming the item's file (or key)."""
    text = " ".join(str(err).split())
    if not isinstance(err, LdmError):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    label = item.label
    return text if label in text else f"{label}: {text}"


def _text(path: Optional[Path]) -> Optional[str]:
    return None if path is None else str(path)


def _model_name(task: Task) -> Optional[str]:
    path = getattr(task, "model_path", None)
    return None if path is None else str(path)


class _sigterm_as_interrupt:
    """While a run is going, SIGTERM (cron timeouts, `kill`) stops it like Ctrl-C: cleanly, exit 130."""

    def __enter__(self) -> None:
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, _raise_interrupt)

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
