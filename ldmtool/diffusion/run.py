"""One call from settings to latents: schedule, start latent, img2img strength, masked sampling, sampler.

Pipelines hand in a denoiser that already accepts their conditioning (for guidance, `CFGDenoiser(...)`,
usually inside the tiled engine), the model's `alphas_cumprod` and a `NoiseSource` with one seed per item.
Noise is drawn in a fixed order per item (start noise, then the sampler's and the mask's draws as they
come), so an item's result does not depend on the batch it runs in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from ldmtool.diffusion.cond import Cond, Guided
from ldmtool.diffusion.denoisers import bind
from ldmtool.diffusion.handoff import Handoff, split
from ldmtool.diffusion.img2img import img2img_schedule, noised_latent
from ldmtool.diffusion.masked import masked_model
from ldmtool.diffusion.samplers import Step, default_schedule, sample, start_latent
from ldmtool.diffusion.schedules import SamplingSchedule, discrete_sigmas
from ldmtool.runtime.seeds import NoiseSource


@dataclass(frozen=True)
class SamplerSettings:
    sampler: str = "ddim"
    steps: Optional[int] = None  # None: the sampler's recommended count
    karras: Optional[bool] = None  # None: the sampler's default spacing
    eta: Optional[float] = None  # ddim / euler_a only; None: the sampler's default
    strength: float = 1.0  # img2img / masked: the fraction of the schedule that runs (see img2img.py)
    # Scale of the starting noise when sampling from noise (not from an image): below 1 the sample moves
    # towards the mode, trading invented detail for fidelity (the "temperature" of SR3 / SRFlow).
    temperature: float = 1.0
    # One side of a base -> refiner hand-off (diffusion/handoff.py) of the schedule `strength` runs; the second
    # side starts from the first side's latent as it is (`start`, not noised).
    handoff: Optional[Handoff] = None
    spacing: Optional[str] = None  # schedules.Spacing name; None: the sampler's (or --karras)
    tcd_gamma: Optional[float] = None  # tcd only; None: the sampler's default


def schedule_for(settings: SamplerSettings, alphas_cumprod: torch.Tensor, *, from_image: bool) -> SamplingSchedule:
    """The schedule these settings run: the sampler's default, cut by strength when starting from an image,
    then split at a hand-off (diffusers' img2img `denoising_end`: the strength's steps above the cut-off)."""
    schedule = default_schedule(settings.sampler, alphas_cumprod, settings.steps, karras=settings.karras,
                                spacing=settings.spacing)
    if from_image or settings.handoff is not None:  # a hand-off's second side: strength 1 leaves it whole
        schedule = img2img_schedule(schedule, settings.strength)
    return schedule if settings.handoff is None else split(schedule, alphas_cumprod, settings.handoff)


def sample_latents(
    denoise: Callable[..., torch.Tensor],
    cond: Union[Cond, Guided, None],
    alphas_cumprod: torch.Tensor,
    noise: NoiseSource,
    settings: SamplerSettings,
    *,
    shape: Optional[Sequence[int]] = None,
    init_latent: Optional[torch.Tensor] = None,
    repaint: Optional[torch.Tensor] = None,
    start: Optional[torch.Tensor] = None,
    callback: Optional[Callable[[Step], None]] = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sample one batch of latents (VE form, unscaled by the first stage's scale factor).

    txt2img: give `shape` (C, h, w). img2img: give `init_latent` (B, C, h, w) and settings.strength.
    Masked sampling: also give `repaint` (B, 1, h, w), 1 = repaint, at latent resolution.
    A hand-off's second side: give `start`, the first side's latent (with the same `noise`, so stochastic
    samplers continue each item's stream instead of drawing its first values again).
    """
    if start is not None and (settings.handoff is None or settings.handoff.first):
        raise ValueError("a start latent is the second side of a hand-off")
    if init_latent is None and shape is None and start is None:
        raise ValueError("sample_latents needs a latent shape or an initial latent")
    if repaint is not None and init_latent is None:
        raise ValueError("masked sampling needs the initial latent of the image it keeps")
    schedule = schedule_for(settings, alphas_cumprod, from_image=init_latent is not None)
    if start is not None:
        x = start  # the first model's latent, already at this schedule's first noise level
    elif init_latent is None:
        assert shape is not None
        x = start_latent(noise.randn(shape, device=device, dtype=dtype).mul_(settings.temperature), float(schedule.sigmas[0]))
    else:
        x = noised_latent(init_latent, schedule, noise.like(init_latent))
    model = bind(denoise, cond)
    if repaint is not None:
        model = masked_model(model, init_latent, repaint, noise.like)
    return sample(settings.sampler, model, x, schedule.sigmas, noise=noise.like, callback=callback, eta=settings.eta,
                  tcd_gamma=settings.tcd_gamma, model_sigmas=discrete_sigmas(alphas_cumprod))
