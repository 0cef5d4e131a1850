"""Schedules against diffusers 0.42.1 (the oracle) and the CompVis reference formulas written out here."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ldmtool.diffusion import schedules as S
from ldmtool.errors import UsageError

SD = dict(beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def sd_alphas_cumprod() -> torch.Tensor:
    return S.alphas_cumprod_from_betas(S.make_betas("linear", 1000, 0.00085, 0.012))


@pytest.mark.parametrize(
    "ours, theirs, start, end",
    [
        ("linear", "scaled_linear", 0.00085, 0.012),
        ("scaled_linear", "scaled_linear", 0.0015, 0.0195),
        ("plain_linear", "linear", 0.0001, 0.02),
        ("cosine", "squaredcos_cap_v2", 0.0001, 0.02),
    ],
)
def test_beta_schedules_match_diffusers(ours, theirs, start, end):
    betas = S.make_betas(ours, 1000, start, end)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end, beta_schedule=theirs)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    torch.testing.assert_close(betas.float(), ref.betas, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(S.alphas_cumprod_from_betas(betas).float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_ldm_linear_is_the_square_of_a_linspace_of_roots():
    betas = S.make_betas("linear", 1000, 0.0015, 0.0155)
    expected = np.linspace(math.sqrt(0.0015), math.sqrt(0.0155), 1000) ** 2
    np.testing.assert_allclose(betas.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("steps", [10, 25, 50, 200])
def test_uniform_spacing_is_the_compvis_list_and_diffusers_leading_offset_1(steps):
    ours = S.spaced_timesteps("uniform", steps, 1000)
    compvis = np.asarray(list(range(0, 1000, 1000 // steps))) + 1  # make_ddim_timesteps("uniform")
    assert ours.tolist() == compvis[::-1].tolist()
    ref = DDIMScheduler(**SD, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    ref.set_timesteps(steps)
    assert ours.tolist() == ref.timesteps.tolist()


def test_uniform_spacing_keeps_the_reference_quirk_of_extra_steps():
    assert len(S.spaced_timesteps("uniform", 30, 1000)) == 31  # range(0, 1000, 33) has 31 entries


def test_quad_spacing_is_the_compvis_formula():
    ours = S.spaced_timesteps("quad", 20, 1000)
    compvis = ((np.linspace(0, np.sqrt(1000 * 0.8), 20)) ** 2).astype(int) + 1
    assert ours.tolist() == compvis[::-1].tolist()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [7, 30, 50, 1000])
def test_diffusers_spacings_match_ddpm_scheduler(spacing, steps):
    ref = DDPMScheduler(**SD, beta_schedule="scaled_linear", timestep_spacing=spacing, steps_offset=1)
    ref.set_timesteps(steps)
    offset = 1 if spacing == "leading" else 0
    if spacing == "leading" and steps == 1000:
        offset = 0  # offset 1 would reach t = 1000; the reference DDPM chain is 999..0
        ref = DDPMScheduler(**SD, beta_schedule="scaled_linear", timestep_spacing=spacing, steps_offset=0)
        ref.set_timesteps(steps)
    assert S.spaced_timesteps(spacing, steps, 1000, offset).tolist() == ref.timesteps.tolist()


def test_too_many_steps_is_a_usage_error():
    with pytest.raises(UsageError, match="uniform"):
        S.spaced_timesteps("uniform", 1000, 1000)
    with pytest.raises(UsageError, match="out of range"):
        S.sampling_schedule(sd_alphas_cumprod(), 0, "karras")
    with pytest.raises(UsageError, match="repeat"):
        S.spaced_timesteps("quad", 500, 1000)  # the reference quad list starts 0, 0, 0, ... for many steps


@pytest.mark.parametrize("steps", [10, 25])
def test_karras_schedule_matches_dpmsolver_karras_sigmas_and_rounded_timesteps(steps):
    ref = DPMSolverMultistepScheduler(**SD, beta_schedule="scaled_linear", use_karras_sigmas=True, final_sigmas_type="zero")
    ref.set_timesteps(steps)
    # diffusers builds its betas in float32: feed the same alphas_cumprod so only the algorithm is compared
    ours = S.sampling_schedule(ref.alphas_cumprod, steps, "karras")
    torch.testing.assert_close(ours.sigmas.float(), ref.sigmas, rtol=1e-6, atol=0)
    assert ours.timesteps.round().long().tolist() == ref.timesteps.tolist()
    assert ours.sigmas[-1] == 0


def test_discrete_schedule_sigmas_are_the_model_sigmas_at_the_timesteps():
    ac = sd_alphas_cumprod()
    sched = S.sampling_schedule(ac, 50, "uniform", final="first")
    expected = ((1 - ac[sched.timesteps]) / ac[sched.timesteps]).sqrt()
    torch.testing.assert_close(sched.sigmas[:-1], expected, rtol=1e-12, atol=0)
    assert float(sched.sigmas[-1]) == pytest.approx(math.sqrt((1 - ac[0]) / ac[0]), rel=1e-12)
    assert sched.steps == 50 and torch.all(sched.sigmas[:-1] > sched.sigmas[1:])
    assert S.sampling_schedule(ac, 50, "uniform").sigmas[-1] == 0


def test_sigma_to_t_is_exact_on_the_grid_and_inverts_t_to_sigma():
    log_sigmas = S.discrete_sigmas(sd_alphas_cumprod()).log()
    grid = torch.tensor([0, 1, 500, 998, 999])
    assert S.sigma_to_t(log_sigmas[grid].exp(), log_sigmas).tolist() == grid.double().tolist()
    t = torch.tensor([0.25, 10.5, 733.125, 998.75], dtype=torch.float64)
    torch.testing.assert_close(S.sigma_to_t(S.t_to_sigma(t, log_sigmas), log_sigmas), t, rtol=0, atol=1e-9)
    # between grid points the interpolation is linear in log-sigma
    mid = ((log_sigmas[10] + log_sigmas[11]) / 2).exp()
    assert float(S.sigma_to_t(mid.reshape(1), log_sigmas)) == pytest.approx(10.5, abs=1e-9)


def test_tail_keeps_the_last_steps():
    sched = S.sampling_schedule(sd_alphas_cumprod(), 10, "leading")
    tail = sched.tail(4)
    assert tail.steps == 4 and tail.timesteps.tolist() == sched.timesteps[-4:].tolist()
    assert torch.equal(tail.sigmas, sched.sigmas[-5:])


def test_karras_schedule_for_a_continuous_model_ends_in_zero():
    sched = S.karras_schedule(5, 0.002, 80.0)
    assert sched.timesteps is None and sched.steps == 5
    assert float(sched.sigmas[0]) == pytest.approx(80.0) and float(sched.sigmas[-2]) == pytest.approx(0.002)
    assert sched.sigmas[-1] == 0
