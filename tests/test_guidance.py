"""Classifier-free guidance, img2img strength and masked sampling with a feathered composite."""
import pytest
import torch

from ldmtool.diffusion import samplers as SM
from ldmtool.diffusion.cond import Cond, Guided
from ldmtool.diffusion.denoisers import DiscreteDenoiser, bind
from ldmtool.diffusion.guidance import CFGDenoiser, cat_conds
from ldmtool.diffusion.img2img import img2img_schedule, noised_latent, strength_steps
from ldmtool.diffusion.masked import composite, feather, latent_repaint_mask, masked_model
from ldmtool.diffusion.oracle import GaussianData
from ldmtool.diffusion.run import SamplerSettings, sample_latents
from ldmtool.diffusion.schedules import alphas_cumprod_from_betas, karras_schedule, make_betas
from ldmtool.errors import UsageError
from ldmtool.runtime.seeds import NoiseSource

AC = alphas_cumprod_from_betas(make_betas("linear", 1000, 0.00085, 0.012))


class ContextNet:
    """A fake cross-attention UNet whose output depends on x, t and the context; counts its calls."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, context=None, y=None):
        self.batches.append(x.shape[0])
        return torch.tanh(x) * context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1) / 2000


def text(value: float, batch: int = 2) -> Cond:
    return Cond(crossattn=torch.full((batch, 3, 8), value))


@pytest.fixture
def setup():
    net = ContextNet()
    denoise = DiscreteDenoiser(net, AC, "eps", "crossattn")
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    return net, denoise, x, torch.tensor([3.0, 0.7])


def test_scale_one_is_exactly_the_conditional_prediction_in_one_pass(setup):
    net, denoise, x, sigma = setup
    expected = denoise(x, sigma, text(0.5))
    net.batches.clear()
    out = CFGDenoiser(denoise)(x, sigma, Guided(text(0.5), text(-1.0), 1.0))
    assert torch.equal(out, expected) and net.batches == [1, 1]  # one pass: the two rows of the cond batch
    assert torch.equal(CFGDenoiser(denoise)(x, sigma, Guided(text(0.5), None, 7.5)), expected)


def test_cond_and_uncond_share_one_batch_and_combine_linearly(setup):
    net, denoise, x, sigma = setup
    cond_x0, uncond_x0 = denoise(x, sigma, text(0.5)), denoise(x, sigma, text(-1.0))
    net.batches.clear()
    out = CFGDenoiser(denoise)(x, sigma, Guided(text(0.5), text(-1.0), 7.5))
    assert net.batches == [1] * 4  # one denoiser batch (2 items x cond/uncond), the network called per row
    torch.testing.assert_close(out, uncond_x0 + 7.5 * (cond_x0 - uncond_x0), rtol=1e-5, atol=1e-5)


def test_negative_conditioning_takes_the_place_of_the_unconditional(setup):
    _, denoise, x, sigma = setup
    positive, negative = denoise(x, sigma, text(0.5)), denoise(x, sigma, text(2.0))
    out = CFGDenoiser(denoise)(x, sigma, Guided(text(0.5), text(2.0), 3.0))
    torch.testing.assert_close(out, negative + 3.0 * (positive - negative), rtol=1e-5, atol=1e-5)
    # guidance pushes away from the negative: the result is farther from it than the plain prediction
    assert (out - negative).norm() > (positive - negative).norm()


def test_plain_cond_passes_through_and_mismatched_conds_are_refused(setup):
    _, denoise, x, sigma = setup
    assert torch.equal(CFGDenoiser(denoise)(x, sigma, text(0.5)), denoise(x, sigma, text(0.5)))
    with pytest.raises(ValueError, match="y"):
        cat_conds(Cond(y=torch.ones(2)), Cond())
    with pytest.raises(ValueError, match="crossattn"):
        cat_conds(Cond(crossattn=torch.ones(1, 77, 8)), Cond(crossattn=torch.ones(1, 76, 8)))
    with pytest.raises(ValueError, match="cannot share a batch"):  # one uncond row for two items
        cat_conds(Cond(crossattn=torch.ones(1, 77, 8)), Cond(crossattn=torch.ones(2, 77, 8)))


# --- img2img -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, strength, expected", [(10, 0.3, 3), (100, 0.29, 29), (50, 1.0, 50), (50, 0.0, 0), (7, 0.5, 3)])
def test_strength_runs_the_last_floor_of_strength_times_steps(steps, strength, expected):
    assert strength_steps(steps, strength) == expected


def test_img2img_starts_from_the_latent_noised_to_the_first_step_it_runs():
    full = SM.default_schedule("ddim", AC, 20)
    part = img2img_schedule(full, 0.25)
    assert part.steps == 5 and torch.equal(part.sigmas, full.sigmas[15:])
    assert part.timesteps.tolist() == full.timesteps[15:].tolist()
    latent, noise = torch.ones(1, 4, 2, 2), torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noised_latent(latent, part, noise), latent + float(full.sigmas[15]) * noise)
    untouched = img2img_schedule(full, 0.0)
    assert untouched.steps == 0
    assert torch.equal(SM.sample("ddim", lambda x, s: x * 0, noised_latent(latent, untouched, noise), untouched.sigmas), latent)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan")])
def test_strength_out_of_range_is_a_usage_error(strength):
    with pytest.raises(UsageError, match="strength"):
        strength_steps(10, strength)


# --- masked sampling and the feathered composite -----------------------------------------------------


def half_mask(h=16, w=16, batch=2):
    mask = torch.zeros(batch, 1, h, w)
    mask[..., :, w // 2 :] = 1  # repaint the right half
    return mask


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "dpmpp_2m", "ddim"])
def test_masked_sampling_keeps_the_known_region_and_the_composite_keeps_it_exactly(name):
    data = GaussianData(torch.tensor([0.3, -0.2, 0.1, 0.0]), torch.tensor([0.8, 0.5, 1.0, 0.6]))
    known = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    repaint = half_mask()
    source = NoiseSource([11, 12])
    sched = karras_schedule(12, 0.01, 20.0)
    model = masked_model(data.denoise, known, repaint, source.like)
    x = source.randn((4, 16, 16)) * float(sched.sigmas[0])
    result = SM.sample(name, model, x, sched.sigmas, noise=source.like)
    keep = repaint == 0
    assert torch.allclose(result.expand_as(known)[keep.expand_as(known)], known[keep.expand_as(known)], atol=1e-4)
    assert (result - known)[:, :, :, 10:].abs().mean() > 0.3  # the repaint region was resampled
    radius = 3
    final = composite(known, result, repaint, radius)
    # the mask edge is between columns 7 and 8; the band is the `radius` columns on either side of it
    assert torch.equal(final[..., : 8 - radius], known[..., : 8 - radius])
    assert torch.equal(final[..., 8 + radius :], result[..., 8 + radius :])


def test_masked_model_feeds_the_network_the_known_region_at_the_current_noise_level():
    known, repaint = torch.full((1, 1, 2, 4), 5.0), half_mask(2, 4, 1)
    seen = []

    def model(x, sigma):
        seen.append(x.clone())
        return torch.zeros_like(x)

    wrapped = masked_model(model, known, repaint, lambda x: torch.ones_like(x))
    out = wrapped(torch.full((1, 1, 2, 4), -3.0), torch.tensor([2.0]))
    assert seen[0][..., :2].eq(7.0).all() and seen[0][..., 2:].eq(-3.0).all()  # 5 + 2 * noise; untouched
    assert out[..., :2].eq(5.0).all() and out[..., 2:].eq(0.0).all()


def test_feather_is_zero_beyond_the_radius_one_deep_inside_and_the_mask_at_radius_zero():
    mask = half_mask(8, 20, 1)
    soft = feather(mask, 3)
    row = soft[0, 0, 4]
    assert row[:7].eq(0).all() and row[13:].eq(1).all()
    assert torch.all((row[7:13] > 0) & (row[7:13] < 1)) and torch.all(row[1:] >= row[:-1])
    assert torch.equal(feather(mask, 0), mask)


def test_composite_outside_the_band_is_the_input_exactly():
    image = torch.rand(1, 3, 8, 20, generator=torch.Generator().manual_seed(0)) * 2 - 1
    result = torch.rand(1, 3, 8, 20, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = composite(image, result, half_mask(8, 20, 1), 3)
    assert torch.equal(out[..., :7], image[..., :7]) and torch.equal(out[..., 13:], result[..., 13:])
    assert not torch.equal(out[..., 7:13], image[..., 7:13])
    with pytest.raises(ValueError, match="shape"):
        composite(image, result[..., :4], half_mask(8, 20, 1), 3)


def test_latent_mask_repaints_a_cell_if_any_of_its_pixels_is_repainted():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 5, 9] = 1
    latent = latent_repaint_mask(mask, (2, 2))
    assert latent.tolist() == [[[[0.0, 1.0], [0.0, 0.0]]]]


def test_guided_sampling_batch_of_two_gives_each_item_what_it_gets_alone():
    denoise = CFGDenoiser(DiscreteDenoiser(ContextNet(), AC, "eps", "crossattn"))
    sched = SM.default_schedule("euler_a", AC, 8)

    def run(seeds, values):
        cond = Guided(Cond(crossattn=torch.stack([torch.full((3, 8), v) for v in values])), text(0.1, len(seeds)), 5.0)
        source = NoiseSource(seeds)
        x = SM.start_latent(source.randn((4, 4, 4)), float(sched.sigmas[0]))
        return SM.sample("euler_a", bind(denoise, cond), x, sched.sigmas, noise=source.like)

    both = run([5, 6], [0.4, 0.9])
    assert torch.equal(both[1], run([6], [0.9])[0])


# --- sample_latents: settings to latents -------------------------------------------------------------


def test_sample_latents_txt2img_is_the_default_schedule_from_the_scaled_start_noise():
    denoise = CFGDenoiser(DiscreteDenoiser(ContextNet(), AC, "eps", "crossattn"))
    cond = Guided(text(0.5, 1), text(0.0, 1), 4.0)
    settings = SamplerSettings("dpmpp_2m", steps=6)
    seen = []
    out = sample_latents(denoise, cond, AC, NoiseSource([3]), settings, shape=(4, 4, 4), callback=seen.append)
    sched = SM.default_schedule("dpmpp_2m", AC, 6)
    x = SM.start_latent(NoiseSource([3]).randn((4, 4, 4)), float(sched.sigmas[0]))
    assert torch.equal(out, SM.sample("dpmpp_2m", bind(denoise, cond), x, sched.sigmas)) and len(seen) == 6


def test_sample_latents_img2img_runs_the_strength_tail_and_strength_zero_keeps_the_latent():
    denoise = DiscreteDenoiser(ContextNet(), AC, "eps", "crossattn")
    init = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = []
    sample_latents(denoise, text(0.5), AC, NoiseSource([1, 2]), SamplerSettings("euler", steps=10, strength=0.4),
                   init_latent=init, callback=seen.append)
    assert [s.index for s in seen] == [0, 1, 2, 3]
    kept = sample_latents(denoise, text(0.5), AC, NoiseSource([1, 2]), SamplerSettings("euler", 10, strength=0.0), init_latent=init)
    assert torch.equal(kept, init)


def test_sample_latents_masked_keeps_the_known_latent_and_items_do_not_depend_on_the_batch():
    denoise = DiscreteDenoiser(ContextNet(), AC, "eps", "crossattn")
    init = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    repaint = half_mask(8, 8, 3)
    settings = SamplerSettings("euler_a", steps=8)
    out = sample_latents(denoise, text(0.5, 3), AC, NoiseSource([4, 5, 6]), settings, init_latent=init, repaint=repaint)
    torch.testing.assert_close(out[..., :4], init[..., :4], rtol=0, atol=1e-3)
    alone = sample_latents(denoise, text(0.5, 1), AC, NoiseSource([6]), settings, init_latent=init[2:], repaint=repaint[2:])
    assert torch.equal(out[2:], alone)


def test_sample_latents_refuses_incomplete_requests():
    with pytest.raises(ValueError, match="shape"):
        sample_latents(lambda x, s, c: x, None, AC, NoiseSource([1]), SamplerSettings())
    with pytest.raises(ValueError, match="initial latent"):
        sample_latents(lambda x, s, c: x, None, AC, NoiseSource([1]), SamplerSettings(), shape=(4, 2, 2), repaint=torch.ones(1, 1, 2, 2))


def test_temperature_scales_the_starting_noise_exactly():
    """With a denoiser that predicts x0 = 0, DDIM (eta 0) and Euler are linear in the starting latent, so the
    result at temperature t is exactly t times the result at temperature 1; img2img ignores temperature."""
    zero = lambda x, sigma, cond=None: torch.zeros_like(x)  # noqa: E731
    for sampler in ("ddim", "euler"):
        run = lambda t: sample_latents(zero, None, AC, NoiseSource([4]), SamplerSettings(sampler, steps=5, temperature=t),  # noqa: E731, B023
                                       shape=(4, 4, 4))
        torch.testing.assert_close(run(0.3), 0.3 * run(1.0), rtol=1e-5, atol=1e-6)
    init = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    tail = lambda t: sample_latents(zero, None, AC, NoiseSource([4]), SamplerSettings("euler", 5, strength=0.5, temperature=t),  # noqa: E731
                                    init_latent=init)
    assert torch.equal(tail(0.3), tail(1.0))
