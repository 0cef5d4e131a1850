"""Outputs that exist already, earlier runs of the same job, and replays (DESIGN.md §6; issue 15).

`Recipes` holds what names one run's jobs (command, model sha256, pixel options; runtime/identity.py) and
answers the runner's three questions: which seed a run without `--seed` takes (the same job's earlier one,
from the output folder's manifest or an existing `-o FILE`), what goes into each output's recipe, and
whether an existing output is this job's (skip it), another job's (fail the item, saying how it differs),
or no output at all (empty or undecodable: redo it). `replaying` makes a run do one recorded item again.
"""
from __future__ import annotations

import functools
import os
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence, TypeGuard, overload

from ldmtool.errors import LdmError
from ldmtool.io.discover import Item
from ldmtool.io.files import shown
from ldmtool.io.manifest import MANIFEST_NAME, read_manifest
from ldmtool.io.metadata import read_metadata
from ldmtool.runtime import identity
from ldmtool.runtime.seeds import random_seed
from ldmtool.runtime.workflow import upstream_recipe

if TYPE_CHECKING:
    from ldmtool.io.outputs import OutputSpec
    from ldmtool.runtime.claims import Claims

WAY_OUT = "replace it with --overwrite, keep it with --existing skip, or choose another -o"


@dataclass(frozen=True)
class Recipes:
    """The identity of one run's jobs."""

    command: str
    model_sha256: Optional[str]
    pixel_options: Mapping[str, Any]
    recorded_options: Mapping[str, Any]
    # The same job's pixel options written another way: `--precision bf16` where `--precision auto` chooses
    # bf16 (and the other way round) computes the same pixels, so an output or seed recorded either way is
    # this job's.
    same_job_options: tuple[Mapping[str, Any], ...] = ()
    # Options that count only for an output in a lossy format (`--quality` of a `--format keep` run, whose
    # outputs are PNGs for PNG inputs and JPEGs for JPEG ones).
    lossy_options: Mapping[str, Any] = field(default_factory=dict)
    # An item's own add-on files (a prompt line's <lora:...> tags, a hint from a --control-image folder): their
    # contents join the item's options, overriding the run's (an item's LoRAs include the run's --lora).
    item_files: Optional[Callable[[Item, int], Mapping[str, Any]]] = None
    # What the options whose default is the model's resolve to when left out (`Task.option_defaults`): given
    # as that value or left out, an option makes the same job (identity.as_given). Recipes keep the spelling.
    option_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return identity.run_id(self.command, self.model_sha256, self.pixel_options)

    @functools.cached_property
    def run_ids(self) -> frozenset[str]:
        """This run's id and those of the same job written another way (each option at its default given or
        left out: 2^n spellings, some thousands of digests at most, ~0.1 s, made once by a run without --seed)."""
        return frozenset(identity.run_id(self.command, self.model_sha256, spelling)
                         for options in (self.pixel_options, *self.same_job_options)
                         for spelling in identity.written_either_way(options, self.option_defaults))

    def earlier_seed(self, spec: "OutputSpec", manifests: Sequence[str] = (MANIFEST_NAME,)) -> Optional[int]:
        """The base seed of the latest earlier run of this job into this output, if any: from the folder's
        `manifests` (its own and every shard's part, so sharded and unsharded runs of a job agree)."""
        run_ids = self.run_ids
        latest: Optional[tuple[str, int]] = None
        for recipe in _earlier_runs(spec, manifests):
            seed = recipe.get("base_seed")
            when = str(recipe.get("time") or "")
            if recipe.get("run_id") in run_ids and _is_seed(seed) and (latest is None or when >= latest[0]):
                latest = (when, seed)
        return None if latest is None else latest[1]

    def adopted_seed(self, spec: "OutputSpec", claims: "Claims", manifests: Sequence[str] = (MANIFEST_NAME,)) -> int:
        """The seed a run without `--seed` takes: an earlier run's of this job (DESIGN.md §6), else that of a
        run of this job going on now (it holds the seed claim), else a random one, claimed for this run."""
        for _ in range(50):
            earlier = self.earlier_seed(spec, manifests)
            if earlier is not None:
                return earlier
            mine = random_seed()
            # one claim name however the job is written, so that such runs going on together share a seed
            holder = claims.acquire(spec.folder, f"seed {min(self.run_ids)}", {"seed": mine})
            if holder is None:
                return mine
            if _is_seed(holder.get("seed")):
                return int(holder["seed"])
            time.sleep(0.02)  # the other run is writing its claim right now
        return random_seed()

    def identity(self, item: Item, seed: int, output: Optional[Path] = None) -> dict[str, Any]:
        """The identity of the job writing `output` (its format decides whether `lossy_options` count)."""
        lossy = output is not None and output.suffix.lower() in identity.LOSSY_SUFFIXES
        options = {**self.pixel_options, **self.lossy_options} if lossy else self.pixel_options
        return identity.job_identity(
            command=self.command, model_sha256=self.model_sha256, options={**options, **self._own_files(item, seed)},
            seed=seed,
            key=storable(item.key), data=item.data, input_sha256=identity.file_sha256(item.path),
            mask_sha256=identity.file_sha256(item.mask))

    def _own_files(self, item: Item, seed: int) -> Mapping[str, Any]:
        return self.item_files(item, seed) if self.item_files is not None else {}

    def recipe_extras(self, item: Item, seed: int, output: Optional[Path] = None) -> dict[str, Any]:
        """What an output's recipe holds beyond its parameters: its job's identity (resume) and how to
        rebuild the job (replay)."""
        return {
            "run_id": self.run_id, "job": self.identity(item, seed, output), "cli": dict(self.recorded_options),
            "item": {"key": storable(item.key), "stem": storable(item.stem), "subdir": storable(item.subdir),
                     "data": identity.jsonable(dict(item.data)), "input": storable(_absolute(item.path)),
                     "mask": storable(_absolute(item.mask)), **_exact_names(item)},
            **upstream_recipe(item.path),  # a workflow step's output records its input's recipe: the chain
        }

    def existing_output(self, output: Path, item: Item, seed: int, policy: str) -> Optional[str]:
        """None: run the job; "": its output is there; else why the file in the way is not this job's."""
        if policy == "overwrite" or not _nonempty_file(output):
            return None
        recipe = stored_recipe(output)
        if recipe is None:
            return None  # undecodable (cut short by a crash, or not an image): redo it
        if policy == "skip":
            return ""
        if not recipe.get("job"):
            return f"{output} exists but has no ldmtool recipe (another tool or version wrote it); {WAY_OUT}"
        try:
            mine = self.identity(item, seed, output)
        except OSError:
            return None  # the input cannot be read: loading it reports why
        defaults = self.option_defaults
        change = identity.difference(mine, recipe["job"], defaults)
        own = self._own_files(item, seed)
        if change is None or any(identity.difference({**mine, "options": identity.jsonable({**options, **own})},
                                                     recipe["job"], defaults) is None for options in self.same_job_options):
            return ""
        return f"{output} was written by another job: {change}; {WAY_OUT}"


def _is_seed(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def stored_recipe(path: Path) -> Optional[dict[str, Any]]:
    """The recipe of an existing output ({} when it has none), or None when the file does not decode whole."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
        metadata = read_metadata(path)
    except (LdmError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return dict(metadata.recipe) if metadata is not None else {}


def _earlier_runs(spec: "OutputSpec", manifests: Sequence[str]) -> Iterator[dict[str, Any]]:
    """The recipes of earlier runs into this output: an existing `-o FILE`'s, or the records of the folder's
    `manifests`, streamed (a manifest may hold 10^8 records)."""
    if spec.is_file:
        stored = stored_recipe(spec.target)  # type: ignore[arg-type]
        if stored:
            yield stored
        return
    for manifest in manifests:
        yield from read_manifest(spec.folder / manifest)


def _nonempty_file(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


@overload
def storable(text: str) -> str: ...
@overload
def storable(text: None) -> None: ...
@overload
def storable(text: Optional[str]) -> Optional[str]: ...
def storable(text: Optional[str]) -> Optional[str]:
    """A name as recipes (UTF-8 PNG text) can hold it: bytes that are not UTF-8 shown escaped (issue 26)."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return shown(text)


def _exact_names(item: Item) -> dict[str, Any]:
    """`{"bytes": {...}}`: the names that `storable` had to escape, as hex of their exact bytes, so that
    replay finds a file whose name is not UTF-8 (issue 26); {} when every name is UTF-8."""
    names = {"key": item.key, "stem": item.stem, "subdir": item.subdir, "input": _absolute(item.path),
             "mask": _absolute(item.mask)}
    escaped = {field: os.fsencode(name).hex() for field, name in names.items()
               if name is not None and storable(name) != name}
    return {"bytes": escaped} if escaped else {}


def _exact(item: Mapping[str, Any], field: str) -> Any:
    """A recorded name as the file system has it: from its exact bytes when it had to be escaped."""
    raw = (item.get("bytes") or {}).get(field)
    if isinstance(raw, str):
        try:
            return os.fsdecode(bytes.fromhex(raw))
        except ValueError:
            pass
    return item.get(field)


def _absolute(path: Optional[Path]) -> Optional[str]:
    return None if path is None else os.path.abspath(path)


# ---------------------------------------------------------------- replay


@dataclass(frozen=True)
class ReplayItem:
    """One recorded item to run again (`ldmtool replay`): it replaces the command's own items."""

    item: Item
    seed: int
    output: Path

    @classmethod
    def from_recipe(cls, item: Mapping[str, Any], *, seed: int, output: Path) -> "ReplayItem":
        path, mask = _exact(item, "input"), _exact(item, "mask")
        return cls(Item(key=str(_exact(item, "key")), stem=str(_exact(item, "stem") or "item"),
                        path=path and Path(path), mask=mask and Path(mask), data=dict(item.get("data") or {})),
                   seed, output)


_REPLAY: ContextVar[Optional[ReplayItem]] = ContextVar("ldmtool_replay", default=None)


@contextmanager
def replaying(replay: ReplayItem) -> Iterator[None]:
    """While inside, `run_task` runs only `replay.item`, with its seed, into `replay.output`."""
    token = _REPLAY.set(replay)
    try:
        yield
    finally:
        _REPLAY.reset(token)


def current_replay() -> Optional[ReplayItem]:
    return _REPLAY.get()
