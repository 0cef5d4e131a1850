"""`--engine ray`: the same batch run, with its items spread over a Ray cluster through Ray Data.

The driver plans the run exactly as the local engine does (items, per-item seeds, output paths, resume),
then sends the pending jobs through `Dataset.map_batches` to a pool of actors. Each actor opens the task
once (so the model is loaded once per actor, through the process-wide model cache) and processes its
batches with the local engine's own code: the same loader, the same atomic writer, the same metadata. It
hands back, per job, the manifest record and progress event that the local engine would have written;
the driver appends them to the manifest and reports them. The same seeds give the same bytes.

A worker that dies is restarted and its unfinished batch retried (writes are atomic, so a retried item
is simply written again); an item that fails is reported exactly as locally. `--fail-fast` stops each
worker at its first failure rather than the whole cluster at once.

Ray's own chatter (deprecation warnings, Ray Data's INFO lines, the core worker's log) stays off stderr,
which is ldmtool's: only Ray's fatal messages get through, unless `LDMTOOL_DEBUG=1`.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Optional

from ldmtool.errors import FatalError, LdmError, UsageError

if TYPE_CHECKING:
    from types import ModuleType

    import numpy as np
    from ray.data import Dataset

    from ldmtool.runtime.jobs import Job, RunOptions
    from ldmtool.runtime.runner import BatchRun

# Restart dead actors and retry their batches without limit; Ray gives up only on driver loss.
_RETRIES: dict[str, Any] = {"max_restarts": -1, "max_task_retries": -1}


class Collector:
    """Stands in for the manifest and the reporter inside a worker: keeps what they would be given."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.events: list[Any] = []

    def append(self, record: dict[str, Any]) -> None:  # the Manifest interface
        self.records.append(record)

    def item(self, event: Any) -> None:  # the Reporter interface from here on
        self.events.append(event)

    def steps(self, done: int, total: int, label: str = "steps") -> None:
        return None

    def note(self, message: str) -> None:
        return None

    def take(self) -> tuple[list[dict[str, Any]], list[Any]]:
        out = (self.records, self.events)
        self.records, self.events = [], []
        return out


class Worker:
    """A Ray Data actor: opens the task once, then runs batches of jobs with the local engine's code."""

    def __init__(self, blob: bytes):
        from ray import cloudpickle

        from ldmtool.runtime.execution import JobRunner

        task, options, recipes, cwd = cloudpickle.loads(blob)
        if os.path.isdir(cwd):  # relative input, output and model paths mean what they meant to the driver
            os.chdir(cwd)
        self.collector = Collector()
        self.runner = JobRunner(task, options, recipes, base_seed=options.seed, events=self.collector,
                                records=self.collector)
        self.runner.open()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np
        from ray import cloudpickle

        jobs = [cloudpickle.loads(bytes(blob)) for blob in batch["job"]]
        self.runner.process(jobs)
        records, events = self.collector.take()
        by_key: dict[str, tuple[list[dict[str, Any]], list[Any]]] = {job.item.key: ([], []) for job in jobs}
        for record in records:
            by_key[record["key"]][0].append(record)
        for event in events:
            by_key[event.key][1].append(event)
        results = [cloudpickle.dumps(by_key[job.item.key]) for job in jobs]
        return {"result": np.array(results, dtype=object)}


def process_on_ray(run: "BatchRun", jobs: list["Job"]) -> None:
    """Run `jobs` on a Ray cluster and feed every record and event back into `run` (the driver's run)."""
    try:
        import ray
        from ray import cloudpickle, data as ray_data
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'ldmtool[ray]'") from None
    try:
        with _ray_prints_to_stderr(), _ray_quiet():
            started = _init(ray, run.options.ray_address)
            try:
                _consume(run, _pipeline(ray, ray_data, cloudpickle, run, jobs), cloudpickle)
            finally:
                if started:  # flush Ray's last messages while they still go to stderr
                    ray.shutdown()
    except LdmError:
        raise
    except Exception as err:  # noqa: BLE001 - a Ray error wrapping ours is unwrapped, the rest made fatal
        cause = getattr(err, "cause", None)
        if isinstance(cause, LdmError):
            raise cause from None
        raise FatalError(f"the Ray engine stopped: {' '.join(str(err).split())[:300]}") from err


def _pipeline(ray: ModuleType, ray_data: ModuleType, cloudpickle: ModuleType, run: "BatchRun",
              jobs: list["Job"]) -> Dataset:
    """read job list → map_batches on an actor pool (model loaded once per actor) → per-job results."""
    workers, gpus = _pool_size(ray)
    local = _local_options(run.options, run.base_seed)
    blob = cloudpickle.dumps((run.task, local, run.recipes, os.getcwd()))
    rows = [{"job": cloudpickle.dumps(job)} for job in jobs]
    dataset: Dataset = ray_data.from_items(rows, override_num_blocks=max(1, min(len(rows), 200)))
    return dataset.map_batches(
        Worker, fn_constructor_kwargs={"blob": blob}, batch_size=run.options.batch_size,
        compute=ray_data.ActorPoolStrategy(size=workers), num_cpus=0 if gpus else 1, num_gpus=1 if gpus else 0,
        batch_format="numpy", **_RETRIES,
    )


def _consume(run: "BatchRun", results: Dataset, cloudpickle: ModuleType) -> None:
    for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
        for blob in batch["result"]:
            records, events = cloudpickle.loads(bytes(blob))
            run.absorb(records, events)


@contextmanager
def _ray_prints_to_stderr() -> Iterator[None]:
    """Ray prints cluster messages (worker restarts, retries) to whatever `sys.stdout` is at the time;
    stdout belongs to `--json` events (the reporter holds its own reference), so send them to stderr."""
    saved = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = saved


@contextmanager
def _ray_quiet() -> Iterator[None]:
    """Silence Ray's Python loggers and warnings, and its C++ log (`RAY_BACKEND_LOG_LEVEL`, read when the
    driver's core worker starts), for the run; `LDMTOOL_DEBUG=1` (or a `RAY_BACKEND_LOG_LEVEL` the user set)
    keeps them."""
    from ldmtool.runtime.execution import DEBUG_ENV

    if os.environ.get(DEBUG_ENV) == "1":
        yield
        return
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
    levels = [logger.level for logger in loggers]
    backend = os.environ.get("RAY_BACKEND_LOG_LEVEL")
    os.environ["RAY_BACKEND_LOG_LEVEL"] = backend or "fatal"
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if backend is None:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)


@contextmanager
def _native_stderr_muted() -> Iterator[None]:
    """File descriptor 2 to /dev/null while Ray starts (its core worker announces the log level it read, and
    the processes it starts inherit it); failures still come back as exceptions. Not with LDMTOOL_DEBUG=1."""
    from ldmtool.runtime.execution import DEBUG_ENV

    if os.environ.get(DEBUG_ENV) == "1":
        yield
        return
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _init(ray: ModuleType, address: Optional[str]) -> bool:
    """Connect to (or start) a cluster; True when this call did it."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False, "include_dashboard": False,
                              "logging_level": "ERROR"}
    if address:
        kwargs["address"] = address
    try:
        with _native_stderr_muted():
            ray.init(**kwargs)
    except Exception as err:  # noqa: BLE001 - any failure to reach or start a cluster is fatal for the run
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise FatalError(f"cannot start or join {where} ({' '.join(str(err).split())[:200]})") from err
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    return True


def _pool_size(ray: ModuleType) -> tuple[int, bool]:
    """(actors, one GPU each?): one actor per GPU in the cluster, else one per CPU;
    `LDMTOOL_RAY_WORKERS` overrides the count."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    count = gpus or max(1, int(resources.get("CPU", 1)))
    override = os.environ.get("LDMTOOL_RAY_WORKERS")
    return (max(1, int(override)) if override else count), gpus > 0


def _local_options(options: RunOptions, base_seed: Optional[int]) -> RunOptions:
    """The options each worker runs with: the driver's base seed, the local engine, nothing printed."""
    from dataclasses import replace

    return replace(options, seed=base_seed, engine="local", ray_address=None, json_events=False, quiet=True)
