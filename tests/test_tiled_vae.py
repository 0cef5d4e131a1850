"""Tiled first-stage decode/encode equal the untiled ones (GroupNorm statistics gathered globally)."""
import pytest
import torch
from torch import nn

from ldmtool.errors import ItemError
from ldmtool.nets.autoencoder import AttnBlock, AutoencoderKL, VQModelInterface
from ldmtool.tiling.vae import FileCanvas, Stage, TensorCanvas, VAETiling, attention_stage, tiled_decode, tiled_encode

torch.set_num_threads(1)

KL = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
          num_res_blocks=1, attn_resolutions=[], dropout=0.0)
KL_ATTN_UP = dict(KL, attn_resolutions=[32])  # attention also one level above the latent (as kl-f32)
VQ = dict(KL, double_z=False, z_channels=3, attn_type="none")
LOSS = {"target": "torch.nn.Identity"}
PIXEL = 1 / 255 * 2  # one 8-bit step, in the decoder's [-1, 1] range


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights large enough that GroupNorm statistics differ a lot from tile to tile."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                offset = 1.0 if isinstance(module, nn.GroupNorm) and name == "weight" else 0.0
                p.copy_(offset + 0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _kl(ddconfig=KL):
    return randomize(AutoencoderKL(ddconfig=ddconfig, lossconfig=LOSS, embed_dim=4))


def _vq():
    vq = randomize(VQModelInterface(embed_dim=3, n_embed=32, ddconfig=VQ, lossconfig=LOSS))
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(torch.randn(32, 3, generator=torch.Generator().manual_seed(3)))
    return vq


def _image(height=64, width=96, seed=1):
    """A smooth image with a strong left-right gradient, so tiles really have different statistics."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, width)[None, None, None, :].expand(1, 3, height, width)
    return (0.6 * ramp + 0.3 * torch.randn(1, 3, height, width, generator=g)).clamp(-1, 1)


STORES = {"recompute": dict(store_bytes=0), "memory": dict(store_bytes=512 * 2**20, spill_bytes=None),
          "spill-file": dict(spill_bytes=0)}


@pytest.mark.parametrize("store", STORES.values(), ids=STORES.keys())
@pytest.mark.parametrize("make", [_kl, _vq, lambda: _kl(KL_ATTN_UP)], ids=["kl", "vq", "kl-attn-up"])
def test_tiled_decode_matches_untiled(make, store):
    model = make()
    with torch.no_grad():
        z = model.encode(_image()) + 0.5 * torch.randn(1, model.post_quant_conv.in_channels, 16, 24,
                                                       generator=torch.Generator().manual_seed(2))
        z = torch.cat([z, z.flip(-1)])  # two items: per-item statistics
        expected = model.decode(z)
        got = tiled_decode(model, z, VAETiling(tile=8, **store))
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= PIXEL
    assert (got - expected).abs().max() <= 1e-4  # in fact exact up to float rounding


@pytest.mark.parametrize("spill_bytes", [None, 0], ids=["memory", "spill-file"])
@pytest.mark.parametrize("make", [_kl, _vq, lambda: _kl(KL_ATTN_UP)], ids=["kl", "vq", "kl-attn-up"])
def test_tiled_encode_matches_untiled(make, spill_bytes):
    model = make()
    x = torch.cat([_image(), _image(seed=4).flip(-1)])
    with torch.no_grad():
        expected = model.encode(x)
        got = tiled_encode(model, x, VAETiling(tile=32, spill_bytes=spill_bytes))
        assert (got - expected).abs().max() <= 1e-4
        assert (model.decode(got) - model.decode(expected)).abs().max() <= PIXEL


def test_untiled_groupnorm_would_not_match():
    """The check above is meaningful: per-tile statistics (the naive way) change the decode visibly."""
    model = _kl()
    with torch.no_grad():
        z = model.encode(_image())
        whole = model.decode(z)
        left = model.decode(z[..., :12])
    assert (whole[..., :32] - left[..., :32]).abs().max() > 10 * PIXEL


def _largest_inputs(model: nn.Module, fn) -> dict:
    """The largest input (pixels) each convolution of `model` sees while `fn` runs."""
    seen = {}

    def record(module, args):
        seen[module] = max(seen.get(module, 0), args[0].shape[-2] * args[0].shape[-1])

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    handles = [c.register_forward_pre_hook(record) for c in convs]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_every_layer_sees_only_a_tile_with_its_halo():
    """Memory is bounded by the tile: no spatial layer of the tiled decode/encode sees the whole canvas
    (the middle-block attention runs in query chunks against off-device keys and values)."""
    model = _kl()
    z, x = torch.randn(1, 4, 48, 48), torch.randn(1, 3, 192, 192)
    for untiled, tiled in ((lambda: model.decode(z), lambda: tiled_decode(model, z, VAETiling(tile=8))),
                           (lambda: model.encode(x), lambda: tiled_encode(model, x, VAETiling(tile=32)))):
        whole, parts = _largest_inputs(model, untiled), _largest_inputs(model, tiled)
        assert set(parts) <= set(whole)
        assert max(parts[conv] / whole[conv] for conv in parts) < 0.5


def test_chunked_attention_equals_the_attention_block():
    block = randomize(AttnBlock(64))
    x = torch.randn(2, 64, 9, 11) * 3
    stage = Stage("attn", block, [block])
    with torch.no_grad():
        expected = block(x)
        got = attention_stage(stage, x, VAETiling(), query_tokens=13, key_tokens=7)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_encode_refuses_sizes_the_downsampling_grid_cannot_tile():
    with pytest.raises(ItemError, match="multiples of 4"):
        tiled_encode(_kl(), torch.zeros(1, 3, 30, 32), VAETiling(tile=16))


def test_out_of_memory_retries_with_smaller_tiles():
    model = _kl()
    z = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(5))

    def fail_on_big_tiles(module, args):
        if args[0].shape[-2] * args[0].shape[-1] > 40 * 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    handle = model.decoder.conv_out.register_forward_pre_hook(fail_on_big_tiles)
    try:
        with torch.no_grad():
            got = tiled_decode(model, z, VAETiling(tile=16))
            with pytest.raises(torch.OutOfMemoryError):
                tiled_decode(model, z, VAETiling(tile=16, min_tile=16))
    finally:
        handle.remove()
    with torch.no_grad():
        assert (got - model.decode(z)).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_file_canvas_round_trips_tiles_and_wraps_like_the_tensor_canvas(tmp_path, dtype):
    data = torch.randn(2, 5, 7, 9, generator=torch.Generator().manual_seed(0)).to(dtype)
    on_file = FileCanvas(data.shape, dtype, str(tmp_path))
    on_file.paste(data[..., :4, :], 0, 0)  # two tiles, as a pass pastes cores
    on_file.paste(data[..., 4:, :], 4, 0)
    in_memory = TensorCanvas(data)
    for box in [(0, 7, 0, 9), (2, 5, 3, 8), (-2, 4, -3, 5), (5, 10, 6, 12), (-8, 9, -10, 10)]:
        assert torch.equal(on_file.crop(*box), in_memory.crop(*box)), box
    assert torch.equal(on_file.result(), data)
    on_file.close()
    assert list(tmp_path.iterdir()) == []  # unlinked from the start: nothing left behind


def test_decode_into_a_custom_canvas_never_builds_the_float_image():
    """Tiles of the last pass go to the caller's canvas (here: uint8 pixels, as the pipelines write)."""

    class Uint8Canvas:
        def __init__(self, shape, dtype):
            self.pixels = torch.zeros(shape[0], shape[2], shape[3], shape[1], dtype=torch.uint8)
            self.pastes = 0

        def paste(self, tile, top, left):
            self.pastes += 1
            values = ((tile.float() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)
            self.pixels[:, top : top + tile.shape[-2], left : left + tile.shape[-1]] = values

        def result(self):
            return self

    model = _kl()
    with torch.no_grad():
        z = model.encode(_image())
        expected = ((model.decode(z) + 1) * 127.5).clamp(0, 255).round().permute(0, 2, 3, 1)
        canvas = tiled_decode(model, z, VAETiling(tile=8, spill_bytes=0), output=Uint8Canvas)
    assert canvas.pastes == 6  # a 16x24 latent in 8x8 tiles
    assert (canvas.pixels.float() - expected).abs().max() <= 1


def test_moments_merge_exactly_even_when_the_mean_dwarfs_the_spread():
    from ldmtool.tiling.vae import Moments

    x = (1000.0 + 0.01 * torch.randn(2, 8, 12, 20, generator=torch.Generator().manual_seed(0))).float()
    parts = [x[..., :5, :7], x[..., :5, 7:], x[..., 5:, :]]
    merged = None
    for part in parts:
        merged = Moments.of(part, groups=4).merge(merged)
    reference = x.double().reshape(2, 4, -1)
    mean, rstd = merged.mean_rstd(eps=0.0)
    assert merged.count == reference.shape[-1]
    assert torch.allclose(mean.double(), reference.mean(-1), rtol=1e-7)
    assert torch.allclose(rstd.double(), reference.var(-1, unbiased=False).rsqrt(), rtol=2e-3)


def test_group_norm_hook_is_removed_after_a_pass_and_refuses_plain_group_norms():
    from ldmtool.nets._layers import GroupNorm32
    from ldmtool.tiling.vae import stream_stages

    model = _kl()
    tiled_decode(model, torch.zeros(1, 4, 16, 16), VAETiling(tile=8))
    assert GroupNorm32.override is None
    assert not any("forward" in m.__dict__ for m in model.modules())  # nothing patched on the instances
    plain = Stage("plain", nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)), [])
    plain.modules = [plain.run]
    with pytest.raises(TypeError, match="not a GroupNorm32"):
        stream_stages([plain], torch.zeros(1, 3, 16, 16), VAETiling(tile=8))
    assert GroupNorm32.override is None
