"""Flow-matching sampling: the VE-form denoiser against the flow equations, diffusers' FlowMatchEulerDiscreteScheduler
(schedules and Euler steps, as FluxPipeline and StableDiffusion3Pipeline call it), and the Gaussian oracle."""
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ldmtool.diffusion import samplers as SM
from ldmtool.diffusion.cond import Cond, Guided
from ldmtool.diffusion.flow import (
    FLOW_SAMPLERS,
    FlowDenoiser,
    FlowSpacing,
    FlowTimes,
    TimeShift,
    check_flow_sampler,
    flow_noised_latent,
    flow_schedule,
    flow_times,
    image_tokens,
    resolution_mu,
    sample_flow,
    sample_flow_latents,
)
from ldmtool.diffusion.guidance import CFGDenoiser
from ldmtool.diffusion.img2img import img2img_schedule
from ldmtool.diffusion.oracle import GaussianData
from ldmtool.diffusion.run import SamplerSettings
from ldmtool.errors import UsageError
from ldmtool.runtime.seeds import NoiseSource
from ldmtool.tiling.fusion import TileConfig, TiledDenoiser

F64 = torch.float64
GAUSS = GaussianData(torch.tensor([0.5, -1.0, 2.0], dtype=F64), torch.tensor([0.3, 1.2, 0.6], dtype=F64))
STATIC = FlowTimes(TimeShift(3.0), FlowSpacing.TRAIN_RANGE)  # StableDiffusion3Pipeline's scheduler
UNSHIFTED = FlowTimes(TimeShift(1.0), FlowSpacing.UNIFORM)  # FluxPipeline with the schnell scheduler


def resolution(tokens: int) -> FlowTimes:
    """FluxPipeline with the dev scheduler at an image of `tokens` patches."""
    return FlowTimes(TimeShift(mu=resolution_mu(tokens)), FlowSpacing.UNIFORM)


def gaussian_velocity(data: GaussianData):
    """The exact velocity E[noise - x0 | x_t] for x_t = (1 - t) x0 + t noise, written in flow coordinates."""

    def network(x_t, t, cond=None):
        tt, mu, var = t.to(F64).reshape(-1, 1, 1, 1), data.mean.reshape(-1, 1, 1), (data.std**2).reshape(-1, 1, 1)
        x0 = mu + (1 - tt) * var / ((1 - tt) ** 2 * var + tt**2) * (x_t - (1 - tt) * mu)
        return (x_t - x0) / tt

    return network


def wavy_velocity(x_t, t, cond=None):
    """A deterministic, nonlinear, time-dependent stand-in for a transformer."""
    tt = t.to(x_t.dtype).reshape(-1, 1, 1, 1)
    return 0.7 * x_t * torch.cos(3 * tt) - 0.3 * torch.tanh(x_t + tt)


def diffusers_scheduler(times: FlowTimes, steps: int, tokens: int = 1024) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler set up as the reference pipeline for these times sets it up."""
    if times.shift.mu is not None:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(tokens))
    elif times.spacing is FlowSpacing.UNIFORM:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=times.shift.shift)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(tokens))
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=times.shift.shift)
        scheduler.set_timesteps(steps)
    return scheduler


def noise_at_start(shape, seed=0, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- the parameterisation ------------------------------------------------------------------------------


def test_flow_denoiser_over_the_exact_velocity_is_the_exact_ve_denoiser():
    x = noise_at_start((4, 3, 1, 1)) * 3
    sigma = torch.tensor([0.01, 0.7, 5.0, 300.0], dtype=F64)
    out = FlowDenoiser(gaussian_velocity(GAUSS))(x, sigma)
    torch.testing.assert_close(out, GAUSS.denoise(x, sigma), rtol=0, atol=1e-10)


def test_at_sigma_inf_the_state_is_the_noise_and_the_network_sees_t_1():
    seen = {}

    def network(x_t, t, cond=None):
        seen.update(x_t=x_t, t=t)
        return wavy_velocity(x_t, t)

    noise = noise_at_start((2, 3, 4, 4), dtype=torch.float32)
    out = FlowDenoiser(network)(noise, torch.full((2,), math.inf))
    assert torch.equal(seen["x_t"], noise) and torch.equal(seen["t"], torch.ones(2))
    torch.testing.assert_close(out, noise - wavy_velocity(noise, torch.ones(2)))


def test_euler_in_ve_form_is_the_flow_euler_step():
    times = resolution(256)
    schedule = flow_schedule(7, times)
    t = flow_times(schedule.sigmas)
    x_flow = noise = noise_at_start((2, 3, 5, 5))
    for t_now, t_next in zip(t[:-1], t[1:]):
        x_flow = x_flow + (t_next - t_now) * wavy_velocity(x_flow, t_now.expand(2))
    out = sample_flow("euler", FlowDenoiser(wavy_velocity), noise, schedule.sigmas)
    torch.testing.assert_close(out, x_flow, rtol=0, atol=1e-12)


# --- schedules and Euler against diffusers --------------------------------------------------------------


def test_resolution_mu_is_the_reference_line():
    for tokens in (64, 256, 1024, 4096, 16384):
        assert resolution_mu(tokens) == pytest.approx(calculate_shift(tokens), abs=1e-12)
    assert image_tokens((128, 128)) == 4096 and image_tokens((64, 96)) == 1536


@pytest.mark.parametrize("times, tokens", [(STATIC, 1024), (UNSHIFTED, 1024), (resolution(64), 64),
                                           (resolution(1024), 1024), (resolution(4096), 4096)],
                         ids=["static-3", "unshifted", "mu-64", "mu-1024", "mu-4096"])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_schedules_equal_the_diffusers_scheduler_as_the_pipelines_set_it(times, tokens, steps):
    reference = diffusers_scheduler(times, steps, tokens)
    ours = flow_schedule(steps, times)
    torch.testing.assert_close(flow_times(ours.sigmas), reference.sigmas.double(), rtol=0, atol=2e-7)
    torch.testing.assert_close(ours.timesteps, reference.timesteps.double(), rtol=0, atol=2e-4)
    assert math.isinf(float(ours.sigmas[0])) and float(ours.sigmas[-1]) == 0


@pytest.mark.parametrize("times", [STATIC, resolution(1024), UNSHIFTED], ids=["static-3", "mu-1024", "unshifted"])
def test_an_euler_run_equals_the_diffusers_scheduler_steps(times):
    steps = 6
    scheduler = diffusers_scheduler(times, steps)
    noise = noise_at_start((1, 4, 6, 6), seed=3, dtype=torch.float32)
    latents = noise.clone()
    for timestep in scheduler.timesteps:
        t = (timestep / 1000).expand(1)  # what FluxPipeline hands its transformer; SD3 keeps the 1000 scale
        latents = scheduler.step(wavy_velocity(latents, t), timestep, latents).prev_sample
    ours = sample_flow("euler", FlowDenoiser(wavy_velocity), noise, flow_schedule(steps, times).sigmas)
    torch.testing.assert_close(ours, latents, rtol=0, atol=2e-5)


# --- samplers against the Gaussian oracle ----------------------------------------------------------------

DETERMINISTIC = {"euler": 1, "heun": 2, "dpmpp_2m": 2, "unipc": 3, "plms": 2}


def exact_flow_solution(noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Where the probability-flow ODE started in pure noise at t = 1 is at VE level sigma (per dimension,
    mu + noise sqrt(s^2 + sigma^2)); at sigma 0 the flow model maps noise to mu + s noise."""
    return GAUSS.mean.reshape(-1, 1, 1) + noise * (GAUSS.std.reshape(-1, 1, 1) ** 2 + sigma**2).sqrt()


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_to_the_exact_flow_at_their_order(name):
    """Measured to the schedule's last nonzero level: the final jump to 0 is the same x0 read-out for all."""
    noise, steps, errors = noise_at_start((32, 3, 1, 1)), [40, 80, 160, 320], []
    for n in steps:
        sigmas = flow_schedule(n, STATIC).sigmas[:-1]
        out = sample_flow(name, FlowDenoiser(gaussian_velocity(GAUSS)), noise, sigmas)
        errors.append((out - exact_flow_solution(noise, float(sigmas[-1]))).abs().max().item())
    order = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert DETERMINISTIC[name] - 0.3 < order < DETERMINISTIC[name] + 0.6, (errors, order)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_end_near_the_exact_flow_image(name):
    noise = noise_at_start((32, 3, 1, 1), seed=1)
    out = sample_flow(name, FlowDenoiser(gaussian_velocity(GAUSS)), noise, flow_schedule(200, resolution(1024)).sigmas)
    assert (out - exact_flow_solution(noise, 0.0)).abs().max() < 0.03


def test_ddim_without_eta_is_euler_on_a_flow_schedule():
    noise, sigmas = noise_at_start((2, 3, 4, 4)), flow_schedule(5, STATIC).sigmas
    denoise = FlowDenoiser(wavy_velocity)
    torch.testing.assert_close(sample_flow("ddim", denoise, noise, sigmas), sample_flow("euler", denoise, noise, sigmas),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, opts", [("euler_a", {}), ("ddpm", {}), ("ddim", {"eta": 1.0}), ("dpmpp_2m_sde", {})])
def test_stochastic_samplers_reproduce_the_data_moments_through_the_flow_form(name, opts):
    data = GaussianData(GAUSS.mean[:2], GAUSS.std[:2])
    n = 10000
    generator = torch.Generator().manual_seed(4)
    out = sample_flow(name, FlowDenoiser(gaussian_velocity(data)), torch.randn(n, 2, 1, 1, dtype=F64, generator=generator),
                      flow_schedule(300, STATIC).sigmas, noise=lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype),
                      **opts)[..., 0, 0]
    assert torch.all((out.mean(0) - data.mean).abs() < 5 * data.std / math.sqrt(n))
    cov = torch.cov(out.T)
    assert torch.all((cov.diagonal() - data.std**2).abs() < 5 * data.std**2 * math.sqrt(2 / n)), cov
    assert abs(float(cov[0, 1])) < 5 * float(data.std.prod()) / math.sqrt(n)


def test_samplers_outside_the_flow_list_are_usage_errors(monkeypatch):
    assert set(FLOW_SAMPLERS) <= set(SM.SAMPLERS)
    assert check_flow_sampler("Euler a") == "euler_a"
    monkeypatch.setattr("ldmtool.diffusion.flow.FLOW_SAMPLERS", ("euler", "heun"))  # as for a sampler added later
    with pytest.raises(UsageError, match=r"--sampler plms does not apply to flow-matching models \(choose one of euler, heun\)"):
        check_flow_sampler("plms")
    with pytest.raises(UsageError, match="--eta 0.5 does not apply to the euler sampler"):
        sample_flow("euler", FlowDenoiser(wavy_velocity), noise_at_start((1, 3, 2, 2)), flow_schedule(1).sigmas, eta=0.5)


def test_one_step_from_noise_is_the_x0_prediction_and_progress_counts_every_step():
    noise = noise_at_start((1, 3, 4, 4))
    steps = []
    out = sample_flow("heun", FlowDenoiser(wavy_velocity), noise, flow_schedule(1, UNSHIFTED).sigmas)
    torch.testing.assert_close(out, noise - wavy_velocity(noise, torch.ones(1)), rtol=0, atol=1e-12)
    sample_flow("heun", FlowDenoiser(wavy_velocity), noise, flow_schedule(4, STATIC).sigmas, callback=steps.append)
    assert [(s.index, s.total) for s in steps] == [(i, 4) for i in range(4)] and math.isinf(steps[0].sigma)


# --- img2img and masked sampling -----------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.5, 0.75, 1.0])
def test_img2img_start_equals_the_reference_scale_noise_and_timesteps(strength):
    """diffusers' flow img2img pipelines run the last n - int(n - n s) steps; that is this tool's floor(n s)
    whenever n s is whole (the two differ only at fractional n s: the references round up, img2img.py down)."""
    steps = 8
    scheduler = diffusers_scheduler(STATIC, steps)
    start = int(steps - steps * strength)
    latent, noise = noise_at_start((1, 4, 4, 4), seed=5, dtype=torch.float32), noise_at_start((1, 4, 4, 4), seed=6, dtype=torch.float32)
    scheduler.set_begin_index(start)
    reference = scheduler.scale_noise(latent, scheduler.timesteps[start:start + 1], noise)
    tail = img2img_schedule(flow_schedule(steps, STATIC), strength)
    torch.testing.assert_close(tail.timesteps, scheduler.timesteps[start:].double(), rtol=0, atol=2e-4)
    sigma = float(tail.sigmas[0])
    ours = flow_noised_latent(latent, tail, noise)
    torch.testing.assert_close(ours if math.isinf(sigma) else ours / (1 + sigma), reference, rtol=0, atol=1e-6)


def test_img2img_through_sample_flow_latents_keeps_the_image_at_strength_0_and_ignores_it_at_1():
    latent = noise_at_start((1, 3, 4, 4), seed=7, dtype=torch.float32)
    denoise = FlowDenoiser(wavy_velocity)
    kept = sample_flow_latents(denoise, None, NoiseSource([1]), SamplerSettings("euler", 4, strength=0.0), STATIC,
                               init_latent=latent)
    assert torch.equal(kept, latent)
    full = sample_flow_latents(denoise, None, NoiseSource([1]), SamplerSettings("euler", 4, strength=1.0), STATIC,
                               init_latent=latent)
    fresh = sample_flow_latents(denoise, None, NoiseSource([1]), SamplerSettings("euler", 4), STATIC, shape=(3, 4, 4))
    torch.testing.assert_close(full, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_masked_flow_sampling_keeps_the_known_region_and_repaints_the_rest(strength):
    data = GaussianData(torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64))
    known = torch.full((1, 3, 4, 4), 5.0, dtype=F64)  # far from the data, so a repainted cell cannot stay there
    repaint = torch.zeros(1, 1, 4, 4, dtype=F64)
    repaint[..., :, 2:] = 1
    seen_at_noise = []

    def network(x_t, t, cond=None):
        if float(t[0]) == 1:
            seen_at_noise.append(x_t.clone())
        return gaussian_velocity(data)(x_t, t)

    out = sample_flow_latents(FlowDenoiser(network), None, NoiseSource([2]), SamplerSettings("euler", 6, strength=strength),
                              STATIC, init_latent=known, repaint=repaint, dtype=F64)
    torch.testing.assert_close(out[..., :2], known[..., :2], rtol=0, atol=1e-9)
    assert (out[..., 2:] - known[..., 2:]).abs().min() > 1.0
    assert bool(seen_at_noise) == (strength == 1.0)
    if seen_at_noise:  # at t = 1 the kept region is re-noised all the way: the network sees no trace of it
        assert seen_at_noise[0][..., :2].abs().max() < 4.5


# --- guidance and the tiled engine over the noise state at t = 1 -------------------------------------------


def conditioned_velocity(x_t, t, cond):
    """Pointwise in space, so tiles fused with weights that sum to 1 give the untiled prediction."""
    return wavy_velocity(x_t, t) + cond.y.to(x_t.dtype).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("shift", [False, True])
def test_guidance_and_the_tiled_engine_pass_the_flow_state_through_at_every_time(shift):
    denoise = FlowDenoiser(conditioned_velocity)
    tiled = CFGDenoiser(TiledDenoiser(denoise, TileConfig(tile=(16, 16), overlap=4, shift=shift, min_tile=8)))
    guided = Guided(Cond(y=torch.tensor([0.5])), Cond(y=torch.tensor([-0.25])), 3.0)
    x = noise_at_start((1, 3, 40, 40), seed=8, dtype=torch.float32)
    for level in (math.inf, 4.0, 0.3):
        sigma = torch.full((1,), level)
        expected = denoise(x, sigma, guided.uncond) + 3.0 * (denoise(x, sigma, guided.cond) - denoise(x, sigma, guided.uncond))
        torch.testing.assert_close(tiled(x, sigma, guided), expected, rtol=0, atol=2e-6)
    ours = sample_flow_latents(tiled, guided, NoiseSource([3]), SamplerSettings("dpmpp_2m", 5), STATIC, shape=(3, 40, 40))
    untiled = sample_flow_latents(CFGDenoiser(denoise), guided, NoiseSource([3]), SamplerSettings("dpmpp_2m", 5), STATIC,
                                  shape=(3, 40, 40))
    torch.testing.assert_close(ours, untiled, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_each_item_of_a_batch_gets_what_its_seed_gives_alone(name):
    """Issue 15's seeds: start noise and re-injected noise come from the item's own generator."""
    denoise, settings = FlowDenoiser(wavy_velocity), SamplerSettings(name, 4)
    both = sample_flow_latents(denoise, None, NoiseSource([11, 12]), settings, STATIC, shape=(3, 8, 8))
    for row, seed in enumerate([11, 12]):
        alone = sample_flow_latents(denoise, None, NoiseSource([seed]), settings, STATIC, shape=(3, 8, 8))
        torch.testing.assert_close(both[row : row + 1], alone, rtol=0, atol=1e-6)
    assert not torch.allclose(both[0], both[1])


@pytest.mark.parametrize("times", [STATIC, resolution(1024)], ids=["static-3", "mu-1024"])
def test_an_img2img_euler_run_equals_the_reference_loop(times):
    """The flow img2img pipelines' loop: scale_noise to the first kept timestep, then the scheduler's steps."""
    steps, strength = 8, 0.5
    latent = noise_at_start((1, 4, 6, 6), seed=9, dtype=torch.float32)
    noise = NoiseSource([21]).like(latent)  # the draw sample_flow_latents makes for this item
    scheduler = diffusers_scheduler(times, steps)
    start = int(steps - steps * strength)
    scheduler.set_begin_index(start)
    x = scheduler.scale_noise(latent, scheduler.timesteps[start:start + 1], noise)
    for timestep in scheduler.timesteps[start:]:
        x = scheduler.step(wavy_velocity(x, (timestep / 1000).expand(1)), timestep, x).prev_sample
    ours = sample_flow_latents(FlowDenoiser(wavy_velocity), None, NoiseSource([21]), SamplerSettings("euler", steps, strength=strength),
                               times, init_latent=latent)
    torch.testing.assert_close(ours, x, rtol=0, atol=2e-5)
