"""Seamless mode: circular padding per axis, wrap-around tiling, and an output that tiles without an edge."""
import pytest
import torch
from torch import nn

from ldmtool.diffusion.denoisers import bind
from ldmtool.diffusion.samplers import sample
from ldmtool.errors import UsageError
from ldmtool.nets.autoencoder import AutoencoderKL
from ldmtool.nets.unet import UNetModel
from ldmtool.tiling.fusion import TileConfig, TiledDenoiser
from ldmtool.tiling.seamless import Seamless, parse_seamless, seamless
from ldmtool.tiling.vae import VAETiling, tiled_decode
from toy_denoisers import BlurDenoiser

torch.set_num_threads(1)

UNET = dict(image_size=16, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, channel_mult=[1, 2],
            attention_resolutions=[2], num_heads=2)
VAE = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
           num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                offset = 1.0 if isinstance(module, nn.GroupNorm) and name == "weight" else 0.0
                p.copy_(offset + 0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _sample_latent(axes: Seamless, height=96, width=96, items=16):
    """Latents of several seeds (one wrap edge per item is a small sample; the ratio is taken over all)."""
    model = BlurDenoiser()
    denoiser = TiledDenoiser(model, TileConfig(tile=(24, 24), overlap=16, margin=6, wrap_x=axes.x, wrap_y=axes.y,
                                               shift=True))
    sigmas = torch.tensor([14.0, 6.0, 2.5, 1.0, 0.4, 0.0])
    noise = torch.randn(items, 4, height, width, generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), seamless(model, axes=axes):
        return sample("euler", bind(denoiser, None), noise * sigmas[0], sigmas)


def _edge_ratio(image: torch.Tensor, dim: int) -> float:
    """Mean |difference| across the wrap edge over the mean |difference| across interior lines."""
    last = image.shape[dim] - 1
    across_edge = (image.select(dim, 0) - image.select(dim, last)).abs().mean()
    interior = image.diff(dim=dim).abs().mean()
    return float(across_edge / interior)


def test_seamless_xy_output_has_no_visible_wrap_edge():
    latent = _sample_latent(Seamless(x=True, y=True))
    assert _edge_ratio(latent, dim=3) <= 1.1  # left-right
    assert _edge_ratio(latent, dim=2) <= 1.1  # top-bottom


def test_without_seamless_the_edges_are_visible():
    """The measure above can fail: a plain output has a clear step where it would wrap."""
    latent = _sample_latent(Seamless())
    assert min(_edge_ratio(latent, dim=3), _edge_ratio(latent, dim=2)) > 2


def test_seamless_tiny_unet_and_tiled_decode_have_no_edge():
    """Rolling the input of a seamless UNet rolls its output; the tiled seamless decode equals the untiled one,
    so neither network nor tiling adds an edge where the image wraps."""
    unet = randomize(UNetModel(**UNET))
    vae = randomize(AutoencoderKL(ddconfig=VAE, lossconfig={"target": "x"}, embed_dim=4), seed=1)
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(1, 4, 16, 24, generator=g), torch.randn(1, 4, 12, 20, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad(), seamless(unet, vae, axes=Seamless(x=True, y=True)):
        rolled = unet(torch.roll(x, (4, 6), dims=(2, 3)), t)
        torch.testing.assert_close(rolled, torch.roll(unet(x, t), (4, 6), dims=(2, 3)), atol=1e-4, rtol=0)
        tiled = tiled_decode(vae, z, VAETiling(tile=4))
        torch.testing.assert_close(tiled, vae.decode(z), atol=1e-4, rtol=0)
        torch.testing.assert_close(tiled_decode(vae, torch.roll(z, 3, dims=3), VAETiling(tile=4)),
                                   torch.roll(tiled, 6, dims=3), atol=1e-4, rtol=0)
    plain = vae.decode(z)
    assert (plain - tiled).abs().max() > 1e-2  # seamless really changed the decoder's borders


def test_seamless_x_only_wraps_x():
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    nn.init.ones_(conv.weight)
    x = torch.zeros(1, 1, 4, 5)
    x[..., 0, 0] = 1.0
    with torch.no_grad(), seamless(conv, axes=Seamless(x=True)):
        out = conv(x)
    assert out[0, 0, 0, -1] == 1 and out[0, 0, -1, 0] == 0  # wraps left-right, not top-bottom
    assert type(conv) is nn.Conv2d and conv(x)[0, 0, 0, -1] == 0  # restored on exit
    assert set(conv.state_dict()) == {"weight"}


def test_encoder_downsample_pad_wraps_too():
    vae = randomize(AutoencoderKL(ddconfig=VAE, lossconfig={"target": "x"}, embed_dim=4))
    x = torch.randn(1, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), seamless(vae, axes=Seamless(x=True, y=True)):
        rolled = vae.encode(torch.roll(x, shifts=(4, 8), dims=(2, 3)))  # a multiple of the downsampling
        expected = torch.roll(vae.encode(x), shifts=(2, 4), dims=(2, 3))
    torch.testing.assert_close(rolled, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("text,axes", [(None, Seamless()), ("x", Seamless(x=True)), ("YX", Seamless(True, True))])
def test_parse_seamless(text, axes):
    assert parse_seamless(text) == axes


def test_parse_seamless_rejects_other_axes():
    with pytest.raises(UsageError, match="--seamless"):
        parse_seamless("z")
