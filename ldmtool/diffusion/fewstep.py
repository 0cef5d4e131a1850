"""The timestep arithmetic of the few-step samplers `lcm` and `tcd` (samplers.py), for distilled models.

Both are defined on a discrete model's training timesteps, not on sigma alone: LCM's boundary condition is a
function of the timestep, and TCD's intermediate point is a fraction of the next timestep. So these samplers
take the model's sigma table (`model_sigmas`, ascending in t, as `discrete_sigmas` gives it) and find the
timestep of each sigma in it; a schedule's own sigmas are exact table entries, so the timesteps are the
reference's integers.
"""
from __future__ import annotations

import math

import torch

from ldmtool.diffusion.schedules import sigma_to_t

# LCM's consistency boundary condition (Luo et al. 2023, eq. 5 with Song et al. 2023's c_skip/c_out):
# sigma_data 0.5 and the timestep scaled by 10, the values diffusers' LCMScheduler defaults to.
_SIGMA_DATA = 0.5
_TIMESTEP_SCALING = 10.0


def timestep_of(sigma: float, model_sigmas: torch.Tensor) -> float:
    """The training timestep of `sigma` (fractional between table entries; 0 for sigma 0)."""
    if sigma == 0:
        return 0.0
    t = float(sigma_to_t(torch.tensor([sigma], dtype=torch.float64), model_sigmas.double().log())[0])
    return float(round(t)) if abs(t - round(t)) < 1e-3 else t


def consistency_scalings(timestep: float) -> tuple[float, float]:
    """(c_skip, c_out) of the LCM boundary condition at a training timestep: the consistency function is
    c_skip x_vp + c_out x0, which is x_vp at t = 0 and (almost exactly) x0 at the timesteps LCM samples."""
    scaled = timestep * _TIMESTEP_SCALING
    return _SIGMA_DATA**2 / (scaled**2 + _SIGMA_DATA**2), scaled / math.sqrt(scaled**2 + _SIGMA_DATA**2)


def tcd_sigma(sigma_next: float, gamma: float, model_sigmas: torch.Tensor) -> float:
    """The noise level TCD's deterministic move goes down to (Zheng et al. 2024, "strategic stochastic
    sampling"): the model sigma at timestep floor((1 - gamma) t_next), below sigma_next for gamma > 0; the
    rest of the way back up to sigma_next is fresh noise. Gamma 0 is DDIM; gamma 1 goes to the clean x0."""
    if sigma_next == 0:
        return 0.0
    # In float32, as the reference computes it: (1 - 0.3) * 10 is 7 there but 6.99... in float64.
    t_s = int(torch.floor((1 - gamma) * torch.tensor(timestep_of(sigma_next, model_sigmas), dtype=torch.float32)))
    return float(model_sigmas[t_s])
