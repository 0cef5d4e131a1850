"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

`CFGDenoiser(inner)(x, sigma, Guided(cond, uncond, scale))` runs the conditional and unconditional
conditioning through the network in ONE batch ([uncond, cond]) and returns uncond + scale (cond - uncond).
Negative prompts are the same thing: the negative prompt's conditioning is the `uncond`. Guidance is
applied to the x0 prediction; for eps and v networks x0 is affine in the output at a fixed sigma, so this
equals guiding eps (or v) as the reference scripts do. Scale 1 (or no uncond) skips the unconditional pass
and returns exactly the conditional prediction. A plain `Cond` passes straight through.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ldmtool.diffusion.cond import Cond, Guided


def cat_conds(first: Cond, second: Cond) -> Cond:
    """Two conditionings as one batch (first, then second); both must carry the same fields."""
    fields: dict[str, Optional[torch.Tensor]] = {}
    for name in ("crossattn", "concat", "y", "control", "control_scale", "adapter", "position"):
        a, b = getattr(first, name), getattr(second, name)
        if (a is None) != (b is None):
            raise ValueError(f"conditional and unconditional conditioning differ: only one has {name!r}")
        if a is not None and a.shape != b.shape:
            raise ValueError(f"{name!r} shapes {tuple(a.shape)} and {tuple(b.shape)} cannot share a batch")
        fields[name] = None if a is None else torch.cat([a, b])
    return Cond(crossattn=fields["crossattn"], concat=fields["concat"], y=fields["y"], control=fields["control"],
                control_scale=fields["control_scale"], adapter=fields["adapter"], position=fields["position"])


class CFGDenoiser:
    """Wraps `denoise(x, sigma, cond) -> x0` so that `cond` may be a `Guided` record."""

    def __init__(self, inner: Callable[[torch.Tensor, torch.Tensor, Optional[Cond]], torch.Tensor]):
        self.inner = inner

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Union[Cond, Guided, None]) -> torch.Tensor:
        if not isinstance(cond, Guided):
            return self.inner(x, sigma, cond)
        if cond.uncond is None or cond.scale == 1:
            return self.inner(x, sigma, cond.cond)
        both = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_conds(cond.uncond, cond.cond))
        uncond_x0, cond_x0 = both.chunk(2)
        return uncond_x0 + cond.scale * (cond_x0 - uncond_x0)
