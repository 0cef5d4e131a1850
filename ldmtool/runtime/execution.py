"""Per-job execution, the same for every engine: load → run → write → record → report.

`JobRunner` opens a task once, then takes planned jobs in batches of `--batch-size`: loads each item, runs
the batch (a batch that fails is rerun item by item to find the bad one), writes each output atomically
with its metadata and recipe, appends the done/failed record to the manifest and reports the event. An
item that fails is one line naming its file; the run goes on unless `--fail-fast`. Before each item starts
and before each output is written, the model and add-on files the run loaded are checked (runtime/watch.py):
one changed in place fails the item and stops the run (exit 3), nothing written for it. The local engine
(runtime/runner.py) and each Ray worker (runtime/ray_engine.py) run their jobs through it.
"""
from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Protocol

import numpy as np

from ldmtool.errors import FatalError, ItemError, LdmError
from ldmtool.io.discover import Item
from ldmtool.io.metadata import build_metadata
from ldmtool.io.writer import KEEP, format_name, write_image
from ldmtool.runtime import identity
from ldmtool.runtime.allocator import keep_freed_memory
from ldmtool.runtime.claims import Claims
from ldmtool.runtime.jobs import Job, Output, RunOptions, Task
from ldmtool.runtime.report import ItemEvent, Status, Summary
from ldmtool.runtime.resume import Recipes, storable
from ldmtool.runtime.shard import strip_scheduling
from ldmtool.runtime.watch import FileWatch, ModelFileChanged

if TYPE_CHECKING:
    import torch

    from ldmtool.runtime.device import PrecisionChoice

DEBUG_ENV = "LDMTOOL_DEBUG"


class Records(Protocol):
    """Where done/failed records go: the manifest, or a Ray worker's collector."""

    def append(self, record: dict[str, Any]) -> None: ...


class Events(Protocol):
    """Where per-item events go: the reporter, or a Ray worker's collector."""

    def item(self, event: ItemEvent) -> None: ...
    def steps(self, done: int, total: int, label: str = "steps") -> None: ...
    def note(self, message: str) -> None: ...


def recipes_for(task: Task, options: RunOptions, output_suffix: str) -> Recipes:
    """The identity of a run's jobs (runtime/identity.py): command, model sha256, pixel options."""
    own = {name: value for name, value in options.cli.items() if name not in getattr(task, "item_options", ())}
    pixels = {**identity.pixel_options(own, Path("x" + output_suffix)), **auto_precision(task), **addon_files(task)}
    same_job = same_precision_written_otherwise(task, pixels)
    lossy: dict[str, Any] = {}
    if options.fmt and format_name(options.fmt) == KEEP and "quality" in pixels:
        # --format keep: --quality counts for each JPEG or WebP output, not for the run (nor its PNGs); the
        # run's id as it was before, with it, stays this job's
        lossy = {"quality": pixels.pop("quality")}
        same_job = (*same_job, {**pixels, **lossy})
    same_job = (*same_job, *identity.recorded_otherwise(own, (pixels, *same_job)))  # folders of older versions
    defaults: Mapping[str, Any] = getattr(task, "option_defaults", dict)()  # `--width 64` where 64 is the model's: the same job
    return Recipes(task.command, model_sha256(task), pixels, identity.recorded_options(options.cli), same_job, lossy,
                   getattr(task, "item_addon_files", None),
                   identity.jsonable({name: value for name, value in defaults.items() if name in pixels}))


def addon_files(task: Task) -> dict[str, Any]:
    """The contents (sha256) of the run's `--lora` (and the LoRAs its run-wide prompt's tags name), `--vae`,
    `--refiner` and `--embeddings-dir` files, beside their paths in the options."""
    engine = getattr(task, "engine", None)
    if engine is None or not hasattr(engine, "addons"):
        return {}
    from ldmtool.addons.apply import ModelAddons
    from ldmtool.runtime.cache import file_sha256

    # before open() the engine has no networks yet: the prompt's tags are resolved here
    networks = task.prompt_networks() if hasattr(task, "prompt_networks") else engine.networks
    files = ModelAddons.of(engine.choice, networks).job_identity()
    control = getattr(task, "control", None)
    if control:  # --controlnet files and hints (pipelines/control.py)
        files.update(control.job_identity())
    refiner = getattr(task, "refiner", None)
    if refiner is not None:
        from ldmtool.checkpoints.api import resolve_source

        files["refiner_sha256"] = file_sha256(resolve_source(refiner.choice.model)[0])
    used_embeddings, prompt_texts = getattr(task, "used_embeddings", None), getattr(task, "prompt_texts", None)
    if getattr(engine.choice, "embeddings_dir", None) is not None and used_embeddings and prompt_texts:
        # only those the run-wide prompts name: another file in the folder is not another job (txt2img's
        # items hold their own prompts' in item_addon_files)
        files["embeddings_sha256"] = used_embeddings(prompt_texts())
    return files


def task_device(task: Task) -> "torch.device":
    """The device the task's networks run on (the CPU for tasks without an engine)."""
    from ldmtool.runtime.device import choose_device

    choice = getattr(getattr(task, "engine", None), "choice", None)
    return choose_device(getattr(choice, "device", None) or "auto") if choice is not None else choose_device("cpu")


def auto_precision(task: Task) -> dict[str, str]:
    """`{"auto_precision": name}` when `--precision auto` picks a dtype other than it always did (fp32 on a
    CPU, fp16 on a GPU): bf16 on a CPU with native bf16. Outputs of the same job from a machine without it (or
    from versions before the choice looked at the CPU) then differ in identity, as their pixels do."""
    choice = getattr(getattr(task, "engine", None), "choice", None)
    if choice is None or (choice.precision or "auto").lower() != "auto":
        return {}
    from ldmtool.runtime.device import choose_device, resolve_precision

    device = choose_device(choice.device)
    return _as_auto_records(resolve_precision("auto", device), device)


def _as_auto_records(resolved: "PrecisionChoice", device: "torch.device") -> dict[str, str]:
    """What an identity records beside `--precision auto` that chose `resolved`: nothing for the device's old
    default (fp32 on a CPU, fp16 on a GPU), else the choice."""
    from ldmtool.runtime.device import legacy_auto_dtype

    return {} if resolved.dtype == legacy_auto_dtype(device) else {"auto_precision": resolved.name}


def same_precision_written_otherwise(task: Task, pixels: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """The run's pixel options with `--precision` written the other way, which computes alike: `auto` as the
    precision it chooses here; an explicit one as `auto` would record it on a machine where auto chooses it
    (bf16 on a CPU with native bf16; the device's old default, fp32 on a CPU, as plain `auto`)."""
    choice = getattr(getattr(task, "engine", None), "choice", None)
    if choice is None or "precision" not in pixels:
        return ()
    from ldmtool.runtime.device import choose_device, resolve_precision

    device = choose_device(choice.device)
    others = {name: value for name, value in pixels.items() if name not in ("precision", "auto_precision")}
    asked = str(pixels["precision"]).lower()
    if asked == "auto":
        return ({**others, "precision": resolve_precision("auto", device).name},)
    return ({**others, "precision": "auto", **_as_auto_records(resolve_precision(asked, device), device)},)


def output_suffix(target: Optional[Path], is_file: bool, fmt: Optional[str]) -> str:
    """The run's output extension for its identity (`--quality` counts for lossy formats; with --format keep
    an output may be a JPEG, so it counts)."""
    if is_file and target is not None:
        return target.suffix
    kind = format_name(fmt) if fmt else "png"
    return ".jpg" if kind == KEEP else "." + kind


def _model_file(task: Task) -> Optional[Path]:
    model_file = task.model_file() if hasattr(task, "model_file") else getattr(task, "model_path", None)
    return Path(model_file) if model_file is not None and Path(model_file).is_file() else None


def model_sha256(task: Task) -> Optional[str]:
    model_file = _model_file(task)
    if model_file is None:
        return None
    from ldmtool.runtime.cache import file_sha256

    return file_sha256(model_file)


def model_hash_note(task: Task, recorded: Optional[str]) -> dict[str, str]:
    """`{"model_sha256_source": ...}` for the recipe: how the recorded model hash was obtained ("computed"
    from the bytes, or "cache": a disk index entry whose device, inode, size, mtime and ctime match the
    file), or "unverified" when the file here no longer has that hash (changed, or absent on this worker)."""
    if recorded is None:
        return {}
    from ldmtool.runtime.cache import file_hash

    model_file = _model_file(task)
    if model_file is None:
        return {"model_sha256_source": "unverified"}
    digest, source = file_hash(model_file)  # remembered from recipes_for in this process: no second read
    return {"model_sha256_source": source if digest == recorded else "unverified"}


class JobRunner:
    """Runs planned jobs of one task; `summary` counts what it reported."""

    def __init__(self, task: Task, options: RunOptions, recipes: Recipes, *, base_seed: Optional[int],
                 events: Events, records: Optional[Records], summary: Optional[Summary] = None,
                 watch: Optional[FileWatch] = None):
        self.task = task
        self.watch = watch or FileWatch()  # the model and add-on files the run computes from (runtime/watch.py)
        self.options = options
        self.recipes = recipes
        self.base_seed = base_seed
        self.events = events
        self.records = records
        self.summary = summary or Summary(base_seed=base_seed)
        self.stopped = False
        argv = strip_scheduling(options.argv if options.argv is not None else sys.argv)
        self._recipe_argv = [storable(arg) for arg in argv]  # a name that is not UTF-8 shown escaped
        self._hash_note = model_hash_note(task, recipes.model_sha256)
        self._machine: Optional[dict[str, Any]] = None  # once the task is open (its device chosen)
        self.claims = Claims()
        self._keeps_format = options.fmt is not None and format_name(options.fmt) == KEEP  # grey stays grey

    def open(self) -> None:
        """Open the task (load its model), its sampler steps reported with the events; an unexpected error is
        fatal in one line."""
        keep_freed_memory()  # before the model's weights and the first step's activations are allocated
        try:
            self.task.start(self.events)
        except LdmError:
            raise
        except Exception as err:  # a model that cannot start: no item can run
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            reason = " ".join(str(err).split()) or type(err).__name__
            raise FatalError(f"{self.task.command}: cannot start ({type(err).__name__}: {reason}); "
                             f"set {DEBUG_ENV}=1 for the full traceback") from err

    def process(self, jobs: Iterable[Job]) -> None:
        batch: list[Job] = []
        try:
            for job in jobs:
                if self.stopped:
                    return
                if not self._claim(job):
                    continue
                if not self._load(job):
                    self._release(job)
                    continue
                batch.append(job)
                if len(batch) == self.options.batch_size:
                    self._run_and_release(batch)
                    batch = []
            if batch and not self.stopped:
                self._run_and_release(batch)
        finally:
            for job in batch:
                self._release(job)

    def close(self) -> None:
        """Give up every claim still held (an interrupted or failed run), and the watch on the model files."""
        self.claims.close()
        self.watch.close()

    # -- outcomes

    def fail(self, job: Job, err: BaseException, seconds: float, *, record: bool = True) -> None:
        if os.environ.get(DEBUG_ENV) == "1" and not isinstance(err, LdmError):
            raise err  # developers: see where an unexpected error came from
        reason = one_line(err, job.item)
        if record:
            self._record(job, Status.FAILED, seconds, reason, {})
        self.report(job, Status.FAILED, seconds, reason)
        if self.options.fail_fast:
            self.stopped = True

    def report(self, job: Job, status: Status, seconds: float = 0.0, error: Optional[str] = None,
               reason: Optional[str] = None) -> None:
        event = ItemEvent(status=status, key=job.item.key, input=_text(job.item.path), output=str(job.output),
                          seed=job.seed, seconds=seconds, error=error, reason=reason)
        self.summary.add(event)
        self.events.item(event)

    # -- claims (runtime/claims.py): another run on the same folder may hold or have written this item

    def _claim(self, job: Job) -> bool:
        """Claim the job's output; False (the item reported) when another run has it or has written it."""
        holder = self.claims.acquire(job.output.parent, job.output.name)
        if holder is not None:
            who = f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}" if holder else "starting"
            self.report(job, Status.SKIPPED, reason=f"another run is writing it ({who})")
            return False
        written_since = self._written_meanwhile(job)
        if written_since is None:
            return True
        self._release(job)
        if written_since:
            self.fail(job, ItemError(written_since), 0.0)
        else:
            self.report(job, Status.SKIPPED, reason="another run wrote it while this run was going")
        return False

    def _written_meanwhile(self, job: Job) -> Optional[str]:
        """None when the job is still to run; "" when a run that overlapped this one wrote it; else why the
        output now in the way is another job's. Only an output that changed since the runner planned the
        job counts: the runner already judged what was there then."""
        if file_signature(job.output) == job.planned_output:
            return None
        if self.options.existing == "overwrite":
            return ""
        return self.recipes.existing_output(job.output, job.item, job.seed, "check")

    def _release(self, job: Job) -> None:
        self.claims.release(job.output.parent, job.output.name)

    # -- the steps

    def _run_and_release(self, batch: list[Job]) -> None:
        try:
            self._run_batch(batch)
        finally:
            for job in batch:
                job.payload = None  # a long run must not keep every loaded image alive
                self._release(job)

    def _unchanged(self, job: Job, seconds: float) -> None:
        """Fail the job and stop the run (ModelFileChanged, exit 3) when a model or add-on file it computes from
        changed under the run: nothing may be written with a recipe naming the file it had."""
        try:
            self.watch.check()
        except ModelFileChanged as err:
            self.fail(job, err, seconds)
            raise

    def _load(self, job: Job) -> bool:
        self._unchanged(job, 0.0)
        started = time.monotonic()
        try:
            job.payload = self.task.load(job)
            job.load_seconds = time.monotonic() - started
            return True
        except FatalError:
            raise
        except Exception as err:
            self.fail(job, err, time.monotonic() - started)
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
            self.fail(jobs[0], err, time.monotonic() - started)
            return
        share = (time.monotonic() - started) / len(jobs)
        for job, result in zip(jobs, results):
            if self.stopped:
                return
            if isinstance(result, Exception):
                self.fail(job, result, share)
            else:
                self._write(job, result, share)

    def _machine_record(self) -> dict[str, Any]:
        if self._machine is None:
            from ldmtool.runtime.device import machine_record

            self._machine = machine_record(task_device(self.task))
        return self._machine

    def _write(self, job: Job, output: Output, seconds: float) -> None:
        started = time.monotonic()
        if not self.claims.still_mine(job.output.parent, job.output.name):
            self.report(job, Status.SKIPPED, seconds, reason="this run's claim went stale (no heartbeat for "
                        f"{self.claims.timeout:g}s) and another run took the item over")
            return
        self._unchanged(job, seconds)
        try:
            image = np.asarray(output.image)
            metadata = build_metadata(
                command=self.task.command, params={**self.task.params, **output.params}, seed=job.seed,
                base_seed=self.base_seed, key=storable(job.item.key), argv=self._recipe_argv,
                size=(image.shape[1], image.shape[0]), model=_model_name(self.task),
                model_sha256=self.recipes.model_sha256, extra={**self.recipes.recipe_extras(job.item, job.seed, job.output), **self._hash_note,
                       "machine": self._machine_record()},
            )
            write_image(job.output, image, alpha=output.alpha, quality=self.options.quality, metadata=metadata,
                        source=output.source, bit_depth=output.bit_depth,
                        grey=output.source is not None and output.source.grey and self._keeps_format)
        except FatalError as err:
            self.fail(job, err, seconds, record=False)
            raise
        except Exception as err:
            self.fail(job, err, seconds + job.load_seconds + time.monotonic() - started)
            return
        total = seconds + job.load_seconds + time.monotonic() - started
        self._record(job, Status.DONE, total, None, output.params)
        self.report(job, Status.DONE, total)

    def _record(self, job: Job, status: Status, seconds: float, error: Optional[str], extra: Mapping[str, Any]) -> None:
        if self.records is None:
            return
        record = {
            "status": status.value, "key": job.item.key, "input": _text(job.item.path), "mask": _text(job.item.mask),
            "output": str(job.output), "seed": job.seed, "base_seed": self.base_seed,
            "seconds": round(seconds, 3), "command": self.task.command, "params": {**self.task.params, **extra},
            "model_sha256": self.recipes.model_sha256, "run_id": self.recipes.run_id,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if error is not None:
            record["error"] = error
        self.records.append(record)


def file_signature(path: Path) -> Optional[tuple[int, int, int, int]]:
    """What tells one version of a file from another (None: no file): device, inode, size, mtime_ns."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def one_line(err: BaseException, item: Item) -> str:
    """The failure reason on one line, always naming the item's file (or key) once, as `shown` writes it (the
    readers' own messages name it so)."""
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
