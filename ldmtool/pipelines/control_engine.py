"""`Engine.sample`'s side of ControlNet: the run's ControlNets placed before the UNet, acting in the steps
of `--control-start/--control-end`, and the hints put into the conditioning (packed to latent resolution,
so the tiled engine gives every tile its own 8x crop)."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from ldmtool.addons.controlnet import ControlledNetwork, pack_hint, step_window
from ldmtool.diffusion.cond import Cond
from ldmtool.diffusion.denoisers import DiscreteDenoiser
from ldmtool.diffusion.run import SamplerSettings, schedule_for

if TYPE_CHECKING:
    from ldmtool.pipelines.engine import Engine


def controlled(engine: "Engine", settings: SamplerSettings, from_image: bool, hints: Sequence[torch.Tensor],
               cond: Cond, uncond: Optional[Cond]) -> tuple[ControlledNetwork, Cond, Optional[Cond]]:
    control = engine.control
    assert control is not None and control.units, "Engine.sample checks that the run has ControlNets"
    if len(hints) != len(control.units):
        raise ValueError(f"{len(hints)} hints for {len(control.units)} ControlNets")
    alphas = engine._alphas_cumprod()
    schedule = schedule_for(settings, alphas, from_image=from_image)
    timesteps = DiscreteDenoiser.from_bundle(engine.bundle).timestep(schedule.sigmas[:-1])
    acts = step_window([float(t) for t in timesteps], control.start, control.end)
    down = engine.info.downsampling
    actives = [replace(entry, acts=acts) for entry in control.open(engine)]
    unet = engine.bundle.denoiser
    assert unet is not None, "a model that samples has a denoiser"
    network = ControlledNetwork(unet, actives, down=down)
    device, dtype = engine.placement()
    packed = torch.cat([pack_hint(h.to(device, dtype), down) for h in hints], dim=1)
    rows, units = packed.shape[0], len(actives)
    on = torch.ones(rows, units, device=device)
    cond = replace(cond, control=packed, control_scale=on)
    if uncond is not None:
        soft = control.mode == "control"  # "ControlNet is more important": no control on uncond
        uncond = replace(uncond, control=packed, control_scale=on * 0 if soft else on)
    return network, cond, uncond
