"""Noise schedules: training betas, inference timestep spacings and the sigma arrays samplers walk.

Everything here is in the variance-exploding (VE) form the samplers use: a discrete VP model trained with
`alphas_cumprod[t]` sees noise level sigma_t = sqrt((1 - a_t) / a_t). A *sampling schedule* is a descending
sigma array of length steps + 1 that ends in 0 (or, for the reference CompVis DDIM/PLMS, in the sigma of
the first training step), plus, for discrete models, the training timestep that each sigma stands for.

Spacings (T training steps, n sampling steps; timesteps listed from noisiest to cleanest):
  uniform   CompVis DDIM/PLMS: range(0, T, T // n) + 1. When n does not divide T this gives *more* than n
            steps (e.g. 31 for n = 30), exactly like the reference scripts.
  quad      CompVis DDIM "quad": (linspace(0, sqrt(0.8 T), n) ** 2).astype(int) + 1.
  leading   diffusers: arange(n) * (T // n) + offset (offset = `steps_offset`, 1 for Stable Diffusion).
  trailing  diffusers: round(arange(T, 0, -T / n)) - 1.
  linspace  diffusers: round(linspace(0, T - 1, n)) (k-diffusion's default uses the same points unrounded).
  karras    Karras et al. 2022 (eq. 5), rho = 7, between the model's smallest and largest sigma.
  lcm       diffusers' LCM/TCD schedulers: n of the 50 distillation timesteps k - 1, 2k - 1, ..., T - 1
            (k = T // 50), taken at floor(linspace(0, 50, n, endpoint=False)) from the noisiest.
  sgm_uniform  A1111/ComfyUI "SGM Uniform": fractional timesteps linspace(T - 1, 0, n + 1) without the last,
            sigmas interpolated in log-sigma (the spacing SDXL-Lightning's card recommends in ComfyUI).
  simple    A1111/ComfyUI "Simple": every (T / n)-th model sigma from the noisiest, index int(i T / n).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Optional

import numpy as np
import torch

from ldmtool.errors import UsageError


class BetaSchedule(str, Enum):
    LINEAR = "linear"  # CompVis LDM "linear": betas = linspace(sqrt(start), sqrt(end), T) ** 2
    SCALED_LINEAR = "scaled_linear"  # the same schedule under its diffusers name
    PLAIN_LINEAR = "plain_linear"  # betas = linspace(start, end, T) (diffusers "linear")
    COSINE = "cosine"  # Nichol & Dhariwal 2021, as CompVis `make_beta_schedule("cosine")`
    SQRT = "sqrt"  # betas = sqrt(linspace(start, end, T)) (CompVis "sqrt")


class Spacing(str, Enum):
    UNIFORM = "uniform"
    QUAD = "quad"
    LEADING = "leading"
    TRAILING = "trailing"
    LINSPACE = "linspace"
    KARRAS = "karras"
    LCM = "lcm"
    SGM_UNIFORM = "sgm_uniform"
    SIMPLE = "simple"


class FinalSigma(str, Enum):
    ZERO = "zero"  # end at the clean sample (diffusers `set_alpha_to_one=True`, k-diffusion)
    FIRST = "first"  # end at sigma of training step 0 (CompVis DDIM/PLMS, `set_alpha_to_one=False`)


def make_betas(
    kind: BetaSchedule | str,
    timesteps: int = 1000,
    start: float = 0.00085,
    end: float = 0.012,
    cosine_s: float = 8e-3,
) -> torch.Tensor:
    """Training betas (float64, shape (T,)) for the named schedule."""
    kind = BetaSchedule(kind)
    if kind in (BetaSchedule.LINEAR, BetaSchedule.SCALED_LINEAR):
        return torch.linspace(start**0.5, end**0.5, timesteps, dtype=torch.float64) ** 2
    if kind is BetaSchedule.PLAIN_LINEAR:
        return torch.linspace(start, end, timesteps, dtype=torch.float64)
    if kind is BetaSchedule.SQRT:
        return torch.linspace(start, end, timesteps, dtype=torch.float64) ** 0.5
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + cosine_s
    alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
    alphas = alphas / alphas[0]
    return (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1 - betas.double(), dim=0)


def discrete_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VE noise level of every training step, ascending in t (float64)."""
    a = alphas_cumprod.detach().double().cpu()
    return ((1 - a) / a).sqrt()


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional training timestep of each sigma: linear interpolation in log-sigma (float64).

    Sigmas outside the model's range clamp to t = 0 or t = T - 1.
    """
    log_sigma = sigma.detach().double().cpu().clamp_min(1e-10).log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    w = (log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
    return low.double() + w.clamp(0, 1)


def t_to_sigma(t: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Inverse of `sigma_to_t`: sigma at a (fractional) timestep, interpolated in log-sigma."""
    t = t.detach().double().cpu().clamp(0, len(log_sigmas) - 1)
    low = t.floor().long().clamp(max=len(log_sigmas) - 2)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def spaced_timesteps(spacing: Spacing | str, steps: int, train_steps: int, offset: int = 0) -> torch.Tensor:
    """Integer training timesteps for `steps` sampling steps, descending (noisiest first)."""
    spacing = Spacing(spacing)
    _check_steps(spacing, steps, train_steps)
    if spacing is Spacing.UNIFORM:
        ts = np.arange(0, train_steps, train_steps // steps) + 1
    elif spacing is Spacing.QUAD:
        ts = (np.linspace(0, math.sqrt(train_steps * 0.8), steps) ** 2).astype(np.int64) + 1
    elif spacing is Spacing.LEADING:
        ts = np.arange(steps) * (train_steps // steps) + offset
    elif spacing is Spacing.TRAILING:
        ts = np.round(np.arange(train_steps, 0, -train_steps / steps)).astype(np.int64)[::-1] - 1
    elif spacing is Spacing.LINSPACE:
        ts = np.round(np.linspace(0, train_steps - 1, steps))
    elif spacing is Spacing.LCM:
        distilled = np.arange(1, _LCM_STEPS + 1) * (train_steps // _LCM_STEPS) - 1
        ts = distilled[::-1][np.floor(np.linspace(0, _LCM_STEPS, steps, endpoint=False)).astype(np.int64)][::-1].copy()
    elif spacing is Spacing.SIMPLE:
        ts = (train_steps - 1 - (np.arange(steps) * (train_steps / steps)).astype(np.int64))[::-1].copy()
    else:
        raise ValueError(f"{spacing.value} sigmas have no integer timesteps; use sampling_schedule")
    timesteps = torch.from_numpy(np.ascontiguousarray(ts, dtype=np.int64)).flip(0)
    if int(timesteps.max()) >= train_steps or int(timesteps.min()) < 0:
        raise UsageError(f"{steps} steps with {spacing.value!r} spacing fall outside the model's {train_steps} timesteps")
    if len(timesteps.unique()) != len(timesteps):
        raise UsageError(f"{steps} steps with {spacing.value!r} spacing repeat timesteps; use fewer steps or another spacing")
    return timesteps


# The distillation schedule of LCM and TCD: 50 steps (`original_inference_steps` of their schedulers).
_LCM_STEPS = 50


def _check_steps(spacing: Spacing, steps: int, train_steps: int) -> None:
    limit = train_steps - 1 if spacing in (Spacing.UNIFORM, Spacing.QUAD) else train_steps
    if spacing is Spacing.LCM:
        limit = min(_LCM_STEPS, train_steps)
    if not 1 <= steps <= limit:
        raise UsageError(f"--steps {steps} is out of range: {spacing.value!r} spacing allows 1 to {limit} steps")


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: `steps` sigmas from sigma_max down to sigma_min (float64, no final 0)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


@dataclass(frozen=True)
class SamplingSchedule:
    """What a sampler walks: `sigmas` (steps + 1,) descending float64; `timesteps` (steps,) or None."""

    sigmas: torch.Tensor
    timesteps: Optional[torch.Tensor] = None

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def head(self, steps: int) -> "SamplingSchedule":
        """The first `steps` steps (a base model hands the rest to a refiner)."""
        ts = None if self.timesteps is None else self.timesteps[:steps]
        return SamplingSchedule(self.sigmas[: steps + 1], ts)

    def tail(self, steps: int) -> "SamplingSchedule":
        """The last `steps` steps (img2img starts part-way down the schedule)."""
        ts = None if self.timesteps is None else self.timesteps[len(self.timesteps) - steps :]
        return SamplingSchedule(self.sigmas[len(self.sigmas) - steps - 1 :], ts)


def sampling_schedule(
    alphas_cumprod: torch.Tensor,
    steps: int,
    spacing: Spacing | str = Spacing.UNIFORM,
    *,
    offset: int = 0,
    final: FinalSigma | str = FinalSigma.ZERO,
    rho: float = 7.0,
) -> SamplingSchedule:
    """The sigma array (and timesteps) for a discrete-time model with these `alphas_cumprod`."""
    spacing, final = Spacing(spacing), FinalSigma(final)
    model_sigmas = discrete_sigmas(alphas_cumprod)
    if spacing is Spacing.KARRAS:
        if steps < 1:
            raise UsageError(f"--steps {steps} is out of range: at least 1 step is needed")
        sigmas = karras_sigmas(steps, float(model_sigmas[0]), float(model_sigmas[-1]), rho)
        timesteps = sigma_to_t(sigmas, model_sigmas.log())
    elif spacing is Spacing.SGM_UNIFORM:
        _check_steps(spacing, steps, len(model_sigmas))
        timesteps = torch.linspace(len(model_sigmas) - 1, 0, steps + 1, dtype=torch.float64)[:-1]
        sigmas = t_to_sigma(timesteps, model_sigmas.log())
    else:
        timesteps = spaced_timesteps(spacing, steps, len(model_sigmas), offset)
        sigmas = model_sigmas[timesteps]
    last = 0.0 if final is FinalSigma.ZERO else min(float(model_sigmas[0]), float(sigmas[-1]))  # karras: rounding
    return SamplingSchedule(torch.cat([sigmas, sigmas.new_tensor([last])]), timesteps)


def karras_schedule(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> SamplingSchedule:
    """Karras sigmas for a continuous-time (VE) denoiser, ending in 0."""
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    return SamplingSchedule(torch.cat([sigmas, sigmas.new_zeros(1)]))
