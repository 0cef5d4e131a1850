"""First-stage autoencoders: the KL VAE equals diffusers' (converted with its own single-file converter); the VQ
model's decode quantizes to the nearest codebook entries; reference key names; seamless padding."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ldmtool.errors import CheckpointError
from ldmtool.nets._layers import set_seamless
from ldmtool.nets.autoencoder import AutoencoderKL, VQModel, VQModelInterface

torch.set_num_threads(1)

DDCONFIG = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)  # as SD's VAE: attention only in the middle
LOSS = {"target": "torch.nn.Identity"}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, nn.Embedding):
                    continue
                offset = 1.0 if isinstance(module, nn.GroupNorm) and name == "weight" else 0.0
                p.copy_(offset + 0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def diffusers_vae(ours: AutoencoderKL, ddconfig: dict):
    from diffusers import AutoencoderKL as DiffusersKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    original = {"model": {"params": {"first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
    checkpoint = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    config = create_vae_diffusers_config_from_ldm(original, checkpoint, image_size=ddconfig["resolution"])
    theirs = DiffusersKL(**config)
    theirs.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    return theirs.eval()


def test_kl_vae_matches_diffusers():
    ours = randomize(AutoencoderKL(ddconfig=DDCONFIG, lossconfig=LOSS, embed_dim=4))
    theirs = diffusers_vae(ours, DDCONFIG)
    x = torch.randn(2, 3, 36, 28)
    with torch.no_grad():
        posterior = theirs.encode(x).latent_dist
        z = ours.encode(x)
        assert (z - posterior.mean).abs().max() < 1e-4
        ours_post = ours.posterior(x)
        assert (ours_post.logvar - posterior.logvar).abs().max() < 1e-4
        image, expected = ours.decode(z), theirs.decode(z).sample
    assert expected.std() > 0.1
    assert (image - expected).abs().max() < 1e-4
    assert image.shape == (2, 3, 36, 28)


def test_kl_posterior_sample_uses_the_generator_and_matches_mean_plus_std_noise():
    vae = randomize(AutoencoderKL(ddconfig=DDCONFIG, lossconfig=LOSS, embed_dim=4))
    with torch.no_grad():
        posterior = vae.posterior(torch.randn(1, 3, 16, 16))
    sample = posterior.sample(torch.Generator().manual_seed(7))
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(sample, posterior.mean + torch.exp(0.5 * posterior.logvar) * noise)
    assert posterior.kl().shape == (1,)


VQ_DDCONFIG = dict(DDCONFIG, double_z=False, z_channels=3, attn_type="none", attn_resolutions=[])


def test_vq_decode_quantizes_to_the_nearest_codebook_entries():
    vq = randomize(VQModelInterface(embed_dim=3, n_embed=16, ddconfig=VQ_DDCONFIG, lossconfig=LOSS))
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(torch.randn(16, 3))
        x = torch.randn(1, 3, 16, 16)
        h = vq.encode(x)
        assert torch.allclose(h, vq.quant_conv(vq.encoder(x)))  # encode stops before quantization
        codebook = vq.quantize.embedding.weight
        flat = h.permute(0, 2, 3, 1).reshape(-1, 3)
        nearest = torch.cdist(flat, codebook).argmin(dim=1)
        quantized = codebook[nearest].view(1, 4, 4, 3).permute(0, 3, 1, 2)
        assert torch.equal(vq.quantize(h)[0], quantized)
        expected = vq.decoder(vq.post_quant_conv(quantized.contiguous()))
        assert torch.equal(vq.decode(h), expected)
        assert torch.equal(vq.decode_code(nearest.view(1, 4, 4)), expected)
        assert not torch.allclose(vq.decode(h, force_not_quantize=True), expected, atol=1e-3)


def test_vq_keys_and_attention_free_variant():
    vq = VQModel(ddconfig=VQ_DDCONFIG, lossconfig=LOSS, n_embed=16, embed_dim=3)
    keys = vq.state_dict()
    assert keys["quantize.embedding.weight"].shape == (16, 3)
    assert keys["quant_conv.weight"].shape == (3, 3, 1, 1)
    assert keys["post_quant_conv.weight"].shape == (3, 3, 1, 1)
    assert not any(".attn" in k for k in keys)  # attn_type none: no attention anywhere
    assert "encoder.down.0.downsample.conv.weight" in keys and "decoder.up.1.upsample.conv.weight" in keys
    assert keys["encoder.down.1.block.0.nin_shortcut.weight"].shape == (64, 32, 1, 1)


def test_kl_keys_follow_the_reference_layout():
    ddconfig = dict(DDCONFIG, attn_resolutions=[16])  # LDM kl-f4/f16/f32 style: attention at some levels too
    keys = AutoencoderKL(ddconfig=ddconfig, lossconfig=LOSS, embed_dim=4).state_dict()
    assert keys["encoder.conv_out.weight"].shape == (8, 64, 3, 3)  # double_z
    assert keys["quant_conv.weight"].shape == (8, 8, 1, 1)
    assert keys["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert keys["encoder.down.2.attn.0.q.weight"].shape == (64, 64, 1, 1)  # the 16 px level
    assert keys["decoder.up.2.attn.1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert keys["decoder.up.0.block.1.conv2.weight"].shape == (32, 32, 3, 3)  # num_res_blocks + 1 per level
    assert not any(k.startswith("loss.") for k in keys)


def test_unknown_first_stage_params_are_a_one_line_config_error():
    with pytest.raises(CheckpointError, match="unknown params bogus"):
        AutoencoderKL(ddconfig=DDCONFIG, lossconfig=LOSS, embed_dim=4, bogus=1)
    AutoencoderKL(ddconfig=DDCONFIG, lossconfig=LOSS, embed_dim=4, monitor="val/rec_loss", ckpt_path=None)
    with pytest.raises(CheckpointError, match="attn_type"):
        AutoencoderKL(ddconfig=dict(DDCONFIG, attn_type="linear"), lossconfig=LOSS, embed_dim=4)


def test_seamless_x_makes_encode_and_decode_equivariant_to_horizontal_rolls():
    vae = randomize(AutoencoderKL(ddconfig=DDCONFIG, lossconfig=LOSS, embed_dim=4))
    set_seamless(vae, x=True, y=False)
    x = torch.randn(1, 3, 16, 32)
    with torch.no_grad():
        assert torch.allclose(vae.encode(x.roll(8, dims=-1)), vae.encode(x).roll(2, dims=-1), atol=1e-4)
        z = torch.randn(1, 4, 4, 8)
        assert torch.allclose(vae.decode(z.roll(2, dims=-1)), vae.decode(z).roll(8, dims=-1), atol=1e-4)
        set_seamless(vae, x=False, y=False)
        assert not torch.allclose(vae.encode(x.roll(8, dims=-1)), vae.encode(x).roll(2, dims=-1), atol=1e-3)


def test_decoder_give_pre_end_and_tanh_out():
    from ldmtool.nets.autoencoder import Decoder

    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        features = randomize(Decoder(**dict(DDCONFIG, give_pre_end=True)))(z)
        assert features.shape == (1, 32, 16, 16)  # before norm_out/conv_out: ch * ch_mult[0] channels
        image = randomize(Decoder(**dict(DDCONFIG, tanh_out=True)))(z * 50)
    assert image.shape == (1, 3, 16, 16) and image.abs().max() <= 1.0
