"""Rectified-flow models (velocity prediction) in the shared denoiser form: time shifts, schedules, sampling.

A flow model is trained on x_t = (1 - t) x0 + t noise, t in [0, 1], and predicts the velocity v = noise - x0.
With sigma = t / (1 - t) the same state in the VE form the samplers walk is x = x_t / (1 - t) = x0 + sigma
noise, so `FlowDenoiser` reads x_t = x / (1 + sigma), t = sigma / (1 + sigma) and returns x0 = x_t - t v.
Every sampler then integrates the flow model's own ODE. Euler in this form is the flow Euler step
x_t' = x_t + (t' - t) v exactly: both land on (1 - t') x0 + t' eps with the step's x0 and eps = x_t + (1 - t) v.

Pure noise, t = 1, is sigma = inf, where x itself is infinite. There the state is carried as its finite
limit x / (1 + sigma) = x_t (the noise itself); `FlowDenoiser`, guidance and the tiled engine pass it through
unchanged, and `progressive_flow` takes the step from t = 1 as the limit that every first-order step has
there, x' = x0 + sigma' x_t (the flow Euler step), before the chosen sampler walks the rest of the schedule.

Samplers: every one registered when flow models arrived is valid for them. The deterministic ones (euler,
ddim with eta 0, which is euler here, heun, dpmpp_2m, unipc, plms) solve the flow ODE at their order; the
ancestral and SDE ones (euler_a, ddpm, ddim with eta > 0, dpmpp_2m_sde) re-inject noise by the VE posterior
rule, which is exact for the flow model's marginals too (its forward process is x0 + sigma noise in this
form), but is not the rule ComfyUI's "RF" ancestral samplers or diffusers' `stochastic_sampling` use (those
redraw all noise in the flow form), so their images differ from those references'. A sampler added later
joins `FLOW_SAMPLERS` once it is tested here (consistency samplers fit only models distilled for them).

img2img uses the tool's strength rule (img2img.py: floor(n s) steps run); diffusers' flow img2img pipelines
run n - int(n - n s), which is the same whenever n s is whole and one step more otherwise.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ldmtool.diffusion.cond import Cond, Guided
from ldmtool.diffusion.denoisers import bind
from ldmtool.diffusion.img2img import img2img_schedule
from ldmtool.diffusion.masked import masked_model
from ldmtool.diffusion.run import SamplerSettings
from ldmtool.diffusion.samplers import Step, check_options, get_sampler, progressive
from ldmtool.diffusion.schedules import SamplingSchedule
from ldmtool.errors import UsageError
from ldmtool.runtime.seeds import NoiseSource

FlowNetwork = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # network(x_t, t, cond) -> velocity
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]

FLOW_SAMPLERS: tuple[str, ...] = ("euler", "euler_a", "ddim", "ddpm", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "plms")
TRAIN_STEPS = 1000  # the references' num_train_timesteps; the network's timestep is t * 1000 where it wants one


def flow_sigmas(t: torch.Tensor) -> torch.Tensor:
    """VE noise levels of flow times (float64; t = 1 gives inf)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.where(t >= 1, torch.full_like(t, math.inf), t / (1 - t))


def flow_times(sigmas: torch.Tensor) -> torch.Tensor:
    """Flow times of VE noise levels (float64; inf gives 1)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    return torch.where(torch.isinf(sigmas), torch.ones_like(sigmas), sigmas / (1 + sigmas))


class FlowDenoiser:
    """`denoise(x, sigma, cond) -> x0` over a velocity network `network(x_t, t, cond)`, t (B,) in [0, 1]."""

    def __init__(self, network: FlowNetwork):
        self.network = network

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Union[Cond, Any, None] = None) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        t = flow_times(sigma.detach().cpu())
        # At sigma = inf the state already is x_t (see the module docstring); elsewhere x_t = x (1 - t).
        scale = torch.where(t >= 1, torch.ones_like(t), 1 - t)
        t, scale = (v.to(device=x.device, dtype=work).reshape(_column(x)) for v in (t, scale))
        x_t = x.to(work) * scale
        velocity = self.network(x_t.to(x.dtype), t.flatten(), cond).to(work)
        return (x_t - t * velocity).to(x.dtype)


def _column(x: torch.Tensor) -> tuple[int, ...]:
    return (-1, *([1] * (x.dim() - 1)))


# --- time shifts and schedules ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeShift:
    """How a flow model's sampling times lean towards noise: t' = s t / (1 + (s - 1) t).

    A static factor `shift` (3.0 for the MMDiT models' references; 1.0 is no shift), or the exponential
    time shift e^mu / (e^mu + 1/t - 1) with a resolution-dependent `mu` (`resolution_mu`), which is the same
    map with s = e^mu.
    """

    shift: float = 1.0
    mu: Optional[float] = None

    @property
    def factor(self) -> float:
        return math.exp(self.mu) if self.mu is not None else self.shift

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        s = self.factor
        return s * t / (1 + (s - 1) * t)

    def recorded(self) -> dict[str, float]:
        """What a run records of the shift it sampled with."""
        return {"mu": round(self.mu, 6)} if self.mu is not None else {"shift": self.shift}


def resolution_mu(image_tokens: int, *, base_tokens: int = 256, max_tokens: int = 4096,
                  base_mu: float = 0.5, max_mu: float = 1.15) -> float:
    """The exponential time shift's mu, linear in the image's token count through (base, base_mu) and
    (max, max_mu) and extended beyond them (the references' `calculate_shift`)."""
    slope = (max_mu - base_mu) / (max_tokens - base_tokens)
    return base_mu + slope * (image_tokens - base_tokens)


def image_tokens(latent_hw: tuple[int, int], patch: int = 2) -> int:
    """How many patch tokens a latent of this size is (the sequence length the resolution shift reads)."""
    return (latent_hw[0] // patch) * (latent_hw[1] // patch)


class FlowSpacing(str, Enum):
    """Unshifted times of an n-step schedule, noisiest first (then shifted, then a final 0 appended).

    train-range  linspace(1, shift(1/T), n): diffusers' FlowMatchEulerDiscreteScheduler called with a step
                 count only (its range is that of its shifted training sigmas; a resolution shift's range is
                 unshifted, 1/T).
    uniform      linspace(1, 1/n, n): the sigmas the pipelines with a resolution shift pass in.
    """

    TRAIN_RANGE = "train-range"
    UNIFORM = "uniform"


@dataclass(frozen=True)
class FlowTimes:
    """What fixes a flow model's sampling times besides the step count."""

    shift: TimeShift = TimeShift()
    spacing: FlowSpacing = FlowSpacing.TRAIN_RANGE
    train_steps: int = TRAIN_STEPS

    def recorded(self) -> dict[str, Any]:
        return {"parameterization": "flow", **self.shift.recorded(), "flow_spacing": self.spacing.value}


def flow_schedule(steps: int, times: FlowTimes = FlowTimes()) -> SamplingSchedule:
    """The VE sigmas (steps + 1, the first inf, the last 0) and the reference timesteps t * T (steps,)."""
    if steps < 1:
        raise UsageError(f"--steps {steps} is out of range: at least 1 step is needed")
    if times.spacing is FlowSpacing.UNIFORM:
        t = np.linspace(1.0, 1.0 / steps, steps)
    else:
        lowest = torch.tensor(1.0 / times.train_steps, dtype=torch.float64)
        if times.shift.mu is None:
            lowest = times.shift(lowest)
        t = np.linspace(1.0, float(lowest), steps)
    shifted = times.shift(torch.from_numpy(t))
    sigmas = torch.cat([flow_sigmas(shifted), shifted.new_zeros(1)])
    return SamplingSchedule(sigmas, shifted * times.train_steps)


# --- sampling ---------------------------------------------------------------------------------------------


def check_flow_sampler(name: str) -> str:
    """The registered name of a sampler a flow model can run; UsageError naming the others."""
    info = get_sampler(name)
    if info.name not in FLOW_SAMPLERS:
        raise UsageError(f"--sampler {name} does not apply to flow-matching models (choose one of {', '.join(FLOW_SAMPLERS)})")
    return info.name


def progressive_flow(name: str, model: Model, x: torch.Tensor, sigmas: Union[torch.Tensor, Sequence[float]], *,
                     noise: Optional[NoiseFn] = None, **opts: Any) -> Iterator[Step]:
    """The named sampler over a flow schedule; from sigma = inf (x holds the noise x_t) the first step is the
    flow Euler step, and the sampler starts afresh at the next sigma."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    check_options(check_flow_sampler(name), **opts)  # here too: a one-step run never reaches the sampler
    if not math.isinf(float(sigmas[0])):
        yield from progressive(name, model, x, sigmas, noise=noise, **opts)
        return
    total, sigma_next = len(sigmas) - 1, float(sigmas[1])
    denoised = model(x, torch.full((x.shape[0],), math.inf, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device))
    x = denoised + sigma_next * x
    yield Step(0, total, math.inf, sigma_next, x, denoised)
    if total > 1:
        for step in progressive(name, model, x, sigmas[1:], noise=noise, **opts):
            yield dataclasses.replace(step, index=step.index + 1, total=total)


def sample_flow(name: str, model: Model, x: torch.Tensor, sigmas: Union[torch.Tensor, Sequence[float]], *,
                noise: Optional[NoiseFn] = None, callback: Optional[Callable[[Step], None]] = None, **opts: Any) -> torch.Tensor:
    """Run `progressive_flow` to the end and return the final x (the clean latent when sigmas end in 0)."""
    for step in progressive_flow(name, model, x, sigmas, noise=noise, **opts):
        if callback is not None:
            callback(step)
        x = step.x
    return x


def flow_start(noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The starting state from pure noise at the schedule's first sigma (x_t = noise, in this module's form)."""
    return noise if math.isinf(sigma) else noise * (1 + sigma)


def flow_noised_latent(latent: torch.Tensor, schedule: SamplingSchedule, noise: torch.Tensor) -> torch.Tensor:
    """img2img's start: the latent noised to the schedule's first time, x_t = (1 - t) z + t noise (the
    references' `scale_noise`), which is z + sigma noise in VE form and the noise itself at t = 1."""
    sigma = float(schedule.sigmas[0])
    return noise if math.isinf(sigma) else latent + sigma * noise


def flow_masked_model(model: Model, known: torch.Tensor, repaint: torch.Tensor, noise: NoiseFn) -> Model:
    """`diffusion.masked.masked_model` for flow schedules: at t = 1 the re-noised known region is the noise."""
    finite = masked_model(model, known, repaint, noise)
    keep = 1 - repaint.to(device=known.device, dtype=known.dtype)

    def wrapped(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not torch.isinf(sigma).any():
            return finite(x, sigma)
        x_in = keep * noise(x) + (1 - keep) * x
        return keep * known + (1 - keep) * model(x_in, sigma)

    return wrapped


def sample_flow_latents(
    denoise: Callable[..., torch.Tensor],
    cond: Union[Cond, Guided, None],
    noise: NoiseSource,
    settings: SamplerSettings,
    times: FlowTimes,
    *,
    shape: Optional[Sequence[int]] = None,
    init_latent: Optional[torch.Tensor] = None,
    repaint: Optional[torch.Tensor] = None,
    callback: Optional[Callable[[Step], None]] = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`diffusion.run.sample_latents` for a flow model: `denoise` a `FlowDenoiser` (or a wrapper of one).

    txt2img: give `shape` (C, h, w). img2img: `init_latent` and settings.strength (the same strength rule as
    the other models, img2img.py). Masked sampling: also `repaint` (B, 1, h, w), 1 = repaint.
    """
    if settings.handoff is not None:
        raise ValueError("a base -> refiner hand-off is not defined for flow models")
    schedule = flow_schedule(settings.steps or get_sampler(settings.sampler).default_steps, times)
    if init_latent is not None:
        schedule = img2img_schedule(schedule, settings.strength)
        x = flow_noised_latent(init_latent, schedule, noise.like(init_latent))
    elif shape is not None:
        x = flow_start(noise.randn(shape, device=device, dtype=dtype) * settings.temperature, float(schedule.sigmas[0]))
    else:
        raise ValueError("sample_flow_latents needs a latent shape or an initial latent")
    model = bind(denoise, cond)
    if repaint is not None:
        if init_latent is None:
            raise ValueError("masked sampling needs the initial latent of the image it keeps")
        model = flow_masked_model(model, init_latent, repaint, noise.like)
    return sample_flow(settings.sampler, model, x, schedule.sigmas, noise=noise.like, callback=callback, eta=settings.eta)
