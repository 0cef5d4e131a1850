"""What every model task shares: opening its model once per run, and running items in groups.

A task module subclasses `ModelTask` and reads top to bottom as the steps of its job:

    class UpscaleTask(ModelTask):
        command = "superres"
        def check_model(self, engine): ...          # FatalError when the model cannot do the task
        def recorded(self, engine): ...             # what every output records besides the sampling values
        def load(self, job): ...                    # read the item (ItemError for bad input)
        def run(self, jobs): ...                    # prepare → encode → sample → decode → finish

`open()` is the preamble every task had written out: open the `Engine` (the model through the process-wide
cache), note the weights file, ask the task to check the model and set up per-run state, and record the
resolved sampling values. Sampler steps are reported to `self.progress` (set by `BaseTask.start`, which the
runner calls), as `self.step_progress()`.
"""
from __future__ import annotations

import copy
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping, Optional, Sequence, TypeVar

from ldmtool.errors import ItemError, UsageError
from ldmtool.io.discover import Item
from ldmtool.io.images import LoadedImage, check_read_limits, header_size
from ldmtool.pipelines.engine import Engine
from ldmtool.runtime.jobs import BaseTask, Job
from ldmtool.runtime.plan import Demand, Size

Result = TypeVar("Result")
_WORD = re.compile(r"[^\W\d_]+")


class ModelTask(BaseTask):
    """A task that runs one model through an `Engine`."""

    reads_images = False  # items are image files: the size limits of reading them are checked once per run
    warns_large = True  # warn once when an output is past twice the size an ldmtool-trained model saw (not tile-synth)
    max_pixels: Optional[int] = None  # --max-pixels (None: $LDMTOOL_MAX_PIXELS, else the default)

    def __init__(self, engine: Engine, *, params: Optional[dict[str, Any]] = None):
        super().__init__(params=params)
        self.engine = engine
        self._warned: set[str] = set()  # the topics this run has warned about (warn_once)

    def validate(self) -> None:
        """UsageError for a run-wide setting every item would fail on: the sampling and tiling options (which
        parses `--max-memory` once), the input size limits of a task that reads images, and the task's own
        options (subclasses extend this). The runner calls it before the output folder is made; `open()`
        calls it too, for callers that open a task themselves (the Python API)."""
        self.engine.validate()
        if self.reads_images:
            check_read_limits(self.max_pixels)
        self.used_embeddings(self.prompt_texts())

    def prompt_texts(self) -> tuple[Optional[str], ...]:
        """The run-wide prompts, as written (txt2img adds its prompt lines that are not templates)."""
        return tuple(text for text in (getattr(self, "prompt", None), getattr(self, "negative", None))
                     if isinstance(text, str))

    def used_embeddings(self, texts: Iterable[Optional[str]]) -> dict[str, str]:
        """`{file: sha256}` of the `--embeddings-dir` embeddings `texts` name (UsageError for one that cannot
        be used); unreadable files no prompt names are left alone."""
        from ldmtool.addons.embeddings import check_embeddings

        return check_embeddings(texts, getattr(self.engine.choice, "embeddings_dir", None))

    def model_file(self) -> Optional[Path]:
        """The weights `--model` names, resolved without loading them (the job's identity hashes them)."""
        from ldmtool.checkpoints.api import resolve_source

        return resolve_source(self.engine.choice.model)[0]

    def open(self) -> None:
        """Check the run's settings, load the model once per run, check it can do this task (UsageError for
        options it cannot take), and record what every output ran with."""
        self.validate()
        networks = self.prompt_networks()
        if networks:  # a run-wide prompt's <lora:...> tags load with the model
            self.engine.networks = networks
        engine = self.engine.open()
        self.model_path = engine.model_path
        if engine.precision is not None and engine.precision.emulated:
            from ldmtool.runtime.device import EMULATED

            name = engine.precision.name
            self.warn_once("precision", f"--precision {name}: {EMULATED.format(name)}")
        self.note_partial_ema(engine)
        self.check_model(engine)
        self.params.update(engine.resolved())
        self.params.update(self.recorded(engine))
        self.note_distilled(engine)

    def prompt_networks(self) -> tuple[Any, ...]:
        """The LoRAs the run-wide prompt's `<lora:NAME:W>` tags name (UsageError for one not found)."""
        prompt = getattr(self, "prompt", None)
        if not (isinstance(prompt, str) and "<" in prompt):
            return ()
        from ldmtool.addons.networks import prompt_networks

        return prompt_networks(prompt, self.engine.choice.lora_dir)

    def item_addon_files(self, item: Item, seed: int) -> dict[str, Any]:
        """What an item's identity holds of its own add-on files beside the run's (runtime/resume.py): the
        contents of its hints from `--control-image` folders."""
        control = getattr(self, "control", None)
        if not control:
            return {}
        return dict(control.item_identity(None if item.path is None else item.path.stem))

    def note_partial_ema(self, engine: Engine) -> None:
        """Say in one line that the model file's EMA copies cover only some of its weights (merged anyway)."""
        from ldmtool.checkpoints.weights import partial_ema_note

        info = getattr(engine.bundle, "load_info", None)
        note = info and partial_ema_note(str(info.path), info.ema_used, info.ema_missing)
        if note:
            self.warn_once("ema", note)

    def note_distilled(self, engine: Engine) -> None:
        """Record, and say in one line, which settings came from a distilled model's file name."""
        used, distilled = engine.from_file_name(), engine.distilled()
        if used and distilled is not None:
            self.params["distilled"] = distilled.recorded(used)
            if self.progress is not None:
                self.progress.note(distilled.notice(used))

    def for_cell(self, model: dict[str, Any], sampling: dict[str, Any], sweep: dict[str, Any]) -> "ModelTask":
        """This task for one cell of a `--sweep` (runtime/sweep.py), before it opens: the same task with
        the cell's model and sampling values, recording `sweep` (the cell) in every output."""
        cell = copy.copy(self)
        cell.engine = Engine(replace(self.engine.choice, **model), replace(self.engine.sampling, **sampling))
        cell.params = {**self.params, "sweep": sweep}
        cell._warned = set()
        return cell

    def check_model(self, engine: Engine) -> None:
        """FatalError when the model cannot do this task, UsageError when it cannot take an option the run was
        given (a prompt, guidance): both before any item runs; per-run state (text encoders, sizes)."""

    def option_defaults(self) -> dict[str, Any]:
        """What the run's model-resolved options resolve to when left out (pipelines/defaults.py): an option
        given as that value is the same job as one left out (runtime/identity.py `as_given`)."""
        from ldmtool.pipelines.defaults import option_defaults

        return option_defaults(self)

    def own_defaults(self, info: Any) -> dict[str, Any]:
        """The task's own options that default to a value of the model `info` describes (or to a fixed one),
        as `option_defaults` reports them: `{option: value}`."""
        return {}

    def recorded(self, engine: Engine) -> dict[str, Any]:
        """Parameters every output records after the resolved sampling values, in the order they are shown."""
        precision = engine.precision.to_json() if engine.precision is not None else {}
        return {"model_family": engine.info.family, **precision, **engine.addons().recorded(engine.choice)}

    def planned_demand(self, sizes: Mapping[Size, int], batch_size: int) -> Demand:
        """Weights, latents, tile working memory and image buffers of the largest item; seconds once open
        (pipelines/planning.py)."""
        from ldmtool.pipelines.planning import model_demand

        return model_demand(self, sizes, batch_size)

    def latent_copies(self, latent_hw: tuple[int, int]) -> Optional[int]:
        """Latent-sized float32 tensors the task holds at once while sampling a latent of `latent_hw`, for the
        run plan (with the model open); None: the planner's general count."""
        return None

    def planned_latents(self, size: Size, down: int) -> list[tuple[int, int]]:
        """(h, w) of the latent each sampling pass of an item with output `size` samples (one pass here)."""
        width, height = size
        return [(-(-height // down), -(-width // down))]

    def check_guidance(self, engine: Engine, guided: bool) -> None:
        """UsageError for `--cfg` (other than 1) when this task runs the model without an unconditional input:
        guidance could not run, and silently ignoring it would record a `cfg` that did nothing."""
        cfg = engine.sampling.cfg
        if not guided and cfg is not None and cfg != 1.0:
            raise UsageError(f"--cfg {cfg}: the {engine.info.family} model has no unconditional input for "
                             f"{self.command}, so classifier-free guidance cannot run; drop --cfg")

    def warn_once(self, topic: str, message: str) -> None:
        """One `ldmtool: warning: ...` line per run and topic (not per item)."""
        if topic not in self._warned and self.progress is not None:
            self._warned.add(topic)
            self.progress.note(f"warning: {message}")

    def check_literal_prompts(self, texts: Iterable[Optional[str]]) -> None:
        """Warn once when a command that takes its prompt as written is given template syntax: only txt2img
        expands `{a|b}` and `__wildcards__` (the prompt is used, and recorded, literally)."""
        from ldmtool.pipelines.prompt_templates import is_template

        if any(is_template(text) for text in texts):
            self.warn_once("template", f"{self.command} takes its prompt as written: template syntax ({{a|b}}, "
                           "__wildcards__) is expanded by txt2img only")

    def check_vocabulary(self, texts: Iterable[str]) -> None:
        """Warn once when a prompt has words an ldmtool-trained model never saw in its captions."""
        info = self.engine.info
        if info.vocabulary is None:
            return
        unknown = sorted({word for text in texts for word in _WORD.findall(text.lower())} - info.vocabulary)
        if unknown:
            self.warn_once("vocabulary", f"{info.family} knows only the words of its training captions "
                           f"({' '.join(sorted(info.vocabulary))}); {', '.join(_clipped(word) for word in unknown[:5])}"
                           f"{' ...' if len(unknown) > 5 else ''} will have little effect")

    def check_trained_size(self, width: int, height: int) -> None:
        """Warn once when an output is more than twice the size an ldmtool-trained model was trained at."""
        trained = self.engine.info.trained_size
        if self.warns_large and trained is not None and (width > 2 * trained[0] or height > 2 * trained[1]):
            self.warn_once("size", f"{width}x{height} is more than twice the {trained[0]}x{trained[1]} that "
                           f"{self.engine.info.family} was trained at; expect repeated or broken structure")

    def step_progress(self) -> Optional[Callable[[int, int], None]]:
        """The callback for sampler steps (done, total), or None when nothing shows progress."""
        return None if self.progress is None else self.progress.steps


def carried(image: LoadedImage) -> dict[str, Any]:
    """What an output keeps of its input file, as `Output` fields: `Output(image=..., **carried(loaded))`
    (its EXIF, ICC profile and greyness, and its bit depth)."""
    return {"source": image.source, "bit_depth": image.bit_depth}


def input_path(job: Job) -> Path:
    """The input file of a job's item; ItemError for an item that has none (a generated item given to a
    command that reads files)."""
    if job.item.path is None:
        raise ItemError(f"{job.item.label}: this command reads an input file, and the item has none")
    return job.item.path


def input_size(item: Item, max_pixels: Optional[int] = None, *, upright: bool = True) -> Optional[Size]:
    """The (width, height) of an item's input file from its header (`upright`: as EXIF orientation shows it);
    None for a generated item or a file whose header cannot be read (its load says why)."""
    return None if item.path is None else header_size(item.path, max_pixels=max_pixels, upright=upright)


def in_groups(jobs: Sequence[Job], key: Callable[[Job], Hashable],
              run_group: Callable[[list[Job]], Sequence[Result]]) -> list[Result]:
    """`run_group` on each group of jobs with equal `key(job)` (first-seen order, so jobs that can share one
    sampling call share it); the results in the order of `jobs`."""
    groups: dict[Hashable, list[int]] = {}
    for position, job in enumerate(jobs):
        groups.setdefault(key(job), []).append(position)
    results: list[Any] = [None] * len(jobs)
    for positions in groups.values():
        for position, result in zip(positions, run_group([jobs[p] for p in positions])):
            results[position] = result
    return results


def _clipped(word: str, length: int = 30) -> str:
    """A word as a one-line message shows it: a prompt without spaces (CJK) is one word of any length."""
    return word if len(word) <= length else word[: length - 1] + "…"
