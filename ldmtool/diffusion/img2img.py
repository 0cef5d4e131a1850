"""img2img: where on the schedule a strength starts, and the noised starting latent.

Rule (the same as diffusers' img2img): with an n-step schedule and strength s in [0, 1], the LAST
k = floor(s * n) steps run, and the encoded latent z is noised to the first of them, x = z + sigma * noise
with sigma = sigmas[n - k]. So s = 1 runs every step from the top of the schedule (almost pure noise) and
s = 0 runs none and returns z unchanged. (The CompVis img2img script noises one step above the first step
it runs; here the noise level always matches the step that sees it.)
"""
from __future__ import annotations

import math

import torch

from ldmtool.diffusion.schedules import SamplingSchedule
from ldmtool.errors import UsageError


def strength_steps(steps: int, strength: float) -> int:
    """How many of `steps` run for this strength: floor(strength * steps), robust to float round-off."""
    if not 0.0 <= strength <= 1.0 or math.isnan(strength):
        raise UsageError(f"--strength {strength} is out of range: use a value from 0 (keep the image) to 1 (repaint fully)")
    return min(steps, math.floor(strength * steps + 1e-9))


def img2img_schedule(schedule: SamplingSchedule, strength: float) -> SamplingSchedule:
    """The part of `schedule` that img2img runs at this strength."""
    return schedule.tail(strength_steps(schedule.steps, strength))


def noised_latent(latent: torch.Tensor, schedule: SamplingSchedule, noise: torch.Tensor) -> torch.Tensor:
    """The starting x for a (tail) schedule: the latent noised to its first sigma (VE form)."""
    return latent + float(schedule.sigmas[0]) * noise
