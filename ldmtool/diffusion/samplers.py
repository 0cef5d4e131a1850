"""Samplers: small pure functions over a denoiser `model(x, sigma) -> x0`, in the VE form x = x0 + sigma eps.

Each sampler exists twice: `progressive_X(model, x, sigmas, *, noise=None, **opts)` yields one `Step` per
step (so progress bars and previews live outside the math) and `sample_X(model, x, sigmas, *, noise=None,
callback=None, **opts)` runs it and returns the final x. `sigmas` is a descending array ending in 0 (or
in a small sigma); `noise(x)` returns fresh Gaussian noise shaped like x (pass `NoiseSource(seeds).like`).

Registered by name (`SAMPLERS`, `sample(name, ...)`): ddim, plms, ddpm (the CompVis samplers), euler, euler_a,
heun, dpmpp_2m, dpmpp_2m_sde, unipc, and lcm, tcd for distilled few-step models (they also take the model's
sigma table, `model_sigmas`, which `sample` passes only to samplers that take it; see fewstep.py). DDPM, DDIM and PLMS here are the reference updates rewritten with
sigma_t = sqrt((1 - a_t) / a_t) and x = x_vp / sqrt(a_t), an exact identity: given the same eps they give
the same samples. DDPM's posterior q(x_prev | x_t, x0) is DDIM with eta = 1 (Song et al. 2021, eq. 16),
so `ddpm` is that. Measured accuracy per step: benchmarks/sampler_accuracy.py.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from ldmtool.diffusion.fewstep import consistency_scalings, tcd_sigma, timestep_of
from ldmtool.diffusion.names import sampler_name
from ldmtool.diffusion.schedules import FinalSigma, SamplingSchedule, Spacing, sampling_schedule
from ldmtool.errors import UsageError

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]
Sigmas = Union[torch.Tensor, Sequence[float]]


@dataclass(frozen=True)
class Step:
    """One finished sampler step: `x` is the new state at `sigma_next`; `denoised` the x0 seen at `sigma`."""

    index: int
    total: int
    sigma: float
    sigma_next: float
    x: torch.Tensor
    denoised: torch.Tensor


def _pairs(sigmas: Sigmas, *, flat_end: bool = False) -> list[tuple[float, float]]:
    """(sigma, sigma_next) per step; the array must descend and stay positive until its last entry (which may
    equal the one before with `flat_end`: a schedule that reaches its final sigma before its last step)."""
    values = [float(s) for s in sigmas]
    falls = [b < a or (flat_end and i == len(values) - 2 and b == a) for i, (a, b) in enumerate(zip(values, values[1:]))]
    if not all(falls) or any(v <= 0 for v in values[:-1]) or values[-1] < 0:
        raise ValueError(f"sigmas must descend to a last value >= 0, got {values[:4]}...{values[-2:]}")
    return list(zip(values[:-1], values[1:]))


def _at(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Sigma as the (B,) tensor a denoiser takes; float64 inputs keep float64 sigmas."""
    return torch.full((x.shape[0],), sigma, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


def _noise_fn(noise: Optional[NoiseFn]) -> NoiseFn:
    return noise if noise is not None else torch.randn_like


def ancestral_split(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): a step to sigma_next as a deterministic move to sigma_down plus fresh noise.

    With eta = 1 this is the DDPM posterior variance; eta scales the noise as DDIM's eta does.
    """
    if sigma_next == 0:
        return 0.0, 0.0
    up = min(sigma_next, eta * sigma_next * math.sqrt(sigma**2 - sigma_next**2) / sigma)
    return math.sqrt(sigma_next**2 - up**2), up


def progressive_euler(model: Model, x: torch.Tensor, sigmas: Sigmas, *, noise: Optional[NoiseFn] = None) -> Iterator[Step]:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022, eq. 4)."""
    pairs = _pairs(sigmas)
    for i, (s, s_next) in enumerate(pairs):
        denoised = model(x, _at(x, s))
        x = x + (x - denoised) / s * (s_next - s)
        yield Step(i, len(pairs), s, s_next, x, denoised)


def progressive_euler_a(
    model: Model, x: torch.Tensor, sigmas: Sigmas, *, noise: Optional[NoiseFn] = None, eta: float = 1.0
) -> Iterator[Step]:
    """Euler ancestral: an Euler step down to sigma_down, then noise up to sigma_next. In the VE form that
    step, x + (x - x0) (down - s) / s, is exactly DDIM's x0 + (x - x0) down / s, so it is DDIM with eta 1."""
    return progressive_ddim(model, x, sigmas, noise=noise, eta=eta)


def progressive_ddim(
    model: Model, x: torch.Tensor, sigmas: Sigmas, *, noise: Optional[NoiseFn] = None, eta: float = 0.0
) -> Iterator[Step]:
    """DDIM (Song et al. 2021, eq. 12): x_prev = x0 + sigma_down eps + sigma_up z, in VE form."""
    noise, pairs = _noise_fn(noise), _pairs(sigmas)
    for i, (s, s_next) in enumerate(pairs):
        denoised = model(x, _at(x, s))
        down, up = ancestral_split(s, s_next, eta)
        # At down = 0 (the last step) x is denoised itself: the same values without two latent-sized temporaries.
        x = denoised + (x - denoised) * (down / s) if down > 0 else denoised
        if up > 0:
            x = x + up * noise(x)
        yield Step(i, len(pairs), s, s_next, x, denoised)


def progressive_ddpm(model: Model, x: torch.Tensor, sigmas: Sigmas, *, noise: Optional[NoiseFn] = None) -> Iterator[Step]:
    """DDPM ancestral sampling (Ho et al. 2020) with the posterior variance of the (respaced) chain."""
    return progressive_ddim(model, x, sigmas, noise=noise, eta=1.0)


def progressive_heun(model: Model, x: torch.Tensor, sigmas: Sigmas, *, noise: Optional[NoiseFn] = None) -> Iterator[Step]:
    """Heun's second-order method (Karras et al. 2022, Alg. 1); the last step to sigma 0 is Euler."""
    pairs = _pairs(sigmas)
    for i, (s, s_next) in enumerate(pairs):
        denoised = model(x, _at(x, s))
        slope = (x - denoised) / s
        x_euler = x + slope * (s_next - s)
        if s_next == 0:
            x = x_euler
        else:
            slope_next = (x_euler - model(x_euler, _at(x, s_next))) / s_next
            x = x + (slope + slope_next) / 2 * (s_next - s)
        yield Step(i, len(pairs), s, s_next, x, denoised)


def progressive_dpmpp_2m(model: Model, x: torch.Tensor, sigmas: Sigmas, *, noise: Optional[NoiseFn] = None) -> Iterator[Step]:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep in log-sigma on the x0 prediction."""
    pairs = _pairs(sigmas)
    previous, h_last = None, None
    for i, (s, s_next) in enumerate(pairs):
        denoised = model(x, _at(x, s))
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)
            estimate = denoised if previous is None or h_last is None else _second_order(denoised, previous, h_last / h)
            x = (s_next / s) * x - math.expm1(-h) * estimate
            h_last = h
        previous = denoised
        yield Step(i, len(pairs), s, s_next, x, denoised)


def progressive_dpmpp_2m_sde(
    model: Model, x: torch.Tensor, sigmas: Sigmas, *, noise: Optional[NoiseFn] = None
) -> Iterator[Step]:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, midpoint form): the 2M estimate on the reverse SDE, which
    keeps a fraction e^-2h of the old noise and adds the rest fresh."""
    noise, pairs = _noise_fn(noise), _pairs(sigmas)
    previous, h_last = None, None
    for i, (s, s_next) in enumerate(pairs):
        denoised = model(x, _at(x, s))
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)
            estimate = denoised if previous is None or h_last is None else _second_order(denoised, previous, h_last / h)
            decay = math.exp(-2 * h)  # = (s_next / s) ** 2
            x = decay * x + (1 - decay) * estimate + s_next * math.sqrt(1 - decay) * noise(x)
            h_last = h
        previous = denoised
        yield Step(i, len(pairs), s, s_next, x, denoised)


def _second_order(denoised: torch.Tensor, previous: torch.Tensor, r: float) -> torch.Tensor:
    return (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous


def progressive_unipc(model: Model, x: torch.Tensor, sigmas: Sigmas, *, noise: Optional[NoiseFn] = None) -> Iterator[Step]:
    """UniPC-2 with B(h) = e^h - 1 (Zhao et al. 2023, "bh2"), on the x0 prediction: a multistep predictor
    (the same as DPM-Solver++(2M)) and the UniC corrector, which reuses the network value at the predicted
    point as the next step's evaluation, so it costs one call per step. The last step is first order."""
    pairs = _pairs(sigmas)
    start, previous, order = None, None, 1  # start: (x, sigma, denoised) of the step just taken
    for i, (s, s_next) in enumerate(pairs):
        denoised = model(x, _at(x, s))
        if start is not None:
            x = _unic(*start, x_denoised=denoised, sigma=s, previous=previous, order=order)
            previous = (start[1], start[2])
        order = 1 if previous is None or i == len(pairs) - 1 else 2
        start = (x, s, denoised)
        x = _unip(x, s, s_next, denoised, previous if order == 2 else None)
        yield Step(i, len(pairs), s, s_next, x, denoised)


def _unip(x, s, s_next, denoised, previous) -> torch.Tensor:
    """UniP predictor from sigma s to s_next; `previous` (sigma, denoised) makes it second order."""
    if s_next == 0:
        return denoised
    h = math.log(s / s_next)
    x_next = (s_next / s) * x - math.expm1(-h) * denoised
    if previous is not None:
        r = math.log(s / previous[0]) / h
        x_next = x_next - math.expm1(-h) * 0.5 * (previous[1] - denoised) / r
    return x_next


def _unic(x_start, s, denoised, *, x_denoised, sigma, previous, order) -> torch.Tensor:
    """UniC corrector of the step from (x_start, s) to `sigma`, given the network's x0 at the predicted point."""
    h = math.log(s / sigma)
    b_h = math.expm1(-h)
    x_next = (sigma / s) * x_start - b_h * denoised
    if order == 1:
        return x_next - b_h * 0.5 * (x_denoised - denoised)
    r = math.log(s / previous[0]) / h
    phi_1 = b_h / -h - 1
    b1, b2 = phi_1 / b_h, (phi_1 / -h - 0.5) * 2 / b_h
    rho_previous = (b1 - b2) / (1 - r)
    rho_new = b1 - rho_previous
    return x_next - b_h * (rho_previous * (previous[1] - denoised) / r + rho_new * (x_denoised - denoised))


def progressive_plms(model: Model, x: torch.Tensor, sigmas: Sigmas, *, noise: Optional[NoiseFn] = None) -> Iterator[Step]:
    """CompVis PLMS (Liu et al. 2022): Adams–Bashforth on eps up to 4th order, warmed up by a pseudo
    improved-Euler first step (two network calls), exactly as the reference sampler."""
    pairs = _pairs(sigmas)
    history: list[torch.Tensor] = []
    for i, (s, s_next) in enumerate(pairs):
        denoised = model(x, _at(x, s))
        eps = (x - denoised) / s
        if history:
            eps_step = _adams_bashforth(eps, history)
        else:
            # The reference evaluates the warm-up at the next timestep, or at the same one for 1 step.
            s_warm = s if len(pairs) == 1 else s_next
            x_warm = x + (s_next - s) * eps
            eps_step = (eps + (x_warm - model(x_warm, _at(x, s_warm))) / s_warm) / 2
        x = x + (s_next - s) * eps_step
        history = (history + [eps])[-3:]
        yield Step(i, len(pairs), s, s_next, x, denoised)


def _adams_bashforth(eps: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
    if len(history) == 1:
        return (3 * eps - history[-1]) / 2
    if len(history) == 2:
        return (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


def _run(steps: Iterator[Step], x: torch.Tensor, callback: Optional[Callable[[Step], None]]) -> torch.Tensor:
    """Drive a progressive sampler to its end; the final x (the input itself when there are no steps)."""
    for step in steps:
        if callback is not None:
            callback(step)
        x = step.x
    return x


def _one_shot(progressive: Callable[..., Iterator[Step]]) -> Callable[..., torch.Tensor]:
    def sample(model: Model, x: torch.Tensor, sigmas: Sigmas, *, noise: Optional[NoiseFn] = None,
               callback: Optional[Callable[[Step], None]] = None, **opts: Any) -> torch.Tensor:
        return _run(progressive(model, x, sigmas, noise=noise, **opts), x, callback)

    sample.__name__ = progressive.__name__.replace("progressive_", "sample_")
    sample.__doc__ = progressive.__doc__
    return sample


def progressive_lcm(model: Model, x: torch.Tensor, sigmas: Sigmas, *, noise: Optional[NoiseFn] = None,
                    model_sigmas: Optional[torch.Tensor] = None) -> Iterator[Step]:
    """Latent consistency multistep sampling (Luo et al. 2023, Alg. 1): the consistency function's x0 at each
    level (the boundary condition needs the timestep: `model_sigmas`; without it c_skip = 0, c_out = 1),
    then fresh noise up to the next level; the last step to sigma 0 returns that x0."""
    noise, pairs = _noise_fn(noise), _pairs(sigmas)
    for i, (s, s_next) in enumerate(pairs):
        x0 = model(x, _at(x, s))
        c_skip, c_out = (0.0, 1.0) if model_sigmas is None else consistency_scalings(timestep_of(s, model_sigmas))
        denoised = c_out * x0 + c_skip * x / math.sqrt(s**2 + 1)  # c_skip multiplies the VP sample
        x = denoised + s_next * noise(x) if s_next > 0 else denoised
        yield Step(i, len(pairs), s, s_next, x, denoised)


def progressive_tcd(model: Model, x: torch.Tensor, sigmas: Sigmas, *, noise: Optional[NoiseFn] = None,
                    tcd_gamma: float = 0.3, model_sigmas: Optional[torch.Tensor] = None) -> Iterator[Step]:
    """Trajectory consistency distillation sampling (Zheng et al. 2024, Alg. 4): a DDIM move down to the
    timestep floor((1 - gamma) t_next), then fresh noise back up to sigma_next (none on the last step).
    Gamma (diffusers' `eta`, default 0.3 as there) 0 is deterministic DDIM; 1 is LCM without c_skip."""
    if model_sigmas is None:
        raise ValueError("the tcd sampler needs the model's sigma table (model_sigmas)")
    # TCD ends at the model's smallest sigma, not 0: a spacing whose last timestep is 0 (karras, linspace,
    # leading) has a last step that stays there, which the update leaves unchanged (as diffusers' TCDScheduler)
    noise, pairs = _noise_fn(noise), _pairs(sigmas, flat_end=True)
    for i, (s, s_next) in enumerate(pairs):
        denoised = model(x, _at(x, s))
        s_down = tcd_sigma(s_next, tcd_gamma, model_sigmas)
        x = denoised + (x - denoised) * (s_down / s)
        if s_down < s_next and i < len(pairs) - 1:
            x = x + math.sqrt(s_next**2 - s_down**2) * noise(x)
        yield Step(i, len(pairs), s, s_next, x, denoised)


sample_euler = _one_shot(progressive_euler)
sample_euler_a = _one_shot(progressive_euler_a)
sample_ddim = _one_shot(progressive_ddim)
sample_ddpm = _one_shot(progressive_ddpm)
sample_heun = _one_shot(progressive_heun)
sample_dpmpp_2m = _one_shot(progressive_dpmpp_2m)
sample_dpmpp_2m_sde = _one_shot(progressive_dpmpp_2m_sde)
sample_plms = _one_shot(progressive_plms)
sample_unipc = _one_shot(progressive_unipc)
sample_lcm = _one_shot(progressive_lcm)
sample_tcd = _one_shot(progressive_tcd)


@dataclass(frozen=True)
class SamplerInfo:
    """A registered sampler and its defaults (recommended steps, schedule spacing)."""

    name: str
    progressive: Callable[..., Iterator[Step]]
    default_steps: int
    spacing: Spacing
    stochastic: bool
    order: int  # convergence order on the probability-flow ODE (0: stochastic)
    evals_per_step: int
    offset: int = 0  # added to "leading" timesteps (1 as in Stable Diffusion's DDIM/PLMS configs)
    final: FinalSigma = FinalSigma.ZERO  # where its default schedule ends (TCD's reference: training step 0)

    @property
    def options(self) -> tuple[str, ...]:
        params = inspect.signature(self.progressive).parameters.values()
        return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _NOT_OPTIONS)

    @property
    def takes_model_sigmas(self) -> bool:
        return "model_sigmas" in inspect.signature(self.progressive).parameters


# Keyword arguments of samplers that the run supplies, not the user.
_NOT_OPTIONS = frozenset({"noise", "model_sigmas"})


SAMPLERS: dict[str, SamplerInfo] = {
    info.name: info
    for info in (
        SamplerInfo("ddim", progressive_ddim, 50, Spacing.LEADING, False, 1, 1, offset=1),
        SamplerInfo("plms", progressive_plms, 50, Spacing.LEADING, False, 2, 1, offset=1),
        SamplerInfo("ddpm", progressive_ddpm, 250, Spacing.LEADING, True, 0, 1),
        SamplerInfo("euler", progressive_euler, 30, Spacing.LINSPACE, False, 1, 1),
        SamplerInfo("euler_a", progressive_euler_a, 30, Spacing.LINSPACE, True, 0, 1),
        SamplerInfo("heun", progressive_heun, 20, Spacing.KARRAS, False, 2, 2),
        SamplerInfo("dpmpp_2m", progressive_dpmpp_2m, 20, Spacing.KARRAS, False, 2, 1),
        SamplerInfo("dpmpp_2m_sde", progressive_dpmpp_2m_sde, 25, Spacing.KARRAS, True, 0, 1),
        SamplerInfo("unipc", progressive_unipc, 20, Spacing.KARRAS, False, 3, 1),
        SamplerInfo("lcm", progressive_lcm, 4, Spacing.LCM, True, 0, 1),
        SamplerInfo("tcd", progressive_tcd, 4, Spacing.LCM, True, 0, 1, final=FinalSigma.FIRST),
    )
}


def get_sampler(name: str) -> SamplerInfo:
    """A sampler by its ldmtool or A1111 name ('DPM++ 2M', 'Euler a')."""
    try:
        return SAMPLERS[sampler_name(name)[0]]
    except KeyError:
        raise UsageError(f"--sampler {name!r} is not a sampler (choose one of {', '.join(SAMPLERS)})") from None


def default_schedule(
    name: str,
    alphas_cumprod: torch.Tensor,
    steps: Optional[int] = None,
    *,
    karras: Optional[bool] = None,
    offset: Optional[int] = None,
    final: FinalSigma | str | None = None,
    spacing: Spacing | str | None = None,
) -> SamplingSchedule:
    """The sampler's recommended schedule for a discrete model; `karras` True/False or `spacing` overrides
    the spacing, `final` where it ends (default: the sampler's, 0 for all but tcd).

    DDIM/PLMS default to "leading" + 1, which equals the reference "uniform" list whenever the step count
    divides T and otherwise still gives exactly `steps` steps (pass spacing "uniform" through
    `sampling_schedule` for the reference list itself).
    """
    info = get_sampler(name)
    offset = info.offset if offset is None else offset
    return sampling_schedule(alphas_cumprod, steps or info.default_steps, chosen_spacing(name, karras, spacing),
                             offset=offset, final=info.final if final is None else final)


def chosen_spacing(name: str, karras: Optional[bool] = None, spacing: Spacing | str | None = None) -> Spacing:
    """The spacing a run of this sampler walks: `spacing` when given, else the sampler's, switched to Karras
    or away from it (to linspace) by `karras`."""
    if spacing is not None:
        return Spacing(spacing)
    chosen = get_sampler(name).spacing
    if karras is not None and karras != (chosen is Spacing.KARRAS):
        return Spacing.KARRAS if karras else Spacing.LINSPACE
    return chosen


def start_latent(noise: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Initial x for a discrete VP model: x_vp ~ N(0, I) at sigma_max, as the reference samplers start."""
    return noise * math.sqrt(sigma_max**2 + 1)


def progressive(name: str, model: Model, x: torch.Tensor, sigmas: Sigmas, *, noise: Optional[NoiseFn] = None,
                **opts: Any) -> Iterator[Step]:
    """Run the named sampler step by step. Options set to None are dropped; others must be the sampler's.
    `model_sigmas` (the discrete model's sigma table) goes to the samplers that take it, and only to them."""
    info = get_sampler(name)
    model_sigmas = opts.pop("model_sigmas", None)
    opts = {k: v for k, v in opts.items() if v is not None}
    check_options(name, **opts)
    if model_sigmas is not None and info.takes_model_sigmas:
        opts["model_sigmas"] = model_sigmas
    return info.progressive(model, x, sigmas, noise=noise, **opts)


def check_options(name: str, **opts: Any) -> None:
    """UsageError for a sampler option (not None) that the named sampler does not take, naming the samplers
    that do (pipelines check the run's options once, before any item)."""
    info = get_sampler(name)
    unknown = sorted(k for k, v in opts.items() if v is not None and k not in info.options)
    if unknown:
        option = unknown[0]
        accepted = ", ".join(info.options) or "none"
        takers = ", ".join(n for n, other in SAMPLERS.items() if option in other.options) or "none"
        flag = "--" + option.replace("_", "-")
        raise UsageError(f"{flag} {opts[option]} does not apply to the {name} sampler (its options: {accepted}; "
                         f"samplers that take {flag}: {takers})")


def sample(name: str, model: Model, x: torch.Tensor, sigmas: Sigmas, *, noise: Optional[NoiseFn] = None,
           callback: Optional[Callable[[Step], None]] = None, **opts: Any) -> torch.Tensor:
    """Run the named sampler to the end and return the final x."""
    return _run(progressive(name, model, x, sigmas, noise=noise, **opts), x, callback)
