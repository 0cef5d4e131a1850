"""Samplers against exact solutions (Gaussian / mixture data), diffusers 0.42.1, and the CompVis PLMS loop."""
import functools
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from ldmtool.diffusion import samplers as SM
from ldmtool.diffusion.denoisers import DiscreteDenoiser, bind
from ldmtool.diffusion.oracle import GaussianData, GaussianMixture, ode_reference
from ldmtool.diffusion.schedules import (
    FinalSigma,
    alphas_cumprod_from_betas,
    discrete_sigmas,
    karras_sigmas,
    make_betas,
    sampling_schedule,
)
from ldmtool.errors import UsageError
from ldmtool.runtime.seeds import NoiseSource, derive_seed

F64 = torch.float64
AC = alphas_cumprod_from_betas(make_betas("linear", 1000, 0.00085, 0.012))
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
GAUSS = GaussianData(torch.tensor([0.5, -1.0, 2.0], dtype=F64), torch.tensor([0.3, 1.2, 0.6], dtype=F64))
MIXTURE = GaussianMixture(
    torch.tensor([0.3, 0.7], dtype=F64),
    torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=F64),
    torch.tensor([[0.3, 0.2], [0.4, 0.5]], dtype=F64),
)
DETERMINISTIC = {"euler": 1, "ddim": 1, "heun": 2, "dpmpp_2m": 2, "plms": 2, "unipc": 3}



def fit_order(steps, errors) -> float:
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


def seeded_noise(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


def wavy_eps_net(x, t, context=None, y=None):
    """A deterministic, nonlinear, timestep-dependent stand-in for a UNet."""
    tt = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.4 * x * torch.cos(tt / 300) + 0.2 * torch.tanh(x + tt / 1000)


class ClosedFormUNet:
    """A VP 'network' predicting eps, v or x0 exactly for the oracle's data (sigma from t by np.interp)."""

    def __init__(self, data, alphas_cumprod, parameterization):
        a = alphas_cumprod.numpy()
        self.data, self.kind = data, parameterization
        self.log_sigmas = np.log(np.sqrt((1 - a) / a))

    def __call__(self, x_vp, t, context=None, y=None):
        sigma = torch.from_numpy(np.exp(np.interp(t.double().numpy(), np.arange(len(self.log_sigmas)), self.log_sigmas)))
        c = (1 / (sigma**2 + 1).sqrt()).reshape(-1, 1, 1, 1)
        x = x_vp / c
        x0 = self.data.denoise(x, sigma)
        eps = (x - x0) / sigma.reshape(-1, 1, 1, 1)
        return {"eps": eps, "v": c * eps - sigma.reshape(-1, 1, 1, 1) * c * x0, "x0": x0}[self.kind]


# --- convergence to the exact probability-flow ODE solution -------------------------------------------


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_to_the_gaussian_ode_solution_at_their_order(name):
    sigma_max, sigma_min, steps = 20.0, 0.02, [10, 20, 40, 80]
    x_start = GAUSS.prior_sample(32, sigma_max, torch.Generator().manual_seed(0))
    exact = GAUSS.ode_solution(x_start, sigma_max, sigma_min)
    errors = [
        (SM.sample(name, GAUSS.denoise, x_start, karras_sigmas(n + 1, sigma_min, sigma_max)) - exact).abs().max().item()
        for n in steps
    ]
    order = fit_order(steps, errors)
    assert DETERMINISTIC[name] - 0.2 < order < DETERMINISTIC[name] + 0.4, (errors, order)
    assert errors[-1] < (0.08 if DETERMINISTIC[name] == 1 else 0.004)


@functools.lru_cache(maxsize=1)
def mixture_ode_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Start points at sigma 10 and their ODE solution at sigma 0.02 (RK4, 300 steps: within 1e-8 of 1000)."""
    x_start = MIXTURE.prior_sample(32, 10.0, torch.Generator().manual_seed(1))
    return x_start, ode_reference(MIXTURE.denoise, x_start, 10.0, 0.02, steps=300)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_on_a_gaussian_mixture(name):
    x_start, reference = mixture_ode_case()
    steps = [10, 20, 40, 80]
    errors = [
        (SM.sample(name, MIXTURE.denoise, x_start, karras_sigmas(n + 1, 0.02, 10.0)) - reference).abs().max().item()
        for n in steps
    ]
    assert fit_order(steps, errors) > DETERMINISTIC[name] - 0.4, errors
    assert errors[-1] < (0.08 if DETERMINISTIC[name] == 1 else 0.003), errors


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_discrete_wrapper_over_an_exact_network_gives_the_x0_trajectory_and_converges(parameterization):
    """DDIM on the reference 'uniform' spacing through the discrete wrapper (integer timesteps only)."""
    denoise = DiscreteDenoiser(ClosedFormUNet(GAUSS, AC, parameterization), AC, parameterization)
    errors, steps = [], [10, 50, 200]
    for n in steps:
        sched = sampling_schedule(AC, n, "uniform", final=FinalSigma.FIRST)
        sigma_max, sigma_end = float(sched.sigmas[0]), float(sched.sigmas[-1])
        x_start = GAUSS.prior_sample(16, sigma_max, torch.Generator().manual_seed(2))[..., None, None]
        out = SM.sample_ddim(bind(denoise, None), x_start, sched.sigmas)
        direct = SM.sample_ddim(GAUSS.denoise, x_start, sched.sigmas)
        torch.testing.assert_close(out, direct, rtol=0, atol=1e-9)
        errors.append((out - GAUSS.ode_solution(x_start, sigma_max, sigma_end)).abs().max().item())
    assert errors[-1] < 0.03 and fit_order(steps, errors) > 0.8, errors


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "heun", "unipc"])
def test_discrete_wrapper_at_fractional_timesteps_follows_the_x0_form(name, parameterization):
    """Karras sigmas fall between training steps: the wrapper interpolates t, the network reads sigma back."""
    denoise = DiscreteDenoiser(ClosedFormUNet(GAUSS, AC, parameterization), AC, parameterization)
    sched = SM.default_schedule(name, AC, 15, karras=True)
    assert not torch.equal(sched.timesteps, sched.timesteps.round())
    x_start = GAUSS.prior_sample(16, float(sched.sigmas[0]), torch.Generator().manual_seed(3))[..., None, None]
    out = SM.sample(name, bind(denoise, None), x_start, sched.sigmas)
    torch.testing.assert_close(out, SM.sample(name, GAUSS.denoise, x_start, sched.sigmas), rtol=0, atol=1e-5)


# --- stochastic samplers reproduce the data distribution -------------------------------------------


def log_sigmas(n: int, sigma_max: float, sigma_min: float) -> torch.Tensor:
    ramp = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), n, dtype=F64)
    return torch.cat([ramp, ramp.new_zeros(1)])


@pytest.mark.parametrize("name, opts", [("ddpm", {}), ("euler_a", {}), ("ddim", {"eta": 1.0}), ("dpmpp_2m_sde", {})])
def test_stochastic_samplers_reproduce_gaussian_mean_and_covariance(name, opts):
    data = GaussianData(GAUSS.mean[:2], GAUSS.std[:2])
    n = 10000
    x = data.prior_sample(n, 20.0, torch.Generator().manual_seed(3))
    out = SM.sample(name, data.denoise, x, log_sigmas(500, 20.0, 0.005), noise=seeded_noise(4), **opts)
    standard_error = data.std / math.sqrt(n)
    assert torch.all((out.mean(0) - data.mean).abs() < 5 * standard_error)
    cov = torch.cov(out.T)
    var_tolerance = 5 * data.std**2 * math.sqrt(2 / n)
    assert torch.all((cov.diagonal() - data.std**2).abs() < var_tolerance), cov
    assert abs(float(cov[0, 1])) < 5 * float(data.std.prod()) / math.sqrt(n)


@pytest.mark.parametrize("name", ["ddpm", "euler_a", "dpmpp_2m_sde"])
def test_stochastic_samplers_reproduce_mixture_moments(name):
    n = 5000
    x = MIXTURE.prior_sample(n, 20.0, torch.Generator().manual_seed(5))
    out = SM.sample(name, MIXTURE.denoise, x, log_sigmas(400, 20.0, 0.005), noise=seeded_noise(6))
    mean, cov = MIXTURE.moments()
    scale = cov.diagonal().sqrt()
    assert torch.all((out.mean(0) - mean).abs() < 5 * scale / math.sqrt(n)), (out.mean(0), mean)
    torch.testing.assert_close(torch.cov(out.T), cov, rtol=0, atol=5 * float(cov.diagonal().max()) * math.sqrt(2 / n))
    # two modes, not one blurred blob: the fraction in the right-hand mode matches its weight
    assert abs(float((out[:, 0] > 0).double().mean()) - 0.7) < 0.03


# --- the reference updates, checked against diffusers and the CompVis loop ---------------------------


def run_diffusers(scheduler, x_vp, net, step_kwargs=lambda i: {}):
    states = []
    for i, t in enumerate(scheduler.timesteps):
        x_vp = scheduler.step(net(x_vp, t.reshape(1).expand(len(x_vp))), t, x_vp, **step_kwargs(i)).prev_sample
        states.append(x_vp)
    return states


def assert_same_trajectory(steps, reference_states, atol=1e-5):
    assert len(steps) == len(reference_states)
    for step, ref in zip(steps, reference_states):
        vp = step.x / math.sqrt(step.sigma_next**2 + 1)
        torch.testing.assert_close(vp, ref, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("eta, alpha_to_one", [(0.0, False), (0.0, True), (0.6, False), (1.0, True)])
def test_ddim_uniform_matches_diffusers_ddim_leading_offset_1(eta, alpha_to_one):
    ref = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=alpha_to_one, steps_offset=1, timestep_spacing="leading")
    ref.set_timesteps(25)
    x_vp = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    z = torch.randn(25, 2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    reference = run_diffusers(ref, x_vp, wavy_eps_net, lambda i: {"eta": eta, "variance_noise": z[i] if eta else None})
    sched = sampling_schedule(ref.alphas_cumprod, 25, "uniform", final="zero" if alpha_to_one else "first")
    assert sched.timesteps.tolist() == ref.timesteps.tolist()
    draws = iter(z)
    model = bind(DiscreteDenoiser(wavy_eps_net, ref.alphas_cumprod), None)
    x = x_vp * math.sqrt(float(sched.sigmas[0]) ** 2 + 1)
    steps = list(SM.progressive_ddim(model, x, sched.sigmas, noise=lambda x: next(draws), eta=eta))
    assert_same_trajectory(steps, reference)


def test_ddpm_matches_diffusers_ddpm_with_the_posterior_variance():
    ref = DDPMScheduler(**SD_BETAS, clip_sample=False, variance_type="fixed_small", timestep_spacing="leading")
    ref.set_timesteps(40)
    x_vp = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(9)
    reference = run_diffusers(ref, x_vp, wavy_eps_net, lambda i: {"generator": generator})
    sched = SM.default_schedule("ddpm", ref.alphas_cumprod, 40)
    assert sched.timesteps.tolist() == ref.timesteps.tolist()
    model = bind(DiscreteDenoiser(wavy_eps_net, ref.alphas_cumprod), None)
    x = SM.start_latent(x_vp, float(sched.sigmas[0]))
    assert_same_trajectory(list(SM.progressive_ddpm(model, x, sched.sigmas, noise=seeded_noise(9))), reference)


@pytest.mark.parametrize("steps", [8, 20])
def test_dpmpp_2m_karras_matches_diffusers_multistep_dpm_solver(steps):
    ref = DPMSolverMultistepScheduler(
        **SD_BETAS, use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"
    )
    ref.set_timesteps(steps)
    x_vp = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    reference = run_diffusers(ref, x_vp, wavy_eps_net)
    sched = SM.default_schedule("dpmpp_2m", ref.alphas_cumprod, steps)
    model = bind(DiscreteDenoiser(wavy_eps_net, ref.alphas_cumprod, quantize=True), None)
    x = SM.start_latent(x_vp, float(sched.sigmas[0]))
    assert_same_trajectory(list(SM.progressive_dpmpp_2m(model, x, sched.sigmas)), reference)


@pytest.mark.parametrize("steps", [8, 20])
def test_dpmpp_2m_sde_matches_diffusers_sde_dpm_solver_with_the_same_noise(steps):
    ref = DPMSolverMultistepScheduler(
        **SD_BETAS, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++", solver_order=2, final_sigmas_type="zero"
    )
    ref.set_timesteps(steps)
    x_vp = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    z = torch.randn(steps, 2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    reference = run_diffusers(ref, x_vp, wavy_eps_net, lambda i: {"variance_noise": z[i]})
    sched = SM.default_schedule("dpmpp_2m_sde", ref.alphas_cumprod, steps)
    model = bind(DiscreteDenoiser(wavy_eps_net, ref.alphas_cumprod, quantize=True), None)
    draws = iter(z)
    x = SM.start_latent(x_vp, float(sched.sigmas[0]))
    assert_same_trajectory(list(SM.progressive_dpmpp_2m_sde(model, x, sched.sigmas, noise=lambda x: next(draws))), reference)


@pytest.mark.parametrize("steps", [5, 20])
def test_unipc_matches_diffusers_unipc_bh2_with_karras_sigmas(steps):
    ref = UniPCMultistepScheduler(
        **SD_BETAS, use_karras_sigmas=True, solver_order=2, solver_type="bh2", predict_x0=True, final_sigmas_type="zero"
    )
    ref.set_timesteps(steps)
    x_vp = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    reference = run_diffusers(ref, x_vp, wavy_eps_net)
    sched = SM.default_schedule("unipc", ref.alphas_cumprod, steps)
    model = bind(DiscreteDenoiser(wavy_eps_net, ref.alphas_cumprod, quantize=True), None)
    x = SM.start_latent(x_vp, float(sched.sigmas[0]))
    # diffusers takes differences of float32 log-SNRs for the step sizes, worth ~1e-5 over a run
    assert_same_trajectory(list(SM.progressive_unipc(model, x, sched.sigmas)), reference, atol=5e-5)


def compvis_plms(net, alphas_cumprod, ddim_timesteps, x):
    """The CompVis PLMSSampler loop (eta 0), written out in the VP form of the reference."""
    alphas = alphas_cumprod[ddim_timesteps]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ddim_timesteps[:-1]]])
    time_range = ddim_timesteps.flip(0)
    total, old_eps, states = len(time_range), [], []
    for i, step in enumerate(time_range):
        index = total - i - 1
        t_next = time_range[min(i + 1, total - 1)]
        a_t, a_prev = alphas[index], alphas_prev[index]

        def x_prev(e, x=x, a_t=a_t, a_prev=a_prev):
            pred_x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
            return a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e

        e_t = net(x, step.reshape(1).expand(len(x)))
        if len(old_eps) == 0:
            e_prime = (e_t + net(x_prev(e_t), t_next.reshape(1).expand(len(x)))) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev(e_prime)
        old_eps = (old_eps + [e_t])[-3:]
        states.append(x)
    return states


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_plms_matches_the_compvis_reference_loop(steps):
    sched = sampling_schedule(AC, steps, "uniform", final="first")
    x_vp = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    reference = compvis_plms(wavy_eps_net, AC, sched.timesteps.flip(0), x_vp)
    x = SM.start_latent(x_vp, float(sched.sigmas[0]))
    steps_taken = list(SM.progressive_plms(bind(DiscreteDenoiser(wavy_eps_net, AC), None), x, sched.sigmas))
    assert_same_trajectory(steps_taken, reference, atol=1e-10)


# --- determinism, progressive form, registry ---------------------------------------------------------


def elementwise_net(x, t, context=None, y=None):
    return torch.tanh(x) * 0.5 + 0.01 * t.reshape(-1, 1, 1, 1) / 1000


@pytest.mark.parametrize("name", ["euler_a", "ddpm", "dpmpp_2m"])
def test_batch_of_eight_gives_each_item_what_it_gets_alone(name):
    seeds = [derive_seed(1234, f"item-{i}") for i in range(8)]
    model = bind(DiscreteDenoiser(elementwise_net, AC), None)
    sched = SM.default_schedule(name, AC, 12)

    def run(item_seeds):
        source = NoiseSource(item_seeds)
        x = SM.start_latent(source.randn((4, 8, 8)), float(sched.sigmas[0]))
        return SM.sample(name, model, x, sched.sigmas, noise=source.like)

    batch = run(seeds)
    for i in (0, 3, 7):
        assert torch.equal(batch[i], run([seeds[i]])[0])


def test_progressive_form_yields_one_typed_step_per_sigma_and_ends_where_sample_ends():
    sched = SM.default_schedule("heun", AC, 6)
    model = bind(DiscreteDenoiser(elementwise_net, AC), None)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    steps = list(SM.progressive("heun", model, x, sched.sigmas))
    assert [s.index for s in steps] == list(range(6)) and {s.total for s in steps} == {6}
    assert [s.sigma for s in steps] == sched.sigmas[:-1].tolist()
    assert [s.sigma_next for s in steps] == sched.sigmas[1:].tolist()
    seen = []
    out = SM.sample("heun", model, x, sched.sigmas, callback=seen.append)
    assert torch.equal(out, steps[-1].x) and len(seen) == 6 and torch.equal(seen[2].denoised, steps[2].denoised)


def test_heun_calls_the_network_twice_per_step_except_the_last():
    calls = []

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return x * 0.5

    SM.sample_heun(counting, torch.ones(1, 2), torch.tensor([3.0, 2.0, 1.0, 0.0]))
    assert calls == [3.0, 2.0, 2.0, 1.0, 1.0]


@pytest.mark.parametrize("name", list(SM.SAMPLERS))
def test_every_registered_sampler_runs_from_its_default_schedule(name):
    info = SM.get_sampler(name)
    sched = SM.default_schedule(name, AC, 4)
    final = 0 if info.final is FinalSigma.ZERO else float(discrete_sigmas(AC)[0])
    assert sched.steps >= 4 and float(sched.sigmas[-1]) == final
    model = bind(DiscreteDenoiser(elementwise_net, AC), None)
    x = SM.start_latent(torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), float(sched.sigmas[0]))
    out = SM.sample(name, model, x, sched.sigmas, noise=seeded_noise(0), eta=None, model_sigmas=discrete_sigmas(AC))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert info.default_steps > 0 and SM.default_schedule(name, AC).steps >= info.default_steps


def test_karras_flag_overrides_the_default_spacing():
    assert SM.default_schedule("euler", AC, 10, karras=True).timesteps.dtype == F64  # fractional timesteps
    assert SM.default_schedule("dpmpp_2m", AC, 10, karras=False).timesteps.tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]


def test_unknown_sampler_and_misplaced_options_are_usage_errors():
    with pytest.raises(UsageError, match="dpmpp_2m"):
        SM.get_sampler("dpm++")
    with pytest.raises(UsageError, match="eta"):
        SM.sample("euler", lambda x, s: x, torch.ones(1, 1), [1.0, 0.0], eta=0.5)


def test_sampler_names_for_the_cli_match_the_registry_and_do_not_import_torch():
    import subprocess
    import sys

    from ldmtool.diffusion.names import SAMPLER_NAMES

    assert SAMPLER_NAMES == tuple(SM.SAMPLERS)
    probe = "import sys, ldmtool.diffusion.names; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "False"
