"""FLUX.1: the presets' released keys, shapes and parameter counts (through diffusers' own single-file
converters onto diffusers' models), tiny random files in each released layout loading with no flag, and the
transformer and autoencoder agreeing with diffusers' `FluxTransformer2DModel` and `AutoencoderKL` on the
same weights."""
from __future__ import annotations

import math

import pytest
import torch

from clirun import run_cli
from ldmtool import build_model, load_model
from ldmtool.checkpoints.files import save_safetensors
from ldmtool.checkpoints.tiny import randomise_
from ldmtool.errors import CheckpointError
from ldmtool.families.info import Parameterization
from ldmtool.nets.autoencoder import AutoEncoder
from ldmtool.nets.flux import Flux

torch.set_num_threads(1)

# diffusers' converter splits single-block `linear1` at the full model's widths (3072 hidden, ratio 4).
FULL_HIDDEN, FULL_MLP = 3072, 4 * 3072
TINY = dict(vec_in_dim=24, context_in_dim=32, hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1)
COMFYUI = "model.diffusion_model."


def _count(state) -> int:
    return sum(math.prod(v.shape) for v in state.values())


def _shapes(state) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def _diffusers_transformer(params: dict, device: str = "cpu"):
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        return FluxTransformer2DModel(
            in_channels=params["in_channels"], out_channels=params["out_channels"], num_layers=params["depth"],
            num_single_layers=params["depth_single_blocks"], attention_head_dim=params["hidden_size"] // params["num_heads"],
            num_attention_heads=params["num_heads"], joint_attention_dim=params["context_in_dim"],
            pooled_projection_dim=params["vec_in_dim"], guidance_embeds=params["guidance_embed"],
            axes_dims_rope=tuple(params["axes_dim"]))


def _diffusers_autoencoder(params: dict, device: str = "cpu"):
    from diffusers import AutoencoderKL

    levels = len(params["ch_mult"])
    with torch.device(device):
        return AutoencoderKL(
            in_channels=params["in_channels"], out_channels=params["out_ch"], latent_channels=params["z_channels"],
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(params["ch"] * m for m in params["ch_mult"]),
            layers_per_block=params["num_res_blocks"], use_quant_conv=False, use_post_quant_conv=False)


def _convert_transformer(state: dict, params: dict) -> dict:
    """diffusers' own single-file conversion of BFL keys. Its fixed full-size split of `linear1` is met by
    placing a reduced model's rows where the full model has them, and cropping the converted pieces back."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    hidden = params["hidden_size"]
    mlp = int(hidden * params["mlp_ratio"])
    checkpoint = dict(state)
    if hidden != FULL_HIDDEN:
        for key in [k for k in checkpoint if ".linear1." in k]:
            rows = checkpoint[key]
            full = rows.new_zeros((3 * FULL_HIDDEN + FULL_MLP, *rows.shape[1:]))
            for i in range(3):
                full[i * FULL_HIDDEN: i * FULL_HIDDEN + hidden] = rows[i * hidden: (i + 1) * hidden]
            full[3 * FULL_HIDDEN: 3 * FULL_HIDDEN + mlp] = rows[3 * hidden:]
            checkpoint[key] = full
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    for key in [k for k in converted if k.startswith("single_transformer_blocks.")]:
        width = mlp if ".proj_mlp." in key else hidden
        if any(f".{name}." in key for name in ("to_q", "to_k", "to_v", "proj_mlp")):
            converted[key] = converted[key][:width]
    return converted


def _convert_autoencoder(state: dict, params: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    levels = len(params["ch_mult"])
    config = {"down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels}
    return convert_ldm_vae_checkpoint(dict(state), config)


# --- full size, on the meta device ---------------------------------------------------------------------

@pytest.mark.parametrize(("preset", "billions"), [("flux1-dev", 11.90), ("flux1-schnell", 11.89),
                                                  ("flux1-fill-dev", None)])
def test_full_size_transformer_presets_convert_onto_diffusers_model_exactly(preset, billions):
    bundle = build_model(preset, device="meta")
    assert bundle.first_stage is None and bundle.info.parameterization is Parameterization.FLOW
    state = bundle.state_dict()
    assert state.keys() == bundle.denoiser.state_dict().keys()  # released names, no prefix
    params = bundle.config["model"]["params"]["denoiser_config"]["params"]
    theirs = _diffusers_transformer(params, device="meta").state_dict()
    assert _shapes(_convert_transformer(state, params)) == _shapes(theirs)
    assert _count(state) == _count(theirs)
    if billions is not None:
        assert round(_count(state) / 1e9, 2) == billions


def test_full_size_autoencoder_preset_converts_onto_diffusers_model_exactly():
    bundle = build_model("flux-ae", device="meta")
    assert bundle.denoiser is None and (bundle.scale_factor, bundle.shift_factor) == (0.3611, 0.1159)
    state = bundle.state_dict()
    params = bundle.config["model"]["params"]["first_stage_config"]["params"]
    theirs = _diffusers_autoencoder(params, device="meta").state_dict()
    assert _shapes(_convert_autoencoder(state, params)) == _shapes(theirs)
    assert round(_count(state) / 1e6) == 84 and bundle.info.latent_channels == 16 and bundle.info.downsampling == 8


# --- tiny files in the released layouts ----------------------------------------------------------------

def _tiny_transformer(seed: int = 0, **overrides) -> tuple[Flux, dict]:
    params = dict(in_channels=64, out_channels=64, mlp_ratio=4.0, guidance_embed=True, axes_dim=[16, 56, 56],
                  **TINY)
    params.update(overrides)
    return randomise_(Flux(**params), seed, scale=0.1).eval(), params


@pytest.mark.parametrize(("case", "prefix", "overrides", "preset"), [
    ("bfl-dev", "", {}, "flux1-dev"),
    ("comfyui-dev", COMFYUI, {}, "flux1-dev"),
    ("schnell", "", dict(guidance_embed=False), "flux1-schnell"),
    ("comfyui-fill", COMFYUI, dict(in_channels=384), "flux1-fill-dev"),
    ("mlp-ratio-3", "", dict(mlp_ratio=3.0, depth=2, qkv_bias=False), "flux1-dev"),
])
def test_tiny_transformer_files_load_with_no_flag(tmp_path, case, prefix, overrides, preset):
    net, params = _tiny_transformer(**overrides)
    path = tmp_path / f"{case}.safetensors"
    save_safetensors({prefix + k: v for k, v in net.state_dict().items()}, path)
    bundle = load_model(path)
    assert bundle.family == preset and bundle.load_info.config_used.startswith(f"detected: {preset}")
    assert bundle.first_stage is None and bundle.info.missing_parts
    loaded = bundle.config["model"]["params"]["denoiser_config"]["params"]
    expected = {**params, "qkv_bias": params.get("qkv_bias", True), "theta": 10000}
    assert {k: loaded[k] for k in expected} == expected
    state = bundle.state_dict()
    assert state.keys() == net.state_dict().keys()  # the prefix is gone
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_a_transformer_file_with_other_head_widths_is_refused_in_one_line(tmp_path):
    from ldmtool.nets.flux import flux_config_from_shapes

    shapes = _shapes(_tiny_transformer()[0].state_dict())
    shapes["double_blocks.0.img_attn.norm.query_norm.scale"] = (64,)
    with pytest.raises(CheckpointError, match="128-wide heads"):
        flux_config_from_shapes(shapes)


def _tokens(batch: int, h: int, w: int, text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image ids (0, row, column) of an h x w patch grid and zero text ids, as the references make them."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None]
    return ids.reshape(-1, 3), torch.zeros(text, 3)


@pytest.mark.parametrize("overrides", [{}, dict(guidance_embed=False, in_channels=384)], ids=["dev", "fill-no-guidance"])
def test_tiny_transformer_agrees_with_diffusers_on_the_same_weights(tmp_path, overrides):
    net, params = _tiny_transformer(seed=3, **overrides)
    save_safetensors(net.state_dict(), tmp_path / "t.safetensors")
    ours = load_model(tmp_path / "t.safetensors").denoiser
    theirs = _diffusers_transformer(params)
    theirs.load_state_dict(_convert_transformer(net.state_dict(), params), strict=True)
    g = torch.Generator().manual_seed(0)
    batch, h, w, text = 2, 3, 5, 7
    img = torch.randn(batch, h * w, params["in_channels"], generator=g)
    txt = torch.randn(batch, text, params["context_in_dim"], generator=g)
    y = torch.randn(batch, params["vec_in_dim"], generator=g)
    t = torch.tensor([0.9, 0.25])
    guidance = torch.tensor([3.5, 1.0]) if params["guidance_embed"] else None
    img_ids, txt_ids = _tokens(batch, h, w, text)
    with torch.no_grad():
        got = ours(img, img_ids.expand(batch, -1, -1), txt, txt_ids.expand(batch, -1, -1), t, y, guidance=guidance)
        want = theirs(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                      img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
    assert got.shape == (batch, h * w, 64)
    assert (got - want).norm() <= 1e-4 * want.norm()


def test_positions_reach_the_transformer_through_the_ids():
    """Moving every image token by the same offset changes the output (rotary ids are absolute for the
    text/image pair), and the same ids give the same output."""
    net, params = _tiny_transformer(seed=1)
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(1, 6, 64, generator=g), torch.randn(1, 4, params["context_in_dim"], generator=g)
    y, t, guidance = torch.randn(1, params["vec_in_dim"], generator=g), torch.tensor([0.5]), torch.tensor([3.5])
    img_ids, txt_ids = _tokens(1, 2, 3, 4)
    with torch.no_grad():
        base = net(img, img_ids[None], txt, txt_ids[None], t, y, guidance)
        again = net(img, img_ids[None].clone(), txt, txt_ids[None], t, y, guidance)
        shifted = net(img, (img_ids + torch.tensor([0.0, 8.0, 8.0]))[None], txt, txt_ids[None], t, y, guidance)
    assert torch.equal(base, again) and not torch.allclose(base, shifted, atol=1e-4)


# --- the autoencoder -----------------------------------------------------------------------------------

TINY_AE = dict(resolution=64, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 2, 2, 2], num_res_blocks=1, z_channels=16)


def test_tiny_autoencoder_file_loads_and_agrees_with_diffusers(tmp_path):
    net = randomise_(AutoEncoder(**TINY_AE), seed=4, scale=0.05).eval()
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in net.state_dict())
    save_safetensors(net.state_dict(), tmp_path / "ae.safetensors")
    bundle = load_model(tmp_path / "ae.safetensors")
    assert bundle.family == "flux-ae" and bundle.denoiser is None
    assert (bundle.scale_factor, bundle.shift_factor) == (0.3611, 0.1159)
    loaded = bundle.config["model"]["params"]["first_stage_config"]["params"]
    assert {k: loaded[k] for k in TINY_AE if k != "resolution"} == {k: v for k, v in TINY_AE.items() if k != "resolution"}
    theirs = _diffusers_autoencoder(TINY_AE).eval()
    theirs.load_state_dict(_convert_autoencoder(net.state_dict(), TINY_AE), strict=True)
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        z = bundle.first_stage.encode(x)
        z_want = theirs.encode(x).latent_dist.mean
        image, image_want = bundle.first_stage.decode(z), theirs.decode(z).sample
    assert z.shape == (1, 16, 4, 6)
    assert (z - z_want).norm() <= 1e-4 * z_want.norm()
    assert (image - image_want).norm() <= 1e-4 * image_want.norm()


# --- commands --------------------------------------------------------------------------------------------

def test_a_command_on_a_transformer_file_names_the_missing_parts_in_one_line(tmp_path):
    net, _ = _tiny_transformer(guidance_embed=False)
    save_safetensors(net.state_dict(), tmp_path / "schnell.safetensors")
    result = run_cli("txt2img", "--model", tmp_path / "schnell.safetensors", "--prompt", "a cat",
                     "-o", tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 3 and len(lines) == 1 and "Traceback" not in result.output
    assert "schnell.safetensors" in lines[0] and "autoencoder (pass --vae FILE" in lines[0]
    assert "CLIP-L text encoder (pass --text-encoder FILE)" in lines[0] and "T5 XXL text encoder" in lines[0]


# --- fp8 storage -----------------------------------------------------------------------------------------

def test_fp8_stored_weights_stay_fp8_and_compute_as_the_upcast_model(tmp_path):
    net, params = _tiny_transformer(seed=6)
    stored = {k: v.to(torch.float8_e4m3fn) for k, v in net.state_dict().items()}
    save_safetensors({COMFYUI + k: v for k, v in stored.items()}, tmp_path / "fp8.safetensors")
    bundle = load_model(tmp_path / "fp8.safetensors")
    ours = bundle.denoiser
    assert bundle.load_info.file_dtype == "float8_e4m3fn"
    assert ours.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert ours.single_blocks[0].linear1.weight.dtype == torch.float8_e4m3fn
    assert ours.double_blocks[0].img_attn.norm.query_norm.scale.dtype == torch.float32  # not a Linear: upcast
    upcast = Flux(**params).eval()
    upcast.load_state_dict({k: v.float() for k, v in stored.items()})
    g = torch.Generator().manual_seed(7)
    img, txt = torch.randn(1, 6, 64, generator=g), torch.randn(1, 4, params["context_in_dim"], generator=g)
    y, t, guidance = torch.randn(1, params["vec_in_dim"], generator=g), torch.tensor([0.6]), torch.tensor([3.5])
    img_ids, txt_ids = _tokens(1, 2, 3, 4)
    with torch.no_grad():
        got = ours(img, img_ids[None], txt, txt_ids[None], t, y, guidance)
        want = upcast(img, img_ids[None], txt, txt_ids[None], t, y, guidance)
    assert torch.equal(got, want)


def test_models_inspect_and_convert_take_a_comfyui_file(tmp_path):
    import json

    net, _ = _tiny_transformer(seed=8)
    save_safetensors({COMFYUI + k: v for k, v in net.state_dict().items()}, tmp_path / "c.safetensors")
    result = run_cli("models", "inspect", tmp_path / "c.safetensors", "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["detected_family"] == "flux1-dev" and report["matches"]
    result = run_cli("models", "convert", tmp_path / "c.safetensors", tmp_path / "bfl.safetensors")
    assert result.exit_code == 0
    bundle = load_model(tmp_path / "bfl.safetensors")
    assert bundle.load_info.config_used == "config stored in the file"
    assert all(torch.equal(bundle.state_dict()[k], v) for k, v in net.state_dict().items())


# --- diffusers' folder layout ----------------------------------------------------------------------------

def test_a_diffusers_folder_loads_both_parts_under_the_released_names(tmp_path):
    import json

    net, params = _tiny_transformer(seed=9)
    theirs = _diffusers_transformer(params)
    theirs.load_state_dict(_convert_transformer(net.state_dict(), params), strict=True)
    theirs.save_pretrained(tmp_path / "transformer")
    ae = randomise_(AutoEncoder(**TINY_AE), seed=10).eval()
    vae = _diffusers_autoencoder(TINY_AE)
    vae.load_state_dict(_convert_autoencoder(ae.state_dict(), TINY_AE), strict=True)
    vae.save_pretrained(tmp_path / "vae")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    bundle = load_model(tmp_path)
    assert bundle.family == "flux1-dev" and bundle.denoiser is not None and bundle.first_stage is not None
    assert bundle.info.missing_parts == ("the text encoders (CLIP-L and T5-XXL)",)
    state = bundle.state_dict()
    expected = {**net.state_dict(), **ae.state_dict()}
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())


def test_a_transformer_bundle_takes_the_autoencoder_of_another_file(tmp_path):
    net, _ = _tiny_transformer(seed=11)
    ae = randomise_(AutoEncoder(**TINY_AE), seed=12).eval()
    save_safetensors(net.state_dict(), tmp_path / "flux1-dev.safetensors")
    save_safetensors(ae.state_dict(), tmp_path / "ae.safetensors")
    bundle = load_model(tmp_path / "flux1-dev.safetensors")
    bundle.add_parts(load_model(tmp_path / "ae.safetensors"))
    assert bundle.first_stage is not None and bundle.info.missing_parts == ("the text encoders (CLIP-L and T5-XXL)",)
    assert bundle.info.latent_channels == 16 and bundle.info.downsampling == 8 and bundle.family == "flux1-dev"
    state = bundle.state_dict()
    assert all(torch.equal(state[k], v) for k, v in {**net.state_dict(), **ae.state_dict()}.items())


def test_the_tiled_autoencoder_passes_take_the_16_channel_autoencoder():
    """No quant convs (identity in their place): tiled encode and decode agree with the whole-image ones."""
    from ldmtool.tiling.vae import VAETiling, tiled_decode, tiled_encode

    ae = randomise_(AutoEncoder(**TINY_AE), seed=13).eval()
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(14)) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        z_tiled = tiled_encode(ae, x, VAETiling(tile=32))
        image, image_tiled = ae.decode(z), tiled_decode(ae, z, VAETiling(tile=4))
    assert z.shape == (1, 16, 8, 12) and (z - z_tiled).abs().max() < 1e-4
    assert (image - image_tiled).abs().max() < 1e-4
