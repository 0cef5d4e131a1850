"""Base → refiner hand-off (SDXL's "ensemble of experts"): one schedule, split where the timesteps fall
below a cut-off; the first model runs the steps above it and returns its latent still noisy, the second runs
the rest from that latent as it is (no fresh noise), so together they walk the schedule one model would.

Rule (the same as diffusers' `denoising_end` / `denoising_start`): with T training timesteps and hand-off
fraction a, the cut-off is t_c = round(T - a * T); the first model runs the steps at t >= t_c. A schedule
without integer timesteps (Karras sigmas) is cut at the noise level of t_c instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ldmtool.diffusion.schedules import SamplingSchedule
from ldmtool.errors import UsageError


@dataclass(frozen=True)
class Handoff:
    at: float  # the fraction of the schedule (in training timesteps) the first model runs, in (0, 1)
    first: bool  # True: the steps before the hand-off; False: the steps after it

    def __post_init__(self) -> None:
        if not 0.0 < self.at < 1.0:
            raise UsageError(f"--refiner-at {self.at}: must be between 0 and 1 (0.8: the refiner runs the last 20%)")


def first_model_steps(schedule: SamplingSchedule, alphas_cumprod: torch.Tensor, at: float) -> int:
    """How many of the schedule's steps come before the hand-off."""
    total = len(alphas_cumprod)
    cutoff = min(total - 1, max(0, round(total - at * total)))
    if schedule.timesteps is not None:
        return int((schedule.timesteps >= cutoff).sum())
    ac = float(alphas_cumprod[cutoff])
    return int((schedule.sigmas[:-1] >= ((1 - ac) / ac) ** 0.5).sum())


def split(schedule: SamplingSchedule, alphas_cumprod: torch.Tensor, handoff: Handoff) -> SamplingSchedule:
    """The part of `schedule` one side of the hand-off runs."""
    steps = first_model_steps(schedule, alphas_cumprod, handoff.at)
    return schedule.head(steps) if handoff.first else schedule.tail(schedule.steps - steps)
