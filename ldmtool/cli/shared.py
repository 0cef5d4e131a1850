"""The options every task command shares, declared once and attached by one decorator.

    @task_command(model="default-superres")
    def superres(inputs: opt.Inputs, scale: ..., *, run, model, sampling) -> None:
        ...

`task_command` appends the shared option groups (DESIGN.md §6 names, from `ldmtool.cli.options`) to the
command's signature, so Typer shows them on every command with identical names and help, and hands the
command three records instead of thirty arguments: `run` (RunOptions: output, naming, resume, events,
seeds, shards, engine), `model` (ModelChoice) and `sampling` (SamplingChoice). No torch at import.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

from ldmtool.cli import options as opt
from ldmtool.cli.common import run_options

# (parameter name, Annotated alias, default)
RUN_OPTIONS = [
    ("output", opt.Output, None),
    ("name", opt.NameTemplate, "{stem}.{ext}"),
    ("fmt", opt.Format, None),
    ("quality", opt.Quality, 95),
    ("overwrite", opt.Overwrite, False),
    ("existing", opt.Existing, None),
    ("json_out", opt.Json, False),
    ("quiet", opt.Quiet, False),
    ("fail_fast", opt.FailFast, False),
    ("batch_size", opt.BatchSize, 1),
    ("seed", opt.Seed, None),
    ("item_seed", opt.ItemSeed, None),
    ("shard", opt.Shard, None),
    ("run_engine", opt.Engine, "local"),
    ("ray_address", opt.RayAddress, None),
]
MODEL_OPTIONS = [
    ("model", opt.Model, None),  # the default is the command's own shipped model
    ("config", opt.Config, None),
    ("preset", opt.Preset, None),
    ("no_ema", opt.NoEma, False),
    ("prediction", opt.Prediction, None),
    ("device", opt.Device, "auto"),
    ("precision", opt.Precision, "auto"),
]
SAMPLING_OPTIONS = [
    ("steps", opt.Steps, None),
    ("sampler", opt.Sampler, None),
    ("cfg", opt.Cfg, None),
    ("eta", opt.Eta, None),
    ("temperature", opt.Temperature, None),
    ("karras", opt.Karras, None),
    ("tile", opt.Tile, None),
    ("tile_overlap", opt.TileOverlap, None),
    ("max_memory", opt.MaxMemory, None),
]
SEAMLESS_OPTION = ("seamless", opt.Seamless, None)
INJECTED = ("run", "model", "sampling")


def task_command(*, model: Optional[str], seamless: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command function that takes keyword-only `run`, `model` and `sampling` records.

    `model` is the command's default `--model`; None for a command without a model (it gets `run` only).
    """
    groups = list(RUN_OPTIONS)
    if model is not None:
        groups += [(n, a, model if n == "model" else d) for n, a, d in MODEL_OPTIONS] + SAMPLING_OPTIONS
    if seamless:
        groups += [SEAMLESS_OPTION]
    shared = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a) for n, a, d in groups]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = _own_parameters(command)

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name, _, _ in groups}
            return command(**kwargs, **_records(values, cli={**kwargs, **values}))

        wrapper.__signature__ = inspect.Signature(own + shared)  # what Typer reads
        wrapper.__annotations__ = {p.name: p.annotation for p in own + shared}
        return wrapper

    return decorate


def _own_parameters(command: Callable[..., Any]) -> list[inspect.Parameter]:
    """The command's own parameters with their annotations evaluated (modules use postponed annotations);
    the injected records are left out, so their types may be imported for type checking only."""
    own = []
    for param in inspect.signature(command).parameters.values():
        if param.name in INJECTED:
            continue
        annotation = param.annotation
        if isinstance(annotation, str):
            annotation = eval(annotation, command.__globals__)  # noqa: S307 - our own source's annotations
        own.append(param.replace(annotation=annotation))
    return own


def _records(v: dict[str, Any], cli: dict[str, Any]) -> dict[str, Any]:
    run = run_options(output=v["output"], name=v["name"], fmt=v["fmt"], quality=v["quality"],
                      overwrite=v["overwrite"], existing=v["existing"], fail_fast=v["fail_fast"],
                      batch_size=v["batch_size"], seed=v["seed"], item_seed=v["item_seed"], json_out=v["json_out"],
                      quiet=v["quiet"], shard=v["shard"], engine=v["run_engine"], ray_address=v["ray_address"], cli=cli)
    if "model" not in v:
        return {"run": run}
    from ldmtool.pipelines.engine import ModelChoice, SamplingChoice  # torch only once a command runs

    model = ModelChoice(model=v["model"], config=v["config"], preset=v["preset"], use_ema=not v["no_ema"],
                        prediction=v["prediction"], device=v["device"], precision=v["precision"])
    sampling = SamplingChoice(sampler=v["sampler"], steps=v["steps"], cfg=v["cfg"], eta=v["eta"],
                              temperature=v["temperature"],
                              karras=v["karras"], tile=v["tile"], tile_overlap=v["tile_overlap"],
                              max_memory=v["max_memory"], seamless=v.get("seamless"))
    return {"run": run, "model": model, "sampling": sampling}
