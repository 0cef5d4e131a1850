"""Tiled denoising equals untiled denoising for a network with a finite receptive field."""
import pytest
import torch
from torch import nn

from ldmtool.diffusion.cond import Cond, Guided
from ldmtool.tiling.fusion import TileConfig, TiledDenoiser
from ldmtool.tiling.planner import Weighting
from toy_denoisers import BlurDenoiser

RADIUS = 3  # three 3x3 convolutions


class ConvDenoiser(nn.Module):
    """x0 prediction from a small random conv net; uses concat, crossattn and y so tiling must route all three."""

    def __init__(self, channels=3, concat_channels=2, padding_mode="zeros"):
        super().__init__()
        torch.manual_seed(0)
        conv = lambda i, o: nn.Conv2d(i, o, 3, padding=1, padding_mode=padding_mode)  # noqa: E731
        self.net = nn.Sequential(conv(channels + concat_channels, 16), nn.SiLU(), conv(16, 16), nn.SiLU(), conv(16, channels))
        self.calls = []

    def forward(self, x, sigma, cond):
        if isinstance(cond, Guided):
            uncond = self.forward(x, sigma, cond.uncond)
            return uncond + cond.scale * (self.forward(x, sigma, cond.cond) - uncond)
        self.calls.append(tuple(x.shape))
        scale = (1 + sigma**2).rsqrt()[:, None, None, None]
        h = self.net(torch.cat([x * scale, cond.concat], 1))
        bias = cond.crossattn.mean(dim=(1, 2))[:, None, None, None] + 0.1 * cond.y[:, None, None, None]
        return x * 0.5 + h + bias


def euler(model, x, sigmas):
    """Plain Euler steps written out here, independent of the project's samplers."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        s = sigma * x.new_ones(x.shape[0])
        x = x + (x - model(x, s)) / sigma * (sigma_next - sigma)
    return x


def _inputs(batch=2, height=40, width=52):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, height, width, generator=g) * 5
    cond = Cond(crossattn=torch.randn(batch, 4, 8, generator=g), concat=torch.randn(batch, 2, height, width, generator=g),
                y=torch.arange(batch, dtype=torch.float32))
    return x, cond


SIGMAS = torch.tensor([5.0, 2.5, 1.0, 0.3, 0.0])


@pytest.mark.parametrize("weighting", list(Weighting))
@pytest.mark.parametrize("shift", [False, True])
def test_tiled_sampling_equals_untiled_when_margin_covers_receptive_field(weighting, shift):
    net = ConvDenoiser()
    x, cond = _inputs()
    config = TileConfig(tile=(16, 24), overlap=10, margin=RADIUS, tile_batch=3, weighting=weighting, shift=shift)
    tiled = TiledDenoiser(net, config)
    with torch.no_grad():
        expected = euler(lambda v, s: net(v, s, cond), x, SIGMAS)
        got = euler(lambda v, s: tiled(v, s, cond), x, SIGMAS)
    assert max(call[0] for call in net.calls) == 3 * 2  # three tiles of two items per network call
    assert tiled.pixels_run > 40 * 52 * 2 * 4
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_seamless_tiles_wrap_around_and_match_a_circular_network():
    net = ConvDenoiser(padding_mode="circular")
    x, cond = _inputs(batch=1, height=37, width=45)
    config = TileConfig(tile=(16, 16), overlap=8, margin=RADIUS, tile_batch=4, wrap_x=True, wrap_y=True, shift=True)
    tiled = TiledDenoiser(net, config)
    with torch.no_grad():
        expected = euler(lambda v, s: net(v, s, cond), x, SIGMAS)
        got = euler(lambda v, s: tiled(v, s, cond), x, SIGMAS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_guided_conditioning_is_tiled_for_both_halves():
    net = ConvDenoiser()
    x, cond = _inputs()
    _, uncond = _inputs()
    uncond = Cond(crossattn=uncond.crossattn * 0, concat=cond.concat, y=cond.y * 0)
    guided = Guided(cond, uncond, 4.0)
    tiled = TiledDenoiser(net, TileConfig(tile=(24, 24), overlap=12, margin=RADIUS, tile_batch=2))
    sigma = torch.full((2,), 2.0)
    with torch.no_grad():
        torch.testing.assert_close(tiled(x, sigma, guided), net(x, sigma, guided), atol=1e-5, rtol=0)


def test_gaussian_weights_blend_inexact_tiles_smoothly():
    """With a margin smaller than the receptive field, tiles disagree; fusion must still be finite and close."""
    net = ConvDenoiser()
    x, cond = _inputs()
    tiled = TiledDenoiser(net, TileConfig(tile=(16, 16), overlap=4, margin=1))
    sigma = torch.full((2,), 1.0)
    with torch.no_grad():
        got, expected = tiled(x, sigma, cond), net(x, sigma, cond)
    assert torch.isfinite(got).all()
    assert (got - expected).abs().mean() < 0.1 * expected.abs().mean()


def test_canvas_within_one_tile_bypasses_tiling():
    net = ConvDenoiser()
    x, cond = _inputs(height=16, width=16)
    tiled = TiledDenoiser(net, TileConfig(tile=(16, 16), overlap=4))
    sigma = torch.full((2,), 1.0)
    with torch.no_grad():
        got = tiled(x, sigma, cond)
        assert net.calls == [(2, 3, 16, 16)]
        assert torch.equal(got, net(x, sigma, cond))


class Fragile(nn.Module):
    """Fails like a full GPU when a call sees more than `limit` latent pixels in total."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit = inner, limit

    def forward(self, x, sigma, cond):
        if x.shape[0] * x.shape[-2] * x.shape[-1] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x, sigma, cond)


def test_out_of_memory_retries_with_smaller_tiles_and_keeps_them():
    net = ConvDenoiser()
    x, cond = _inputs(height=64, width=64)
    fragile = Fragile(net, limit=2 * 24 * 24)
    tiled = TiledDenoiser(fragile, TileConfig(tile=(32, 32), overlap=12, margin=RADIUS, tile_batch=4))
    sigma = torch.full((2,), 1.0)
    with torch.no_grad():
        got = tiled(x, sigma, cond)
        expected = net(x, sigma, cond)
    assert tiled.config.tile_batch == 1 and max(tiled.config.tile) <= 24
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_other_errors_are_not_swallowed():
    def broken(x, sigma, cond):
        raise RuntimeError("shape mismatch in conv")

    tiled = TiledDenoiser(broken, TileConfig(tile=(16, 16), overlap=4))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        tiled(torch.zeros(1, 3, 40, 40), torch.ones(1), None)


def test_weights_are_computed_once_per_plan():
    net = ConvDenoiser()
    x, cond = _inputs()
    tiled = TiledDenoiser(net, TileConfig(tile=(16, 16), overlap=8, margin=RADIUS, shift=True))
    with torch.no_grad():
        for _ in range(3):
            euler(lambda v, s: tiled(v, s, cond), x, SIGMAS)
    assert 1 <= len(tiled._weights) <= 16


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "heun"])
def test_shared_samplers_with_fresh_noise_are_unchanged_by_tiling(sampler):
    """The project's samplers (noise drawn per item on the whole canvas, outside the denoiser) give the same
    result through the tiled denoiser."""
    from ldmtool.diffusion.samplers import sample
    from ldmtool.runtime.seeds import NoiseSource

    net = ConvDenoiser()
    x, cond = _inputs()
    tiled = TiledDenoiser(net, TileConfig(tile=(16, 24), overlap=10, margin=RADIUS, tile_batch=2, shift=True))
    with torch.no_grad():
        expected = sample(sampler, lambda v, s: net(v, s, cond), x, SIGMAS, noise=NoiseSource([1, 2]).like)
        got = sample(sampler, lambda v, s: tiled(v, s, cond), x, SIGMAS, noise=NoiseSource([1, 2]).like)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _seam_strength(overlap, weighting):
    """Worst column's mean |horizontal step| in the tiled result over the untiled one (1 = no seam)."""
    model = BlurDenoiser()
    x = torch.randn(8, 4, 96, 96, generator=torch.Generator().manual_seed(7)) * 14
    sigmas = torch.tensor([14.0, 6.0, 2.5, 1.0, 0.4, 0.0])
    tiled = TiledDenoiser(model, TileConfig(tile=(32, 32), overlap=overlap, weighting=weighting))
    with torch.no_grad():
        expected = euler(lambda v, s: model(v, s), x, sigmas)
        got = euler(lambda v, s: tiled(v, s, None), x, sigmas)
    steps = lambda t: t.diff(dim=-1).abs().mean(dim=(0, 1, 2))  # noqa: E731
    return float((steps(got) / steps(expected)).max())


def test_gaussian_weights_hide_seams_better_than_uniform_and_overlap_removes_them():
    """The quality side of the default overlap (4 latent pixels, chosen for <= 1.3x work): seams are mild
    with Gaussian weights, visible with uniform ones, and gone with a wider overlap."""
    gaussian, uniform = _seam_strength(4, Weighting.GAUSSIAN), _seam_strength(4, Weighting.UNIFORM)
    assert gaussian < 1.25 and uniform > gaussian + 0.2
    assert _seam_strength(8, Weighting.GAUSSIAN) < 1.05


def test_tile_context_is_built_per_tile_and_shared_context_is_used_untiled():
    """`Cond.tile_crossattn` gives each tile its own context (layout models name the crop they generate)."""
    seen = []

    def inner(x, sigma, cond):
        seen.append(cond.crossattn[:, 0, :4].tolist())
        return x * 0 + cond.crossattn[:, :1, :1, None]  # each tile predicts its own context's first value

    def tile_context(rect, canvas):
        top, left, height, width = rect
        return torch.tensor([top, left, height, width], dtype=torch.float32).repeat(2, 1, 1)  # (B=2, T=1, D=4)

    cond = Cond(crossattn=torch.full((2, 1, 4), -1.0), tile_crossattn=tile_context)
    tiled = TiledDenoiser(inner, TileConfig(tile=(16, 16), overlap=4, tile_batch=3))
    x = torch.zeros(2, 1, 28, 40)
    out = tiled(x, torch.ones(2), cond)
    plan = tiled.plan(28, 40)
    expected = sorted([[r.top, r.left, r.height, r.width]] * 2 for r in plan.tiles)
    got = sorted(pair for call in seen for pair in zip(call[0::2], call[1::2]))  # tile-major: B items per tile
    assert sorted([list(p) for p in got]) == sorted([list(p) for p in expected])
    assert out.min() >= 0  # tops are >= 0: no tile saw the shared context (-1)
    seen.clear()
    TiledDenoiser(inner, TileConfig(tile=(64, 64), overlap=4))(x, torch.ones(2), cond)  # fits one tile
    assert seen == [[[-1.0] * 4] * 2]


@pytest.mark.parametrize("tile_batch, wrap_x, shift", [(1, False, False), (3, False, True), (2, True, False)])
def test_streamed_rows_are_the_fused_canvas_bit_for_bit_each_row_once_in_order(tile_batch, wrap_x, shift):
    """`stream` hands out the fused result band by band as no remaining tile adds to it (a one-step sampler
    decodes those rows at once): the same values bit for bit, never the whole canvas at once."""
    x, cond = _inputs(batch=1, height=45, width=52)
    config = TileConfig(tile=(16, 16), overlap=6, tile_batch=tile_batch, wrap_x=wrap_x, shift=shift)
    sigma = torch.full((1,), 2.0)
    whole = TiledDenoiser(ConvDenoiser(), config)(x, sigma, cond)
    bands: list[tuple[int, torch.Tensor]] = []
    TiledDenoiser(ConvDenoiser(), config).stream(x, sigma, cond, lambda rows, top: bands.append((top, rows.clone())))
    tops = [top for top, _ in bands]
    assert tops[0] == 0 and all(b[0] == a[0] + a[1].shape[-2] for a, b in zip(bands, bands[1:]))
    assert len(bands) > 2 and max(rows.shape[-2] for _, rows in bands) < 45  # streamed, not held whole
    assert torch.equal(torch.cat([rows for _, rows in bands], dim=-2), whole)


def test_a_vertically_wrapping_canvas_is_not_streamed():
    x, cond = _inputs(batch=1)
    tiled = TiledDenoiser(ConvDenoiser(), TileConfig(tile=(16, 16), overlap=6, wrap_y=True))
    with pytest.raises(ValueError, match="wrapping"):
        tiled.stream(x, torch.full((1,), 2.0), cond, lambda rows, top: None)
