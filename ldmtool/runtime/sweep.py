"""Parameter sweeps: `--sweep NAME=V1,V2,...` (repeatable) runs a task command once per cell of the cross
product of the swept values, every cell with the same items and per-item seeds, so only the swept values
change (an X/Y/Z plot's data).

A sweep may name any sampling or model option the command takes (`steps`, `cfg`, `sampler`, `model`, ...).
The values are parsed and checked as the option's own (a one-line usage error, exit 2, before anything
runs). Each cell is one ordinary run (`run_task`): its options are the run's with the cell's values, so
resume, replay and the job identity work per cell; its outputs' names carry the cell (`-steps20-cfg5`
after `{stem}`, or where the name template says `{sweep}`), and every output records its cell as the
parameter `sweep`, `{"steps": 20, "cfg": 5.0}` (the values as the option takes them). Cells are ordered
by model, so each model loads once (the process-wide model cache keeps it between cells). A run without
`--seed` takes its seed once, in its first cell, and every other cell runs with it.
"""
from __future__ import annotations

import functools
import itertools
import math
import typing
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ldmtool.errors import UsageError
from ldmtool.io.discover import sanitize_name

if TYPE_CHECKING:
    from ldmtool.runtime.jobs import RunOptions, Task
    from ldmtool.runtime.report import Summary

SWEEP_FIELD = "{sweep}"
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class Axis:
    """One swept option: its name (the option's field name), its group, its values (parsed) and each value's
    part of an output's name (distinct)."""

    name: str
    group: str  # "model" or "sampling": the record the value goes to
    values: tuple[Any, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    """One combination of swept values."""

    values: tuple[tuple[Axis, int], ...]  # (axis, index of its value)

    def record(self) -> dict[str, Any]:
        """What each output of the cell records as its `sweep` parameter."""
        return {axis.name: axis.values[i] for axis, i in self.values}

    def changes(self, group: str) -> dict[str, Any]:
        return {axis.name: axis.values[i] for axis, i in self.values if axis.group == group}

    def label(self) -> str:
        """`steps20-cfg5`: the part of each output's name that tells the cell."""
        return "-".join(f"{axis.name.replace('_', '-')}{axis.labels[i]}" for axis, i in self.values)


def parse_sweeps(specs: Sequence[str], cli: dict[str, Any]) -> tuple[Axis, ...]:
    """The axes of `--sweep NAME=V1,V2,...` options, checked against the options the command takes (`cli`)."""
    axes: list[Axis] = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        key = name.strip().lstrip("-").replace("-", "_")
        flag = f"--sweep {spec}"
        if not sep or not key:
            raise UsageError(f"{flag}: write NAME=V1,V2,... (e.g. --sweep steps=20,30)")
        fields = _sweepable()
        if key not in fields or key not in cli:
            takes = ", ".join(sorted(name for name in fields if name in cli))
            raise UsageError(f"{flag}: {name.strip()!r} is not a sampling or model option of this command "
                             f"(it takes {takes})")
        if any(axis.name == key for axis in axes):
            raise UsageError(f"{flag}: {key} is swept twice; give its values in one --sweep")
        texts = tuple(text.strip() for text in values.split(","))
        if not all(texts):
            raise UsageError(f"{flag}: an empty value; write the values separated by commas")
        parsed = tuple(_parse(fields[key], key, text, flag) for text in texts)
        if len(set(map(repr, parsed))) != len(parsed):
            raise UsageError(f"{flag}: a value is given twice")
        axes.append(Axis(key, fields[key][0], parsed, _labels(key, parsed, texts)))
    _check_labels(axes)
    return tuple(axes)


def cells(axes: Sequence[Axis]) -> list[Cell]:
    """The cross product, first axis slowest, grouped by model (each model loads once)."""
    product = [Cell(tuple(zip(axes, indexes))) for indexes in itertools.product(*(range(len(a.values)) for a in axes))]
    model_axis = [position for position, axis in enumerate(axes) if axis.name == "model"]
    if model_axis:
        product.sort(key=lambda cell: cell.values[model_axis[0]][1])  # stable: the other axes keep their order
    return product


def cell_template(template: str, cell: Cell) -> str:
    """The run's output name template for one cell: `{sweep}` replaced, else `-CELL` after `{stem}`."""
    label = cell.label().replace("{", "{{").replace("}", "}}")
    if SWEEP_FIELD in template:
        return template.replace(SWEEP_FIELD, label)
    if "{stem}" in template:
        return template.replace("{stem}", "{stem}-" + label, 1)
    stem, dot, ext = template.rpartition(".")
    return f"{stem}-{label}.{ext}" if dot and stem else f"{template}-{label}"


def run_sweep(task: "Task", options: "RunOptions", run_cell: Callable[["Task", "RunOptions"], "Summary"]) -> "Summary":
    """Run every cell of `options.sweep` (`run_cell` is the runner's run of one task); the summary of all."""
    from ldmtool.io.outputs import OutputSpec
    from ldmtool.runtime.report import Reporter, Summary
    from ldmtool.runtime.seeds import RANDOM

    spec = OutputSpec(options.output, options.name_template, options.fmt, options.suffix)
    if spec.is_file:
        raise UsageError(f"-o {options.output}: --sweep writes one output per cell; give -o a folder")
    for_cell = getattr(task, "for_cell", None)
    if for_cell is None:
        raise UsageError(f"--sweep: {task.command} has no sampling or model options to sweep")
    tasks = [(cell, for_cell(cell.changes("model"), cell.changes("sampling"), cell.record()))
             for cell in cells(options.sweep)]
    for _, cell_task in tasks:
        _check_cell(cell_task)
    total = Summary(base_seed=options.seed if options.seed not in (None, RANDOM) else None)
    for cell, cell_task in tasks:
        seed = options.seed if total.base_seed is None else total.base_seed
        cell_options = replace(options, sweep=(), seed=seed, name_template=cell_template(options.name_template, cell),
                               cli={**options.cli, **cell.record()}, sweep_cell=True)
        summary = run_cell(cell_task, cell_options)
        total.base_seed = summary.base_seed if total.base_seed is None else total.base_seed
        total.done, total.skipped, total.failed = (total.done + summary.done, total.skipped + summary.skipped,
                                                   total.failed + summary.failed)
        total.seconds += summary.seconds
        total.failures += summary.failures
        total.elsewhere += summary.elsewhere
        for action, count in summary.dry_run.items():
            total.dry_run[action] = total.dry_run.get(action, 0) + count
    reporter = Reporter(json_events=options.json_events, quiet=True)
    if options.dry_run:  # the one final `summary` event
        reporter.dry_run_summary(total.dry_run, total.base_seed)
    else:
        reporter.finish(total)
    return total


def _check_cell(task: "Task") -> None:
    """The checks a run makes before anything runs, for one cell: its settings (`validate`, as the runner
    does) and its model file (resolved, not loaded); a UsageError here stops the sweep before any cell runs."""
    task.validate()
    model_file = getattr(task, "model_file", None)
    if model_file is not None:
        model_file()


def _labels(name: str, values: Sequence[Any], texts: Sequence[str]) -> tuple[str, ...]:
    """Each value's part of an output's name: a number exactly (`cfg0.5`, `cfg5`), other values as safe
    text; values whose text gives the same part (two `m.safetensors` in different folders) gain their
    position in the list (`modelm-1`, `modelm-2`)."""
    parts = [_name_part(name, value, text) for value, text in zip(values, texts)]
    counts = Counter(part.casefold() for part in parts)  # a case-insensitive file system keeps one of A and a
    return tuple(f"{part}-{position}" if counts[part.casefold()] > 1 else part
                 for position, part in enumerate(parts, 1))


def _name_part(name: str, value: Any, text: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        exact = repr(value)  # 0.5 and 5.0 stay apart (as text both sanitized to "5"); 5.0 is named 5
        return exact[:-2] if exact.endswith(".0") else exact
    if name == "model":
        text = Path(text).stem if text.lower().endswith((".safetensors", ".ckpt", ".pt", ".pth")) else text
    return sanitize_name(text, max_length=40)


def _check_labels(axes: Sequence[Axis]) -> None:
    """Every cell's outputs get names of their own (a safety net under `_labels`): a UsageError otherwise."""
    seen: dict[str, Cell] = {}
    for cell in cells(axes):
        earlier = seen.setdefault(cell.label().casefold(), cell)
        if earlier is not cell:
            raise UsageError(f"--sweep: the cells {earlier.record()} and {cell.record()} would both name their "
                             f"outputs '{cell.label()}'; give values that differ in their names")


@functools.cache
def _sweepable() -> dict[str, tuple[str, Any, dict[str, Any]]]:
    """Every sampling and model option: field name -> (group, type, Typer settings)."""
    from ldmtool.options import ModelChoice, SamplingChoice, option_fields  # a layer below: imported when used

    found: dict[str, tuple[str, Any, dict[str, Any]]] = {}
    for group, record in (("model", ModelChoice), ("sampling", SamplingChoice)):
        hints = typing.get_type_hints(record)
        for field in option_fields(record):
            found[field.name] = (group, _plain(hints[field.name]), dict(field.metadata["settings"]))
    return found


def _plain(hint: Any) -> Any:
    """`Optional[int]` -> int."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if args and typing.get_origin(hint) is not None else hint


def _parse(field: tuple[str, Any, dict[str, Any]], name: str, text: str, flag: str) -> Any:
    _, kind, settings = field
    try:
        if kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            value: Any = text.lower() in _TRUE
        elif kind in (int, float):
            value = kind(text)
        else:
            value = str(text) if kind is not Path else str(Path(text))
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a valid {name} ({getattr(kind, '__name__', kind)})") from None
    if kind is float and not math.isfinite(value):
        raise UsageError(f"{flag}: {name} {text}: must be a finite number")
    if kind is Path and not Path(value).exists():
        raise UsageError(f"{flag}: {text}: no such file or folder")
    choices = _choices(name)
    if choices and (value.lower() if name == "precision" else value) not in choices:  # as the command compares
        raise UsageError(f"{flag}: {name} {value!r} is not one of {', '.join(choices)}")
    low, high = settings.get("min"), settings.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        raise UsageError(f"{flag}: {name} {text} is out of range")
    if name == "sampler":
        from ldmtool.diffusion.names import SAMPLER_NAMES, sampler_name

        if sampler_name(value)[0] not in SAMPLER_NAMES:  # A1111's names too
            raise UsageError(f"{flag}: unknown sampler {value!r} (use {', '.join(SAMPLER_NAMES)})")
    return value


def _choices(name: str) -> tuple[str, ...]:
    """The names an option takes, for those the command checks only when its model loads."""
    if name == "precision":
        from ldmtool.runtime.device import PRECISIONS

        return PRECISIONS
    if name == "prediction":
        from ldmtool.checkpoints.bundle import PARAMETERIZATIONS  # a layer above: imported when used

        return PARAMETERIZATIONS
    return ()
