"""The batch runner every task command goes through (DESIGN.md §1, §6).

    summary = run_task(Upscale(params={...}, model_path=path), discovery, RunOptions(output=...))

(the Task contract: runtime/jobs.py).

The runner chooses the run's base seed (`--seed`, else the seed of an earlier run of the same job recorded
in the output folder, else random), gives every item its seed (runtime/seeds.py), plans output paths, and
resumes: an existing output is skipped only when its recipe says this job wrote it (`--existing check`,
the default; runtime/identity.py), kept whatever wrote it (`skip`) or replaced (`overwrite`); an empty or
undecodable one is redone. The pending jobs go to an engine (`ENGINES`: here, or a Ray cluster), which
runs them through runtime/execution.py: load, run in batches of `batch_size`, write atomically with
metadata, record in the manifest, report; an item that fails does not stop the others (unless
`fail_fast`), nor does one whose output the run plan finds too large (runtime/plan.py: it fails unrun). Ctrl-C or SIGTERM become `Interrupted` (exit 130) with no partial file. The returned `Summary.exit_code` is 0 when
every item was done or skipped and 1 when some failed; fatal problems raise FatalError (exit 3), among them a
model or add-on file that changed under the run (runtime/watch.py).
"""
from __future__ import annotations

import fnmatch
import itertools
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

from ldmtool.errors import FatalError, Interrupted, ItemError, LdmError, UsageError
from ldmtool.io.discover import Discovery, Item
from ldmtool.io.files import file_in_the_way
from ldmtool.io.gallery import GALLERY_NAME, GalleryUpdater
from ldmtool.io.manifest import MANIFEST_NAME, MANIFEST_PATTERN, Manifest
from ldmtool.io.outputs import (
    DEFAULT_TEMPLATE,
    OutputSpec,
    check_template,
    format_notes,
    names_apart,
    output_path,
    plan_outputs,
)
from ldmtool.io.writer import KEEP, folder_names, remove_stale_temps, remove_stale_temps_in
from ldmtool.runtime.execution import DEBUG_ENV, JobRunner, file_signature, output_suffix, recipes_for
from ldmtool.runtime.jobs import EXISTING_POLICIES, BaseTask, Job, Output, PlannedJobs, RunOptions, Task
from ldmtool.runtime.plan import RunPlan, check_run, too_large, unwritable
from ldmtool.runtime.report import ItemEvent, Reporter, Status, Summary
from ldmtool.runtime.resume import current_replay
from ldmtool.runtime.seeds import RANDOM, item_seed, random_seed
from ldmtool.runtime.shard import Shard, select, write_members
from ldmtool.runtime.watch import FileWatch

__all__ = ["BaseTask", "DEBUG_ENV", "ENGINES", "Job", "Output", "RunOptions", "Task", "run_task"]


def _run_here(run: "BatchRun", jobs: Iterable[Job]) -> None:
    run.runner.open()
    run.plan = check_run(run.task, run.plan_source or jobs, run.options)  # sizes, time: the model is open
    run.reporter.plan(run.plan)
    run.runner.process(run.runnable(jobs))


def _run_on_ray(run: "BatchRun", jobs: list[Job]) -> None:
    from ldmtool.runtime.ray_engine import process_on_ray

    run.plan = check_run(run.task, jobs, run.options)
    run.reporter.plan(run.plan)
    runnable = list(run.runnable(jobs))
    if runnable:
        process_on_ray(run, runnable)


# How pending jobs run: every engine ends in runtime/execution.py's JobRunner.
ENGINES: dict[str, Callable[["BatchRun", list[Job]], None]] = {"local": _run_here, "ray": _run_on_ray}


def run_task(
    task: Task,
    source: Union[Discovery, Sequence[Item]],
    options: RunOptions,
    *,
    reporter: Optional[Reporter] = None,
) -> Summary:
    """Run `task` over every item; see the module docstring for the rules. With `options.sweep`, once per
    cell of the sweep (runtime/sweep.py)."""
    if options.sweep and current_replay() is None:
        from ldmtool.runtime.sweep import run_sweep

        return run_sweep(task, options, lambda cell_task, cell_options: run_task(cell_task, source, cell_options,
                                                                                  reporter=reporter))
    replay = current_replay()
    if replay is not None:
        source = [replay.item]
        options = replace(options, output=replay.output, item_seed=replay.seed, existing="overwrite", shard=None,
                          engine="local", write_manifest=False, name_template=DEFAULT_TEMPLATE, suffix=None,
                          fmt=KEEP if (options.fmt or "").lower() == KEEP else None)  # keep: a grey output replays grey
    discovery = source if isinstance(source, Discovery) else Discovery(source if _lazy(source) else list(source))
    if not discovery.items:
        raise UsageError("nothing to do: no items to process")
    if options.batch_size < 1:
        raise UsageError(f"--batch-size {options.batch_size}: must be at least 1")
    if options.existing not in EXISTING_POLICIES:
        raise UsageError(f"--existing {options.existing!r}: use {', '.join(EXISTING_POLICIES)}")
    if options.engine not in ENGINES:
        raise UsageError(f"--engine {options.engine!r} is not an engine (use {' or '.join(ENGINES)})")
    if options.shard is not None and options.seed in (None, RANDOM) and options.item_seed is None:
        raise UsageError(f"--shard {options.shard} needs --seed N, so that every shard derives the same per-item seeds")
    reporter = reporter or Reporter(json_events=options.json_events, quiet=options.quiet)
    run = BatchRun(task, options, reporter)
    with _sigterm_as_interrupt():
        try:
            try:
                return run.execute(discovery.items, notes=discovery.notes())
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted after {run.summary.done} item(s) were written; "
                                  "run the same command again to resume") from None
        except LdmError as err:
            run.summary.seconds = time.monotonic() - run.started
            reporter.finish_with_error(run.summary, err.exit_code, " ".join(str(err).split()))
            raise
        finally:
            if run.gallery is not None:
                run.gallery.finish()
            run.runner.close()  # claims first: the folder may hold nothing else
            run.remove_created_folder()
            reporter.close()


class BatchRun:
    """One run: its seed, its planned jobs, what resume keeps, and the engine that runs the rest."""

    def __init__(self, task: Task, options: RunOptions, reporter: Reporter):
        self.task = task
        self.options = options
        self.reporter = reporter
        self.spec = OutputSpec(options.output, options.name_template, options.fmt, options.suffix)
        self.base_seed = options.seed if options.seed not in (None, RANDOM) else None  # chosen in execute()
        watch = FileWatch()  # before the identity hashes the model: it must be the file the run loads
        self.recipes = recipes_for(task, options, output_suffix(options.output, self.spec.is_file, options.fmt))
        self.manifest: Optional[Manifest] = None
        self.gallery: Optional[GalleryUpdater] = None
        self.summary = Summary(base_seed=self.base_seed)
        self.started = time.monotonic()
        self.plan_source: Optional[Sequence[Job]] = None  # what the plan covers when the jobs are streamed
        self.plan: Optional[RunPlan] = None  # the latest plan: the sizes it refused fail their items
        self.created: list[Path] = []  # folders this run made for its outputs, deepest first
        self.listing: Optional[list[str]] = None  # the output folder's entries, listed once at the start
        self.runner = JobRunner(task, options, self.recipes, base_seed=self.base_seed, events=reporter,
                                records=None, summary=self.summary, watch=watch)

    def execute(self, items: Sequence[Item], notes: Sequence[str] = ()) -> Summary:
        items, outputs_as_inputs = (items, 0) if self.spec.is_file else _outside(items, self.spec.folder)
        if outputs_as_inputs:
            notes = [*notes, f"ignored {outputs_as_inputs} input(s) inside the output folder {self.spec.folder}"]
        if not items:
            raise UsageError(f"every input is inside the output folder {self.spec.folder}; choose another -o")
        notes = [*notes, *format_notes(items, self.spec)]
        self.task.validate()  # run-wide settings: a usage error before the folder is made or any item runs
        if self.options.dry_run:
            return self._dry_run(items, notes)
        self._prepare_folder()
        if self.base_seed is None:
            self.base_seed = self.recipes.adopted_seed(self.spec, self.runner.claims, self._manifests())
            self.summary.base_seed = self.runner.base_seed = self.base_seed
        items, notes = self._without_own_outputs(items, notes)
        jobs = self._plan(items)  # before sharding, so {index} and seeds match an unsharded run
        if self.options.shard is not None:
            jobs = select(jobs, self.options.shard, key=lambda job: job.item.key)
        self.plan = check_run(self.task, jobs, self.options)  # outputs too large for the limit or the memory
        listings: dict[Path, list[str]] = {} if self.listing is None else {self.spec.folder: self.listing}
        streamed = _lazy(jobs) and self.options.engine == "local"  # 10^8 samples: never a list of jobs
        if streamed:
            remove_stale_temps_in([self.spec.folder], listings)
        else:
            page = [self.spec.folder / GALLERY_NAME]  # the gallery's, should a killed run have left one
            remove_stale_temps(itertools.chain((job.output for job in jobs), page), listings)
        self.runner.claims.remove_stale(listings)
        if self.options.shard is not None and not self.spec.is_file:
            write_members(self.spec.folder, self.options.shard, [job.item.key for job in jobs])
        for note in notes:
            self.reporter.note(note)
        self.reporter.start(len(jobs), label=self.task.command)
        if streamed:
            self.plan_source = jobs  # the plan covers every job; the pending ones come one by one
            stream = self._pending(jobs)
            first = next(stream, None)
            if first is not None and not self.runner.stopped:
                _run_here(self, itertools.chain([first], stream))
        else:
            pending = self._resume(jobs)
            if pending:
                ENGINES[self.options.engine](self, pending)
        self.summary.seconds = time.monotonic() - self.started
        self.reporter.finish(self.summary, final=not self.options.sweep_cell)
        return self.summary

    def _dry_run(self, items: Sequence[Item], notes: Sequence[str]) -> Summary:
        """`--dry-run`: each item's output and what a run would do with it (run, skip, fail, and why), and the
        run plan, refusals included; no model is loaded, no claim taken, nothing written."""
        if self.base_seed is None:
            self.base_seed = self.recipes.earlier_seed(self.spec, self._manifests())
            if self.base_seed is None:
                self.base_seed = random_seed()
                notes = [*notes, f"no earlier run of this job in {self.spec.folder}: a run would take a random "
                         f"seed; shown with seed {self.base_seed}"]
            self.summary.base_seed = self.runner.base_seed = self.base_seed
        items, notes = self._without_own_outputs(items, notes)
        jobs = self._plan(items)
        if self.options.shard is not None:
            jobs = select(jobs, self.options.shard, key=lambda job: job.item.key)
        plan = self.plan = check_run(self.task, jobs, self.options)
        for note in notes:
            self.reporter.note(note)
        counts = {"run": 0, "skip": 0, "fail": 0}
        for job in jobs:
            conflict = self._conflict(job)
            action = "run" if conflict is None else ("skip" if conflict == "" else "fail")
            reason = {"run": None, "skip": "this job's output is there"}.get(action, conflict)
            counts[action] += 1
            self.reporter.dry_run_item(action, key=job.item.key, input=job.item.path, output=job.output,
                                       seed=job.seed, reason=reason)
        self.reporter.dry_run_finish(plan, counts, self.base_seed, final=not self.options.sweep_cell)
        self.summary.dry_run = counts
        return self.summary

    def _without_own_outputs(self, items: Sequence[Item], notes: Sequence[str]) -> tuple[Sequence[Item], list[str]]:
        """Drop inputs that are ldmtool outputs this run would write for other inputs: with `-o` naming an input
        folder (and --suffix, --name or --format keeping the names apart) a rerun finds the last run's outputs
        among its inputs, and must skip their jobs rather than run on its own outputs. A file without an
        ldmtool recipe at such a name stays an input (and `_plan` refuses to write over it)."""
        if _lazy(items) or self.spec.is_file:
            return items, list(notes)
        out = Path(os.path.realpath(self.spec.folder))
        if not any(item.path is not None and out in _real(item.path).parents for item in items):
            return items, list(notes)  # no input in the output folder (the usual run): nothing to plan twice
        check_template(self.spec.template)
        writers: dict[Path, set[int]] = {}
        for index, item in enumerate(items):
            writers.setdefault(_real(output_path(self.spec, item, index, self._seed_of(item))), set()).add(index)
        kept = [item for index, item in enumerate(items)
                if item.path is None or not writers.get(_real(item.path), set()) - {index}
                or not _written_by_ldmtool(item.path)]
        if len(kept) == len(items):
            return items, list(notes)
        return kept, [*notes, f"ignored {len(items) - len(kept)} input(s) that are this run's outputs of other "
                              f"inputs in {self.spec.folder}"]

    def _plan(self, items: Sequence[Item]) -> Sequence[Job]:
        if _lazy(items) and not self.spec.is_file and names_apart(self.spec.template):
            check_template(self.spec.template)  # generated items: jobs made as they are asked for
            return PlannedJobs(items, self._seed_of, lambda item, index, seed: output_path(self.spec, item, index, seed))
        seeds = [self._seed_of(item) for item in items]
        paths = plan_outputs(items, seeds, self.spec)
        inputs = {_real(source): source for item in items for source in (item.path, item.mask) if source is not None}
        for item, path in zip(items, paths):
            _check_not_an_input(item, path, inputs)
        return [Job(item, index, seed, path) for index, (item, seed, path) in enumerate(zip(items, seeds, paths))]

    def _seed_of(self, item: Item) -> int:
        if self.options.item_seed is not None:
            return self.options.item_seed
        assert self.base_seed is not None  # chosen before planning
        return item_seed(self.base_seed, key=item.key, offset=item.seed_offset, own=item.seed)

    def _prepare_folder(self) -> None:
        folder = self.spec.folder
        self.created = _missing_folders(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            reason = file_in_the_way(folder) or err.strerror or str(err)
            raise FatalError(f"{folder}: cannot create the output folder ({reason})") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise FatalError(f"{folder}: the output folder is not writable")
        if not self.spec.is_file:  # listed once: its manifests now, its stale temporary files and claims later
            self.listing = folder_names(folder)
        if self.options.write_manifest and not self.spec.is_file:
            shard = self.options.shard
            self.manifest = Manifest(folder / (shard.manifest_name if shard else MANIFEST_NAME))
            self.runner.records = self.manifest
            if self.options.gallery:  # rebuilt from the manifest as items finish, and at the end (run_task)
                parts = [Shard(k, shard.count).manifest_name for k in range(1, shard.count + 1)] \
                    if shard and shard.count <= 256 else [self.manifest.path.name]  # every run's, unlisted
                names = list(dict.fromkeys([MANIFEST_NAME, *parts, *self._manifests()]))  # other runs' parts too
                self.gallery = GalleryUpdater(folder, self.reporter.note, manifests=names)
                self.manifest.listeners.append(self.gallery.recorded)

    def _manifests(self) -> list[str]:
        """The names of the manifests in the output folder (its own and every shard's part), from the run's
        one listing of it (or a fresh one for a dry run, which makes no folder)."""
        if self.spec.is_file:
            return []
        listing = self.listing if self.listing is not None else folder_names(self.spec.folder)
        return sorted(name for name in listing or () if fnmatch.fnmatchcase(name, MANIFEST_PATTERN))

    def remove_created_folder(self) -> None:
        """However the run ended, leave no empty output folder behind: the folders it made (the output folder
        and any missing parents) are removed while empty. A folder that was there before is never removed."""
        for folder in self.created:
            try:
                folder.rmdir()  # only ever removes an empty folder
            except OSError:
                return  # not empty (or gone): its parents are not empty either

    def _resume(self, jobs: Sequence[Job]) -> list[Job]:
        """The jobs still to run; the others are reported skipped (this job's output is there) or failed
        (another job's output is in the way)."""
        pending = list(self._pending(jobs))
        return [] if self.runner.stopped else pending

    def _pending(self, jobs: Iterable[Job]) -> Iterator[Job]:
        """The jobs still to run, one at a time (see `_resume`); one whose output is too large or its format
        cannot hold fails here, before anything is computed."""
        for job in jobs:
            job.planned_output = file_signature(job.output)
            conflict = self._conflict(job)
            if conflict is None:
                yield job
            elif conflict == "":
                self._beside_done(job)
                self.runner.report(job, Status.SKIPPED)
            elif not self.runner.stopped:
                self.runner.fail(job, ItemError(conflict), 0.0)

    def _conflict(self, job: Job) -> Optional[str]:
        """What keeps a job from running: "" when this job's output is there (skip), else why it fails (its
        output too large, its format cannot hold it, another job's output in the way); None: it runs."""
        conflict = unwritable(self.task, job) or \
            self.recipes.existing_output(job.output, job.item, job.seed, self.options.existing)
        return too_large(self.plan, self.task, job) if conflict is None else conflict  # one there is skipped

    def runnable(self, jobs: Iterable[Job]) -> Iterator[Job]:
        """`jobs` less those the plan made once the model is open refuses (its real weights): they fail."""
        for job in jobs:
            reason = too_large(self.plan, self.task, job)
            if reason is None:
                yield job
            elif not self.runner.stopped:
                self.runner.fail(job, ItemError(reason), 0.0)

    def _beside_done(self, job: Job) -> None:
        """The files a task writes beside an output that an earlier run wrote without them (layout2img
        --draw-boxes: the box preview); one that cannot be written is a note, the output being done."""
        write = getattr(self.task, "beside_done", None)
        if write is None:
            return
        try:
            write(job)
        except (LdmError, OSError) as err:
            self.reporter.note(f"{job.item.label}: {getattr(err, 'strerror', None) or err}")

    def absorb(self, records: Sequence[dict[str, Any]], events: Sequence[ItemEvent]) -> None:
        """Take in what another engine's worker recorded and reported for its items."""
        for record in records:
            if self.manifest is not None:
                self.manifest.append(record)
        for event in events:
            self.summary.add(event)
            self.reporter.item(event)


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first (what `mkdir -p` would make)."""
    missing = []
    path = Path(os.path.abspath(folder))
    while not path.exists() and not path.is_symlink() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _check_not_an_input(item: Item, output: Path, inputs: dict[Path, Path]) -> None:
    """An output may never replace an input of the run (`-o` naming the input folder, however spelled:
    through a symbolic link too, or an input file)."""
    source = inputs.get(_real(output))
    if source is None:
        return
    if source in (item.path, item.mask):
        raise UsageError(f"{source}: its output would replace the input itself; choose another -o")
    raise UsageError(f"{item.label}: its output {output} would replace the input {source}; choose another -o, "
                     "--suffix or --name")


def _written_by_ldmtool(path: Path) -> bool:
    """Whether an image file holds an ldmtool recipe (an output of some ldmtool run)."""
    from ldmtool.io.metadata import read_metadata

    try:
        metadata = read_metadata(path)
    except (LdmError, OSError):
        return False
    return metadata is not None and bool(metadata.recipe)


def _real(path: "os.PathLike[str] | str") -> Path:
    """The path with its folders' symbolic links resolved; the file name itself is kept (an input that is a
    link to a file elsewhere is still found where it is listed)."""
    path = Path(path)
    return Path(os.path.realpath(path.parent)) / path.name


def _lazy(items: Sequence[Any]) -> bool:
    """Generated items made on demand (io.discover.GeneratedItems: none has an input file), or their jobs
    (jobs.PlannedJobs)."""
    return bool(getattr(items, "lazy", False))


def _outside(items: Sequence[Item], folder: Path) -> tuple[Sequence[Item], int]:
    """Drop inputs found inside an output folder that lies within their input tree: a rerun of
    `CMD . -r -o out` must not take its own outputs as new inputs. Returns (kept, number dropped)."""
    if _lazy(items):
        return items, 0
    out = Path(os.path.realpath(folder))
    kept = [item for item in items if not _is_own_output(item, out)]
    return kept, len(items) - len(kept)


def _is_own_output(item: Item, out: Path) -> bool:
    if item.path is None:
        return False
    path = _real(item.path)
    depth = len(Path(item.key).parts)
    input_root = path.parents[depth - 1] if 0 < depth <= len(path.parents) else path.parent
    return out in path.parents and input_root in out.parents


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
