"""UNet and attention: outputs equal diffusers' (converted with its own single-file converter), closed-form
checks for the parts diffusers lacks, reference key names, seamless padding and the CPU conv fast path."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from ldmtool.nets._layers import set_seamless
from ldmtool.nets.attention import AttentionBlock, CrossAttention
from ldmtool.nets.unet import UNetModel, timestep_embedding

torch.set_num_threads(1)

TINY = dict(image_size=16, model_channels=32, num_res_blocks=1, channel_mult=[1, 2, 2],
            attention_resolutions=[2, 1], use_spatial_transformer=True, legacy=False, transformer_depth=1)

SD1 = dict(TINY, in_channels=4, out_channels=4, num_heads=8, context_dim=24, transformer_depth=2)
SD2 = dict(TINY, in_channels=4, out_channels=4, num_head_channels=16, context_dim=24, use_linear_in_transformer=True)
SD_INPAINT = dict(SD1, in_channels=9, transformer_depth=1)
X4_UPSCALER = dict(TINY, in_channels=7, out_channels=4, num_classes=1000, num_heads=8, context_dim=24,
                   attention_resolutions=[2, 4], disable_self_attentions=[True, True, False],
                   disable_middle_self_attn=False, use_linear_in_transformer=True)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (the reference zero-initialises output layers, which would hide errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                offset = 1.0 if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and name == "weight" else 0.0
                p.copy_(offset + 0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def diffusers_unet(ours: UNetModel, params: dict):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    original = {"model": {"params": {
        "unet_config": {"params": params},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
    }}}
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=params["image_size"] * 8)
    theirs = UNet2DConditionModel(**config)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return theirs.eval()


@pytest.mark.parametrize("params", [SD1, SD2, SD_INPAINT, X4_UPSCALER], ids=["sd1", "sd2", "sd-inpaint", "x4-upscaler"])
def test_unet_matches_diffusers(params):
    torch.manual_seed(0)
    ours = randomize(UNetModel(**params))
    theirs = diffusers_unet(ours, params)
    x = torch.randn(2, params["in_channels"], 16, 12)
    t = torch.tensor([999, 17])
    context = torch.randn(2, 5, params["context_dim"])
    y = torch.tensor([20, 350]) if "num_classes" in params else None
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context, class_labels=y).sample
        got = ours(x, t, context=context, y=y)
        with torch.enable_grad():  # the training path (plain conv2d, no in-place ops) must agree too
            got_train = ours(x, t, context=context, y=y)
    assert expected.std() > 0.1
    assert (got - expected).abs().max() < 1e-4
    assert (got_train - expected).abs().max() < 1e-4


def test_timestep_embedding_is_the_reference_formula():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 250, 999])
    emb = timestep_embedding(t, 7)
    half = 3
    freqs = torch.tensor([math.exp(-math.log(10000) * i / half) for i in range(half)])
    args = t[:, None].double() * freqs[None].double()
    expected = torch.cat([args.cos(), args.sin(), torch.zeros(4, 1, dtype=torch.float64)], dim=1)
    assert torch.allclose(emb.double(), expected, atol=1e-5)
    oracle = get_timestep_embedding(t, 8, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(timestep_embedding(t, 8), oracle, atol=1e-6)


def reference_attention_block(block: AttentionBlock, x: torch.Tensor, new_order: bool) -> torch.Tensor:
    """The reference QKVAttention(Legacy) math written out with einsum."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, -1)
    qkv = block.qkv(block.norm(flat))
    heads, t = block.num_heads, flat.shape[-1]
    ch = c // heads
    if new_order:
        q, k, v = (part.reshape(b * heads, ch, t) for part in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, t).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    out = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, t)
    return (flat + block.proj_out(out)).reshape(b, c, h, w)


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("heads, head_channels", [(4, -1), (1, 16)])
def test_plain_attention_block_matches_reference_math(new_order, heads, head_channels):
    block = randomize(AttentionBlock(64, heads, head_channels, use_new_attention_order=new_order))
    x = torch.randn(2, 64, 5, 6)
    with torch.no_grad():
        assert torch.allclose(block(x), reference_attention_block(block, x, new_order), atol=1e-5)
    assert block.num_heads == (heads if head_channels == -1 else 64 // head_channels)


LDM_INPAINT_7CH = dict(image_size=16, in_channels=7, out_channels=3, model_channels=32, attention_resolutions=[2, 4],
                       num_res_blocks=1, channel_mult=[1, 2, 2], num_head_channels=32, resblock_updown=True,
                       use_scale_shift_norm=True)
LDM_CIN = dict(image_size=16, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2],
               num_res_blocks=2, channel_mult=[1, 2], num_heads=2, num_classes=1000, use_new_attention_order=True,
               legacy=True)


def test_ldm_only_unets_run_and_have_reference_keys():
    inpaint = randomize(UNetModel(**LDM_INPAINT_7CH))
    keys = inpaint.state_dict()
    assert keys["input_blocks.2.0.in_layers.0.weight"].shape == (32,)  # ResBlock with down=True
    assert "input_blocks.2.0.h_upd.op.weight" not in keys  # resblock downsampling pools, no weights
    assert keys["input_blocks.3.1.qkv.weight"].shape == (192, 64, 1)
    assert keys["input_blocks.3.1.proj_out.weight"].shape == (64, 64, 1)
    assert keys["input_blocks.1.0.emb_layers.1.weight"].shape == (64, 128)  # scale-shift: 2 * out channels
    assert keys["output_blocks.5.0.skip_connection.weight"].shape == (32, 64, 1, 1)
    assert inpaint.input_blocks[3][1].num_heads == 2
    with torch.no_grad():
        out = inpaint(torch.randn(1, 7, 16, 16), torch.tensor([10]))
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()

    cin = randomize(UNetModel(**LDM_CIN))
    keys = cin.state_dict()
    assert keys["label_emb.weight"].shape == (1000, 128)
    assert keys["input_blocks.4.1.norm.weight"].shape == (64,)
    assert keys["input_blocks.3.0.op.weight"].shape == (32, 32, 3, 3)  # conv Downsample
    assert keys["output_blocks.2.2.conv.weight"].shape == (64, 64, 3, 3)  # conv Upsample
    with torch.no_grad():
        a = cin(torch.randn(2, 3, 16, 16), torch.tensor([3, 3]), y=torch.tensor([1, 2]))
    assert a.shape == (2, 3, 16, 16)
    assert not torch.allclose(a[0], a[1])  # labels change the output


def test_sd2_head_layout_and_disabled_self_attention():
    unet = UNetModel(**X4_UPSCALER)
    transformer = unet.input_blocks[3][1]  # level 1 (ds 2): self-attention disabled -> attn1 attends to the context
    assert transformer.transformer_blocks[0].attn1.to_k.weight.shape == (64, 24)
    middle = unet.middle_block[1].transformer_blocks[0]
    assert middle.attn1.to_k.weight.shape == (64, 64)
    assert unet.input_blocks[1][0].in_layers[0].weight.shape == (32,) and len(unet.input_blocks[1]) == 1
    sd2 = UNetModel(**SD2)
    assert sd2.middle_block[1].transformer_blocks[0].attn1.heads == 4  # 64 channels / 16 per head


def test_seamless_x_makes_the_unet_equivariant_to_horizontal_rolls():
    unet = randomize(UNetModel(**SD1))
    set_seamless(unet, x=True, y=False)
    x, t, context = torch.randn(1, 4, 8, 16), torch.tensor([5]), torch.randn(1, 3, 24)
    with torch.no_grad():
        rolled_first = unet(x.roll(4, dims=-1), t, context)
        rolled_after = unet(x, t, context).roll(4, dims=-1)
        assert torch.allclose(rolled_first, rolled_after, atol=1e-4)
        assert not torch.allclose(unet(x.roll(4, dims=-2), t, context), unet(x, t, context).roll(4, dims=-2), atol=1e-3)
        set_seamless(unet, x=False, y=False)
        assert not torch.allclose(unet(x.roll(4, dims=-1), t, context), rolled_after, atol=1e-3)


def unfused_attention(attn: CrossAttention, x: torch.Tensor, context) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(d)) v per head."""
    source = x if context is None else context
    heads = attn.heads
    split = lambda a: a.view(a.shape[0], a.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.to_q(x)), split(attn.to_k(source)), split(attn.to_v(source))
    out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
    return attn.to_out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


@pytest.mark.parametrize("context_dim", [None, 16], ids=["self", "cross"])
def test_cross_attention_is_softmax_attention_with_separate_heads(context_dim):
    attn = randomize(CrossAttention(32, context_dim=context_dim, heads=4, dim_head=8))
    x = torch.randn(2, 10, 32)
    context = None if context_dim is None else torch.randn(2, 3, context_dim)
    with torch.no_grad():
        assert torch.allclose(attn(x, context), unfused_attention(attn, x, context), atol=1e-5)


def test_conv_equals_conv2d_on_views_and_copies_and_trains():
    from ldmtool.nets._layers import Conv2d

    conv = Conv2d(32, 64, 3, padding=1)
    big = torch.randn(2, 32, 20, 20)
    views = [big[:, :, 3:15, 2:11], big[:, :, ::2, ::2], big.contiguous(memory_format=torch.channels_last)[:, :, 1:9, 4:19]]
    with torch.no_grad():
        for x in views:  # tiles are cut as views; any strides must work
            assert torch.allclose(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5)
        conv.weight.mul_(-1.0)
        assert torch.allclose(conv(big), torch.nn.functional.conv2d(big, conv.weight, conv.bias, padding=1), atol=1e-5)
    with torch.inference_mode():
        fresh = Conv2d(32, 8, 1)
        assert torch.allclose(fresh(big), torch.nn.functional.conv2d(big, fresh.weight, fresh.bias), atol=1e-5)
    twin = copy.deepcopy(conv)  # EMA copies and torch.save
    torch.save(conv, io.BytesIO())
    with torch.no_grad():
        assert torch.allclose(twin(big), conv(big), atol=1e-5)
    out = conv(big)
    out.sum().backward()
    assert conv.weight.grad is not None


def test_adm_label_embeddings_and_attention_block_counts():
    base = dict(SD2, num_res_blocks=2, num_attention_blocks=[1, 0, 2])
    seq = UNetModel(**base, num_classes="sequential", adm_in_channels=6)
    keys = seq.state_dict()
    assert keys["label_emb.0.0.weight"].shape == (128, 6) and keys["label_emb.0.2.weight"].shape == (128, 128)
    assert len(seq.input_blocks[1]) == 2 and len(seq.input_blocks[2]) == 1  # level 0: only the first has attention
    assert len(seq.input_blocks[4]) == 1  # level 1: none
    assert len(seq.output_blocks[0]) == 1  # level 2 is not an attention resolution (ds 4)
    randomize(seq)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 3, 24)
    with torch.no_grad():
        out = seq(x, t, context, y=torch.randn(2, 6))
    assert out.shape == x.shape
    cont = UNetModel(**dict(SD2, num_classes="continuous"))
    assert cont.state_dict()["label_emb.weight"].shape == (128, 1)
    with pytest.raises(ValueError, match="pass y"):
        cont(x, t, context)


def test_unet_cast_whole_to_bfloat16_runs_with_float32_norms():
    unet = randomize(UNetModel(**SD1))
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.randn(2, 5, 24)
    with torch.no_grad():
        expected = unet(x, t, context)
        got = unet.to(torch.bfloat16)(x, t, context)
    assert got.dtype == torch.float32  # returned in the input's dtype
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_linear_equals_linear_on_views_and_copies_and_trains():
    from ldmtool.nets._layers import Linear

    layer = Linear(32, 48)
    inputs = [torch.randn(2, 7, 32), torch.randn(5, 32), torch.randn(2, 6, 64)[..., ::2], torch.randn(2, 32, 9).transpose(1, 2)]
    with torch.no_grad():
        for x in inputs:
            assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)
        layer.weight.add_(1.0)
        assert torch.allclose(layer(inputs[0]), torch.nn.functional.linear(inputs[0], layer.weight, layer.bias), atol=1e-5)
        twin = copy.deepcopy(layer)
        assert torch.allclose(twin(inputs[1]), layer(inputs[1]), atol=1e-6)
    layer(inputs[0]).sum().backward()
    assert layer.weight.grad is not None


def test_one_by_one_convs_equal_conv2d_and_activations_in_pieces_equal_whole():
    from ldmtool.nets._layers import Conv2d, pointwise

    conv = Conv2d(32, 16, 1)
    x = torch.randn(2, 32, 9, 7)
    with torch.no_grad():
        assert torch.allclose(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias), atol=1e-5)
        big = torch.randn(3, 40000)
        assert torch.allclose(pointwise(torch.nn.functional.gelu, big), torch.nn.functional.gelu(big), atol=1e-6)
