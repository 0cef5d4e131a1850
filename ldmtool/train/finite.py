"""Whether a training run has diverged: a loss, or a weight of the state about to be saved, that is not a
finite number. Past that point every step and export is garbage, so the run stops before saving it."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional

from ldmtool.errors import FatalError


def non_finite_metric(metrics: Mapping[str, float]) -> Optional[str]:
    """`name=value` of the first metric of a step (its loss terms) that is NaN or infinite, else None."""
    for name, value in metrics.items():
        if not math.isfinite(value):
            return f"{name}={value}"
    return None


def non_finite_tensor(state: Any, where: str = "") -> Optional[str]:
    """The name (`model/encoder.conv_in.weight`) of the first floating-point tensor in a training state
    (nested dicts and lists, as `Trainer.state` gives) holding a NaN or infinity, else None."""
    import torch

    if isinstance(state, torch.Tensor):
        finite = not state.is_floating_point() or bool(torch.isfinite(state).all())
        return None if finite else where
    items = state.items() if isinstance(state, Mapping) else enumerate(state) if isinstance(state, list) else ()
    for key, value in items:
        found = non_finite_tensor(value, f"{where}/{key}" if where else str(key))
        if found is not None:
            return found
    return None


def diverged(step: int, what: str, out: Path, saved: int) -> FatalError:
    """The error that stops a diverged run. It does not suggest --resume: resume is exact, so it would repeat
    the same steps to the same divergence."""
    kept = (f"{out} keeps step {saved}, but resuming repeats the same steps exactly: start a new run (a lower --lr)"
            if saved else "nothing trained yet, so nothing saved")
    return FatalError(f"training stopped at step {step}: {what}, so its weights are not saved; {kept}")
