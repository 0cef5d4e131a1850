"""The discrete-time wrapper: VP/VE conversion, eps/v/x0 parameterisations, timesteps, conditioning dispatch."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ldmtool.diffusion.cond import Cond
from ldmtool.diffusion.denoisers import DiscreteDenoiser, bind
from ldmtool.diffusion.schedules import alphas_cumprod_from_betas, make_betas

AC = alphas_cumprod_from_betas(make_betas("linear", 1000, 0.00085, 0.012))


class Recorder:
    """A fake UNet that returns a fixed tensor and remembers how it was called."""

    def __init__(self, output=None):
        self.output, self.calls, self.row = output, [], 0

    def __call__(self, x, t, context=None, y=None):
        self.calls.append(SimpleNamespace(x=x, t=t, context=context, y=y))
        if self.output is None:
            return x[:, :4] * 0.5
        out = self.output[self.row : self.row + x.shape[0]]  # the denoiser calls once per row, in order
        self.row = (self.row + x.shape[0]) % self.output.shape[0]
        return out

    def all(self, name: str) -> torch.Tensor:
        """An argument of every call, stacked (the denoiser calls the network once per batch row)."""
        return torch.cat([getattr(call, name) for call in self.calls])


def vp_truth(t: int, shape=(2, 4, 3, 3)):
    g = torch.Generator().manual_seed(t)
    x0, eps = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    a = AC[t]
    return x0, eps, a.sqrt() * x0 + (1 - a).sqrt() * eps, ((1 - a) / a).sqrt()


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
@pytest.mark.parametrize("t", [0, 37, 500, 999])
def test_each_parameterization_recovers_x0_and_feeds_the_vp_sample(parameterization, t):
    x0, eps, x_vp, sigma = vp_truth(t)
    a = AC[t]
    prediction = {"eps": eps, "v": a.sqrt() * eps - (1 - a).sqrt() * x0, "x0": x0}[parameterization]
    net = Recorder(prediction)
    denoise = DiscreteDenoiser(net, AC, parameterization)
    x_ve = x0 + sigma * eps
    out = denoise(x_ve, sigma.repeat(2), None)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(net.all("x"), x_vp, rtol=0, atol=1e-12)
    assert net.all("t").tolist() == [float(t)] * 2


@pytest.mark.parametrize("prediction_type, parameterization", [("epsilon", "eps"), ("v_prediction", "v")])
def test_x0_matches_diffusers_pred_original_sample(prediction_type, parameterization):
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False
    )
    sched.set_timesteps(50)
    t = int(sched.timesteps[10])
    x_vp = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    output = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = sched.step(output, t, x_vp).pred_original_sample
    sigma = ((1 - sched.alphas_cumprod[t]) / sched.alphas_cumprod[t]).sqrt()
    ours = DiscreteDenoiser(Recorder(output), sched.alphas_cumprod, parameterization)(x_vp * (sigma**2 + 1).sqrt(), sigma.reshape(1))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_between_grid_sigmas_the_timestep_interpolates_in_log_sigma():
    net = Recorder()
    denoise = DiscreteDenoiser(net, AC)
    log_sigmas = np.log(np.sqrt((1 - AC.numpy()) / AC.numpy()))
    sigma = torch.tensor([0.05, 1.0, 7.5], dtype=torch.float64)
    denoise(torch.zeros(3, 4, 2, 2), sigma)
    expected = np.interp(np.log(sigma.numpy()), log_sigmas, np.arange(1000))
    np.testing.assert_allclose(net.all("t").double().numpy(), expected, rtol=1e-6)
    net.calls.clear()
    DiscreteDenoiser(net, AC, quantize=True)(torch.zeros(3, 4, 2, 2), sigma)
    assert net.all("t").tolist() == np.round(expected).tolist()


def test_float32_grid_sigmas_snap_to_the_integer_timestep():
    net = Recorder()
    sigma = ((1 - AC[[981, 1]]) / AC[[981, 1]]).sqrt().float()
    DiscreteDenoiser(net, AC)(torch.zeros(2, 4, 2, 2), sigma)
    assert net.all("t").tolist() == [981.0, 1.0]


@pytest.mark.parametrize(
    "key, fields",
    [
        (None, {}),
        ("concat", {"concat"}),
        ("crossattn", {"crossattn"}),
        ("hybrid", {"concat", "crossattn"}),
        ("adm", {"y"}),
        ("hybrid-adm", {"concat", "crossattn", "y"}),
    ],
)
def test_conditioning_reaches_the_network_by_conditioning_key(key, fields):
    values = {"concat": torch.ones(2, 5, 3, 3), "crossattn": torch.ones(2, 7, 16), "y": torch.tensor([3, 4])}
    cond = Cond(**{f: values[f] for f in fields})
    net = Recorder()
    x = torch.randn(2, 4, 3, 3)
    DiscreteDenoiser(net, AC, "eps", key)(x, torch.tensor([1.0, 2.0]), cond)
    assert len(net.calls) == 2  # one network call per row (README "Reproducibility")
    for row, call in enumerate(net.calls):
        assert call.x.shape[:2] == (1, 9 if "concat" in fields else 4)
        if "concat" in fields:
            assert torch.equal(call.x[:, 4:], values["concat"][row : row + 1])  # appended after the latent, not scaled
        for name, got in (("crossattn", call.context), ("y", call.y)):
            assert (got is None) == (name not in fields)
            if got is not None:
                assert torch.equal(got, values[name][row : row + 1])


def test_conditioning_that_does_not_fit_the_key_is_refused():
    denoise = DiscreteDenoiser(Recorder(), AC, "eps", "crossattn")
    with pytest.raises(ValueError, match="crossattn"):
        denoise(torch.zeros(1, 4, 2, 2), torch.ones(1), Cond(y=torch.tensor([1])))
    with pytest.raises(ValueError, match="not supported"):
        DiscreteDenoiser(Recorder(), AC, "eps", "film")


def test_from_bundle_and_bind():
    net = Recorder()
    bundle = SimpleNamespace(denoiser=net, alphas_cumprod=AC.float(), parameterization="v", conditioning_key="crossattn")
    denoise = DiscreteDenoiser.from_bundle(bundle)
    assert denoise.parameterization.value == "v" and denoise.sigma_max > 14 and denoise.sigma_min < 0.03
    context = torch.zeros(1, 3, 8)
    model = bind(denoise, Cond(crossattn=context))
    out = model(torch.ones(1, 4, 2, 2), torch.tensor([2.0]))
    assert out.dtype == torch.float32 and net.calls[0].context is context


def test_half_precision_input_keeps_its_dtype():
    out = DiscreteDenoiser(Recorder(), AC)(torch.ones(1, 4, 2, 2, dtype=torch.bfloat16), torch.tensor([3.0]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
