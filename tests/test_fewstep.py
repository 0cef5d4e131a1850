"""Few-step sampling (issue 25, item 6): lcm and tcd against diffusers 0.42.1's LCMScheduler / TCDScheduler,
step by step on the same network outputs, timesteps and noise; the spacings against diffusers'
`timestep_spacing` and A1111's "SGM Uniform" / "Simple" schedule types (their loops written out here)."""
import math

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler

from ldmtool.diffusion import samplers as SM
from ldmtool.diffusion.denoisers import DiscreteDenoiser, bind
from ldmtool.diffusion.schedules import alphas_cumprod_from_betas, discrete_sigmas, make_betas, sampling_schedule
from ldmtool.errors import UsageError

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
AC = alphas_cumprod_from_betas(make_betas("linear", 1000, 0.00085, 0.012))


def wavy_net(x, t, context=None, y=None):
    """A deterministic, nonlinear, timestep-dependent stand-in for a UNet (eps or v, as the test reads it)."""
    tt = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.4 * x * torch.cos(tt / 300) + 0.2 * torch.tanh(x + tt / 1000)


def seeded_noise(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


def reference_states(scheduler, x_vp, step_kwargs):
    states = []
    for t in scheduler.timesteps:
        out = scheduler.step(wavy_net(x_vp, t.reshape(1).expand(len(x_vp))), t, x_vp, **step_kwargs)
        x_vp = out.prev_sample
        states.append(x_vp)
    return states


def ours(name, scheduler, x_vp, parameterization="eps", **opts):
    """Our sampler from the same VP start, each state returned in the VP form diffusers keeps."""
    sched = SM.default_schedule(name, scheduler.alphas_cumprod, len(scheduler.timesteps))
    assert sched.timesteps.tolist() == scheduler.timesteps.tolist()
    model = bind(DiscreteDenoiser(wavy_net, scheduler.alphas_cumprod, parameterization), None)
    x = SM.start_latent(x_vp, float(sched.sigmas[0]))
    steps = SM.progressive(name, model, x, sched.sigmas, noise=seeded_noise(7),
                           model_sigmas=discrete_sigmas(scheduler.alphas_cumprod), **opts)
    return [step.x / math.sqrt(step.sigma_next**2 + 1) for step in steps]


def start(seed=0):
    return torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps, parameterization", [(1, "eps"), (4, "eps"), (8, "eps"), (4, "v")])
def test_lcm_steps_equal_diffusers_lcm_scheduler(steps, parameterization):
    prediction = {"eps": "epsilon", "v": "v_prediction"}[parameterization]
    ref = LCMScheduler(**SD_BETAS, prediction_type=prediction, timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(steps)
    x_vp = start()
    expected = reference_states(ref, x_vp, {"generator": torch.Generator().manual_seed(7)})
    for mine, theirs in zip(ours("lcm", ref, x_vp, parameterization), expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 4, 8])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_steps_equal_diffusers_tcd_scheduler(steps, gamma):
    ref = TCDScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(steps)
    x_vp = start(1)
    expected = reference_states(ref, x_vp, {"eta": gamma, "generator": torch.Generator().manual_seed(7)})
    for mine, theirs in zip(ours("tcd", ref, x_vp, tcd_gamma=gamma), expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_lcm_boundary_condition_is_what_separates_it_from_plain_renoising():
    """Without the sigma table the boundary terms are left out: the difference is c_skip x_vp, small but real."""
    sched = SM.default_schedule("lcm", AC, 8)
    model = bind(DiscreteDenoiser(wavy_net, AC), None)
    x = SM.start_latent(start(), float(sched.sigmas[0]))
    with_boundary = SM.sample("lcm", model, x, sched.sigmas, noise=seeded_noise(3), model_sigmas=discrete_sigmas(AC))
    without = SM.sample("lcm", model, x, sched.sigmas, noise=seeded_noise(3))
    assert 0 < float((with_boundary - without).abs().max()) < 1e-4 * float(without.abs().max())


def test_lcm_spacing_is_the_schedulers_timesteps_for_every_step_count():
    ref = LCMScheduler(**SD_BETAS)
    for steps in range(1, 51):
        ref.set_timesteps(steps)
        assert sampling_schedule(AC, steps, "lcm").timesteps.tolist() == ref.timesteps.tolist(), steps
    with pytest.raises(UsageError, match="1 to 50"):
        sampling_schedule(AC, 51, "lcm")


def test_tcd_default_schedule_ends_at_the_first_training_step_as_the_reference():
    sched = SM.default_schedule("tcd", AC, 4)
    assert float(sched.sigmas[-1]) == pytest.approx(float(discrete_sigmas(AC)[0]))
    with pytest.raises(UsageError, match="--tcd-gamma"):
        SM.sample("euler", lambda x, s: x, torch.ones(1, 1), [1.0, 0.0], tcd_gamma=0.3)


# --- spacings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_euler_with_a_spacing_equals_diffusers_euler_with_that_timestep_spacing(spacing, steps):
    """SDXL-Lightning and Hyper-SD's setting: Euler, "trailing"; the whole trajectory, not only the timesteps."""
    offset = 1 if spacing == "leading" else 0
    ref = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(steps)
    sched = SM.default_schedule("euler", AC, steps, spacing=spacing, offset=offset)
    assert sched.timesteps.tolist() == ref.timesteps.tolist()
    x = start(2) * float(ref.init_noise_sigma)
    model = bind(DiscreteDenoiser(wavy_net, AC), None)
    mine = [step.x for step in SM.progressive_euler(model, x, sched.sigmas)]
    for i, t in enumerate(ref.timesteps):
        x = ref.step(wavy_net(ref.scale_model_input(x, t), t.reshape(1).expand(len(x))), t, x).prev_sample
        torch.testing.assert_close(mine[i], x, rtol=1e-5, atol=1e-5)


def test_euler_a_trailing_one_step_equals_diffusers_as_sdxl_turbo_runs():
    ref = EulerAncestralDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing")
    ref.set_timesteps(1)
    sched = SM.default_schedule("euler_a", AC, 1, spacing="trailing")
    x = start(3) * float(ref.init_noise_sigma)
    model = bind(DiscreteDenoiser(wavy_net, AC), None)
    (mine,) = SM.progressive_euler_a(model, x, sched.sigmas, noise=seeded_noise(0))
    t = ref.timesteps[0]
    expected = ref.step(wavy_net(ref.scale_model_input(x, t), t.reshape(1).expand(len(x))), t, x).prev_sample
    torch.testing.assert_close(mine.x, expected, rtol=1e-5, atol=1e-5)


def a1111_sigmas():
    """k-diffusion's DiscreteSchedule: sigmas ascending in t, float32, and its log-linear t -> sigma."""
    sigmas = ((1 - AC) / AC).sqrt().float()

    def t_to_sigma(t):
        low, high, w = int(math.floor(t)), int(math.ceil(t)), t - math.floor(t)
        return math.exp((1 - w) * math.log(sigmas[low]) + w * math.log(sigmas[high]))

    return sigmas, t_to_sigma


@pytest.mark.parametrize("steps", [1, 4, 7, 30])
def test_sgm_uniform_is_a1111s_schedule_type(steps):
    sigmas, t_to_sigma = a1111_sigmas()
    # modules/sd_schedulers.py, sgm_uniform: t from sigma_max's (T - 1) to sigma_min's (0), n + 1 points, the
    # last dropped, then a final 0
    expected = [t_to_sigma(float(t)) for t in torch.linspace(len(sigmas) - 1, 0, steps + 1)[:-1]] + [0.0]
    np.testing.assert_allclose(sampling_schedule(AC, steps, "sgm_uniform").sigmas.numpy(), expected, rtol=2e-6)


@pytest.mark.parametrize("steps", [1, 4, 7, 30])
def test_simple_is_a1111s_schedule_type(steps):
    sigmas, _ = a1111_sigmas()
    stride = len(sigmas) / steps  # modules/sd_schedulers.py, simple_scheduler
    expected = [float(sigmas[-(1 + int(x * stride))]) for x in range(steps)] + [0.0]
    np.testing.assert_allclose(sampling_schedule(AC, steps, "simple").sigmas.numpy(), expected, rtol=2e-6)


def test_spacing_names_for_the_cli_are_the_schedules_spacings():
    from ldmtool.diffusion.names import SPACING_NAMES
    from ldmtool.diffusion.schedules import Spacing

    assert SPACING_NAMES == tuple(spacing.value for spacing in Spacing)


@pytest.mark.parametrize("spacing", ["karras", "linspace", "leading"])
def test_tcd_on_a_spacing_that_reaches_timestep_0_runs_and_its_last_step_keeps_x(spacing):
    """TCD ends at the model's smallest sigma; these spacings are there one step early (tcd --spacing karras
    failed every item with 'sigmas must descend'). That last step stays at the level: x comes out unchanged."""
    ac = AC.float()  # a model's float32 table, whose Karras end rounds above its smallest sigma
    schedule = SM.default_schedule("tcd", ac, 4, spacing=spacing)
    assert float(schedule.sigmas[-1]) == float(schedule.sigmas[-2]) == pytest.approx(float(discrete_sigmas(ac)[0]))
    model = bind(DiscreteDenoiser(wavy_net, ac), None)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * float(schedule.sigmas[0])
    steps = list(SM.progressive("tcd", model, x, schedule.sigmas, noise=seeded_noise(1), model_sigmas=discrete_sigmas(ac)))
    assert len(steps) == 4 and torch.isfinite(steps[-1].x).all()
    assert torch.allclose(steps[-1].x, steps[-2].x, atol=1e-6)
