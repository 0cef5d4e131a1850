"""What makes an output *this* job's output: the identity resume checks and replay re-runs.

A job is identified by the command, the model file's sha256, every option that changes pixels (the
command's options less those that only steer the run: where outputs go, how they are named, batching,
engines, reporting), the item's own seed, and the item itself (its key, its generated data such as a
prompt line, and the sha256 of its input and mask files). The same identity means the same pixels on
the same machine (see README, "Reproducibility"); a different one names what differs.

The run's identity (command, model, options; no seed, no item) is what a run without `--seed` uses to
adopt the seed of an earlier run of the same job from the output folder's manifest.

An option whose default is the model's (`--width` of txt2img, `--steps`, ...) given as exactly the value the
run resolves it to is the same job as the option left out: identities record options as given (left out:
null), and compare them `as_given` the run's defaults (pipelines/defaults.py); run ids, digests that cannot be
compared so, are taken for every spelling (`written_either_way`).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, cast

# Options that steer the run (which items, where outputs go, batching, engines, reporting, seeds): a
# recipe does not record them, replay supplies its own.
RUN_STEERING = frozenset({
    "inputs", "recursive", "masks", "prompts", "output", "name", "suffix", "fmt", "json_out", "quiet", "fail_fast", "dry_run",
    "batch_size", "seed", "item_seed", "shard", "run_engine", "ray_address", "overwrite", "existing", "n",
    "sweep", "combinatorial", "max_prompts", "same_seed", "no_gallery",
})
# Options that never change an output's pixels (limits refuse inputs or runs, never alter one): everything else a command takes is part of the identity
# (the model is there as its file's sha256). --max-memory is, unless --tile fixes the tile: it chooses the
# automatic tile (and whether a canvas runs untiled), but under a fixed tile only how many tiles share a call.
# Options that only add files beside an output (layout2img --draw-boxes: `<name>.boxes.png`): not its pixels,
# so a rerun with or without them is the same job. Earlier versions recorded them in the identity (and the
# run id): `recorded_otherwise` gives those spellings, so their folders resume and adopt their seeds.
EXTRAS_BESIDE = frozenset({"draw_boxes"})
NOT_PIXELS = RUN_STEERING | EXTRAS_BESIDE | {"max_pixels", "max_output_pixels", "model"}
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".webp")


def jsonable(value: Any) -> Any:
    """Plain JSON values (paths and enums become strings), so a stored identity compares equal to a fresh one."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def recorded_options(cli: Mapping[str, Any]) -> dict[str, Any]:
    """The command's options a recipe keeps to rebuild the job (replay)."""
    return cast(dict[str, Any], jsonable({name: value for name, value in _budget_if_it_matters(cli).items()
                                         if name not in RUN_STEERING}))


def _budget_if_it_matters(cli: Mapping[str, Any]) -> dict[str, Any]:
    """The options without --max-memory when --tile fixes the tile: the budget then only decides how many
    tiles share a network call, which never changes pixels (README, "Reproducibility")."""
    options = dict(cli)
    if options.get("tile") is not None:
        options.pop("max_memory", None)
    return options


def pixel_options(cli: Mapping[str, Any], output: Optional[Path] = None) -> dict[str, Any]:
    """The command's options that change pixels; `quality` only counts for lossy output formats."""
    options = {name: value for name, value in _budget_if_it_matters(cli).items() if name not in NOT_PIXELS}
    if output is not None and output.suffix.lower() not in LOSSY_SUFFIXES:
        options.pop("quality", None)
    return cast(dict[str, Any], jsonable(options))


def recorded_otherwise(cli: Mapping[str, Any], variants: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], ...]:
    """Each pixel-option `variant` as earlier versions recorded it, with every `EXTRAS_BESIDE` option the
    command takes set each way (`draw_boxes` false and true)."""
    extras = sorted(name for name in EXTRAS_BESIDE if name in cli)
    if not extras:
        return ()
    settings = [dict(zip(extras, values)) for values in itertools.product((False, True), repeat=len(extras))]
    return tuple(cast(dict[str, Any], jsonable({**variant, **setting})) for variant in variants for setting in settings)


def run_id(command: str, model_sha256: Optional[str], options: Mapping[str, Any]) -> str:
    """A digest of the run's identity (command, model, pixel options), recorded in manifests and recipes."""
    # Options left at None are left out, so that a release adding an option (default None) keeps the run ids
    # of folders made before it, and with them the seeds runs without --seed adopt (resume compares None and
    # absent alike, `difference`).
    given = {name: value for name, value in jsonable(options).items() if value is not None}
    text = json.dumps({"command": command, "model_sha256": model_sha256, "options": given}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def as_given(options: Any, defaults: Mapping[str, Any]) -> Any:
    """`options` with each one given as exactly its default (`defaults`: what the run resolves it to when left
    out) written as left out (None): the form in which both spellings of a job compare equal."""
    if not isinstance(options, Mapping):
        return options  # a damaged recipe: it differs as it is
    return {name: None if name in defaults and value is not None and _same(value, defaults[name]) else value
            for name, value in options.items()}


def _same(value: Any, default: Any) -> bool:
    """Equal as option values: 7 and 7.0 are, true and 1 are not."""
    return value == default and isinstance(value, bool) == isinstance(default, bool)


def written_either_way(options: Mapping[str, Any], defaults: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """`options` with each option that is left out or given as its default written both ways, in every
    combination (2^n for n such options): the spellings of one job, whose run ids a manifest may hold."""
    free = sorted(name for name, default in defaults.items()
                  if options.get(name) is None or _same(options[name], default))  # absent: left out
    base = as_given(options, defaults)
    for given in itertools.product((False, True), repeat=len(free)):
        yield {**base, **{name: defaults[name] for name, explicit in zip(free, given) if explicit}}


def file_sha256(path: Optional[Path]) -> Optional[str]:
    """The sha256 of an input file (None for generated items). Inputs are hashed whole, every time: unlike
    model files they are many, and a cache keyed by path would grow with every folder ever processed."""
    if path is None:
        return None
    digest = hashlib.sha256()
    from ldmtool.io.files import open_regular

    with os.fdopen(open_regular(path), "rb") as handle:  # regular files only: a FIFO would block
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def job_identity(*, command: str, model_sha256: Optional[str], options: Mapping[str, Any], seed: int,
                 key: str, data: Mapping[str, Any], input_sha256: Optional[str],
                 mask_sha256: Optional[str]) -> dict[str, Any]:
    return cast(dict[str, Any], jsonable({
        "command": command, "model_sha256": model_sha256, "options": dict(options), "seed": seed,
        "key": key, "data": dict(data), "input_sha256": input_sha256, "mask_sha256": mask_sha256,
    }))


_FIELD_NAMES = {"command": "command", "model_sha256": "model file", "seed": "seed", "key": "item",
                "data": "item", "input_sha256": "input file", "mask_sha256": "mask file"}


def difference(expected: Mapping[str, Any], found: Mapping[str, Any],
               defaults: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """The first way a stored identity differs from this job's, in words; None when they are the same. An
    option left out and one given as its default (`defaults`, the run's) are the same, and a difference shows
    an option left out as that default."""
    defaults = defaults or {}
    for name in ("command", "model_sha256", "key", "data", "input_sha256", "mask_sha256"):
        if expected.get(name) != found.get(name):
            return f"its {_FIELD_NAMES[name]} differs ({_short(found.get(name))}, this run {_short(expected.get(name))})"
    mine, theirs = expected.get("options") or {}, found.get("options") or {}
    if (mine.get("precision"), mine.get("auto_precision")) != (theirs.get("precision"), theirs.get("auto_precision")):
        if mine.get("precision") == theirs.get("precision") == "auto":
            return (f"--precision auto chose another precision there ({theirs.get('auto_precision') or 'fp32'}, "
                    f"this run {mine.get('auto_precision') or 'fp32'}; pass --precision to choose one)")
        return f"--precision differs ({_precision(theirs)}, this run {_precision(mine)})"
    given_mine, given_theirs = as_given(mine, defaults), as_given(theirs, defaults)
    for name in sorted(set(mine) | set(theirs)):
        if given_mine.get(name) != given_theirs.get(name):
            shown = [options.get(name) if options.get(name) is not None else defaults.get(name) for options in (theirs, mine)]
            return f"{_option_name(name)} differs ({_short(shown[0])}, this run {_short(shown[1])})"
    if expected.get("seed") != found.get("seed"):
        return f"its seed differs ({found.get('seed')}, this run {expected.get('seed')})"
    return None


def _option_name(name: str) -> str:
    """An identity option in words: its flag, or for the hashes of the files an option names (`lora_sha256`,
    `controlnet_sha256`, ...) the files themselves."""
    if name.endswith("_sha256"):
        return f"its {name[:-len('_sha256')].replace('_', ' ')} file content"
    return "--" + name.replace("_", "-")


def _precision(options: Mapping[str, Any]) -> str:
    """`--precision` as an identity records it: auto with what it chose where that is not the device's
    old default (fp32 on a CPU, fp16 on a GPU)."""
    asked = str(options.get("precision") or "auto")
    chosen = options.get("auto_precision")
    return f"auto ({chosen})" if asked == "auto" and chosen else asked


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:10]  # a sha256
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
