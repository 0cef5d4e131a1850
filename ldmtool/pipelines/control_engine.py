"""`Engine.sample`'s side of ControlNet: the run's ControlNets placed before the UNet, acting in the steps
of `--control-start/--control-end`, and the hints put into the conditioning (packed to latent resolution,
so the tiled engine gives every tile its own crop at the first stage's factor)."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from ldmtool.addons.controlnet import ControlledNetwork, pack_features, pack_hint, step_window
from ldmtool.diffusion.cond import Cond
from ldmtool.diffusion.denoisers import DiscreteDenoiser
from ldmtool.diffusion.run import SamplerSettings, schedule_for
from ldmtool.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    from ldmtool.pipelines.engine import Engine

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L") that diffusers' users feed one-channel adapters


def controlled(engine: "Engine", settings: SamplerSettings, from_image: bool, hints: Sequence[torch.Tensor],
               cond: Cond, uncond: Optional[Cond]) -> tuple[ControlledNetwork, Cond, Optional[Cond]]:
    """Hints: one (B, 3, H, W) batch per ControlNet, then per T2I-Adapter."""
    control = engine.control
    assert control, "Engine.sample checks that the run has ControlNets or adapters"
    count = len(control.units)
    if len(hints) != count + len(control.adapters):
        raise ValueError(f"{len(hints)} hints for {count} ControlNets and {len(control.adapters)} adapters")
    device, dtype = engine.placement()
    down = engine.info.downsampling
    unet = engine.bundle.denoiser
    assert unet is not None, "a model that samples has a denoiser"
    actives = []
    if count:
        alphas = engine._alphas_cumprod()
        schedule = schedule_for(settings, alphas, from_image=from_image)
        timesteps = DiscreteDenoiser.from_bundle(engine.bundle).timestep(schedule.sigmas[:-1])
        acts = step_window([float(t) for t in timesteps], control.start, control.end)
        actives = [replace(entry, acts=acts) for entry in control.open(engine)]
        packed = torch.cat([pack_hint(h.to(device, dtype), down) for h in hints[:count]], dim=1)
        on = torch.ones(packed.shape[0], count, device=device)
        cond = replace(cond, control=packed, control_scale=on)
        if uncond is not None:
            soft = control.mode == "control"  # "ControlNet is more important": no control on uncond
            uncond = replace(uncond, control=packed, control_scale=on * 0 if soft else on)
    widths: list[int] = []
    factors: list[int] = []
    if control.adapters:
        adapters = control.open_adapters(engine)
        named = [(unit.path.name, adapter) for unit, (adapter, _) in zip(control.adapters, adapters)]
        check_adapters_fit(named, unet, hints[count], down, dtype)
        features = adapter_features(adapters, hints[count:], device, dtype)
        latent_height = hints[count].shape[-2] // down
        widths, factors = [f.shape[1] for f in features], [latent_height // f.shape[-2] for f in features]
        packed_features = pack_features(features, factors)
        cond = replace(cond, adapter=packed_features)
        uncond = None if uncond is None else replace(uncond, adapter=packed_features)
    return ControlledNetwork(unet, actives, down=down, adapter_widths=widths, adapter_factors=factors), cond, uncond


def adapter_features(adapters: Sequence[tuple[Any, float]], hints: Sequence[torch.Tensor], device: Any,
                     dtype: torch.dtype) -> list[torch.Tensor]:
    """The weighted sum of every T2I-Adapter's features for its hints, computed once per image (not per step)."""
    total: Optional[list[torch.Tensor]] = None
    for (adapter, weight), hint in zip(adapters, hints):
        hint = hint.to(device, dtype)
        if getattr(adapter, "in_channels", 3) == 1 and hint.shape[1] == 3:  # canny, sketch: a grey hint
            hint = (hint * torch.tensor(LUMA, device=device, dtype=dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
        features = [f * weight for f in adapter(hint)]
        total = features if total is None else [a + b for a, b in zip(total, features)]
    assert total is not None, "called with at least one adapter"
    return total


def check_adapters_fit(adapters: Sequence[tuple[str, Any]], unet: Any, hint: torch.Tensor, down: int,
                       dtype: torch.dtype) -> None:
    """CheckpointError naming a T2I-Adapter made for another model: its features (widths, and scales from the
    latent) are not those of the UNet's places that take them. Checked on the meta device, computing nothing."""
    from torch.func import functional_call

    from ldmtool.nets.unet import adapter_slots

    slots = adapter_slots(unet.input_blocks)
    latent_height = hint.shape[-2] // down
    for name, adapter in adapters:
        probe = torch.empty(1, getattr(adapter, "in_channels", 3), *hint.shape[-2:], dtype=dtype, device="meta")
        tensors = {name: torch.empty_like(t, device="meta") for name, t in
                   [*adapter.named_parameters(), *adapter.named_buffers()]}
        features = [(f.shape[1], latent_height // f.shape[-2]) for f in functional_call(adapter, tensors, (probe,))]
        wanted = slots + [slots[-1]] * (len(features) - len(slots))  # one more goes after the middle block
        if features != wanted[:len(features)]:
            raise CheckpointError(f"{name}: a T2I-Adapter for another model (features {features} as (width, latent "
                                  f"scale); the model takes {slots})")


def check_adapter_cells(tiling: Any, latent_hw: tuple[int, int], align: int) -> None:
    """A tiled run with a T2I-Adapter starts its tiles on the `align`-latent-pixel cells of the adapter's
    features: a UsageError when a tile is too small to overlap its neighbour by whole cells."""
    if align == 1:
        return
    if any(size < length and size // align <= -(-tiling.overlap // align) for size, length in zip(tiling.tile, latent_hw)):
        raise UsageError(f"--adapter: tiles start on the {align}-latent-pixel cells of the T2I-Adapter's features, "
                         f"so a tile of {max(tiling.tile)} cannot overlap by {tiling.overlap}; use a larger --tile")
