"""What a run's options resolve to when they are left out, known before its model loads (issue: an explicit
option equal to its resolved default is the same job).

Options whose default is the model's (`--prediction`, `--sampler`, `--steps`, `--cfg`, `--temperature`, `--spacing` from the
config's `ldmtool:` block or a distilled model's file name; `--guidance` of a guidance-distilled flow model;
a generator's `--width/--height`; superres `--noise-level`, `--colour-fix`, `--consistency`; ...) compute
the same pixels left out or given as that value. The task reports those values (`ModelTask.option_defaults`,
each task adding its own in `own_defaults`), and the job's identity takes both spellings as one job
(runtime/identity.py `as_given`): resume, the seed a run without `--seed` adopts, the claim that shares it.

The model is described from its safetensors header on the meta device (`planning.described_bundle`, which
the run plan shares): no weight is read. Where that cannot be told cheaply (a pickle .ckpt, a file that does
not describe) the task reports nothing, and only the same spelling is the same job, as before.
"""
from __future__ import annotations

import copy
import typing
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ldmtool.families.info import Parameterization
from ldmtool.options import SamplingChoice

if TYPE_CHECKING:
    from ldmtool.pipelines.base import ModelTask
    from ldmtool.pipelines.engine import Engine

# Sampling options whose default the run resolves from the model (Engine.resolved); a flow model takes no
# spacing (its time shift decides) and its guidance input is its own (below).
SAMPLING = ("sampler", "steps", "cfg", "temperature", "spacing", "tcd_gamma")


def option_defaults(task: "ModelTask") -> dict[str, Any]:
    """`{option: value}`: what each model-resolved option of `task` resolves to when left out, whether or not
    this run gives it (the others as given); {} where the model cannot be described without loading it."""
    from ldmtool.pipelines.planning import described_bundle

    engine = task.engine
    try:
        bundle = engine.bundle if hasattr(engine, "bundle") else described_bundle(engine.choice)
        if bundle is None:
            return {}
        return {**model_defaults(bundle.info), **sampling_defaults(engine, bundle), **task.own_defaults(bundle.info)}
    except Exception:  # never stops a run: validating the options and loading the model say what is wrong
        return {}


def model_defaults(info: Any) -> dict[str, Any]:
    """`--prediction`: the model's own parameterization (eps or v; a flow model takes none)."""
    from ldmtool.checkpoints.bundle import PARAMETERIZATIONS

    kind = getattr(info.parameterization, "value", None)
    return {"prediction": kind} if kind in PARAMETERIZATIONS else {}


def sampling_defaults(engine: "Engine", bundle: Any) -> dict[str, Any]:
    """The sampling options' defaults, as `Engine.resolved` resolves them for the model `bundle` describes:
    each option's resolved value with it left out, kept only where giving that value resolves alike."""
    view = copy.copy(engine)  # the engine as it would be open, its other options as given
    view.bundle, view.flow = bundle, None
    flow = bundle.info.parameterization is Parameterization.FLOW

    def resolved(name: str, value: Any) -> dict[str, Any]:
        view.sampling = replace(engine.sampling, **{name: value})
        return view.resolved()

    defaults = {}
    for name in SAMPLING:
        if flow and name == "spacing":
            continue
        left_out = resolved(name, None)
        value = left_out.get(name)
        if value is not None:
            value = _option_type(name)(value)  # as the command line gives it: --cfg 7 is 7.0
            if resolved(name, value) == left_out:
                defaults[name] = value
    guidance = _flow_guidance(bundle) if flow else None
    return defaults if guidance is None else {**defaults, "guidance": guidance}


def _option_type(name: str) -> Any:
    """The type a sampling option's value has (int, float, str): `Optional[float]` -> float."""
    hint = typing.get_type_hints(SamplingChoice)[name]
    return next(arg for arg in typing.get_args(hint) if arg is not type(None))


def _flow_guidance(bundle: Any) -> Any:
    """The guidance input a guidance-distilled flow model takes when `--guidance` is left out (FlowRun.guidance);
    None for a network that takes none."""
    from ldmtool.families.registry import family_named
    from ldmtool.pipelines.flow_engine import GUIDANCE

    family = family_named(bundle.info.entry)
    if family is None or family.flow is None or not family.flow().takes_guidance(bundle):
        return None
    default = bundle.info.defaults.guidance
    return float(GUIDANCE if default is None else default)
