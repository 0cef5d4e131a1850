"""SD3 / SD3.5 MMDiT (issue 24): released key names and parameter counts, equality with diffusers 0.42.1's
SD3Transformer2DModel and AutoencoderKL (test-only oracles; keys converted with diffusers' own single-file
converters) on the same tiny random weights, positional-embedding placement, and the single-file split."""
import math

import pytest
import torch

from ldmtool.errors import CheckpointError, UsageError
from ldmtool.nets.mmdit import MMDiT, MMDiTConfig, mmdit_config_from_shapes
from ldmtool.nets.mmdit_names import mmdit_state_from_diffusers
from ldmtool.nets.sd3_files import (
    SD3_FIRST_STAGE_PARAMS,
    SD3_PRESETS,
    SD3_SCALE_FACTOR,
    SD3_SHIFT_FACTOR,
    UnquantizedAutoencoderKL,
    reduced_mmdit_config,
    sd3_preset_for,
    split_sd3_single_file,
)

# The diffusers configs of the released transformers (stabilityai/stable-diffusion-3*-*/transformer/config.json).
DIFFUSERS_CONFIGS = {
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
}
DIFFUSERS_MODEL_TYPE = {"sd3-medium": "sd3", "sd3.5-medium": "sd35_medium", "sd3.5-large": "sd35_large"}
# Billions of parameters over the state dict, pos_embed included. SD3 medium has 2,084,951,104: the issue's
# "2.09 B" is 2.085 rounded once more.
RELEASED_BILLIONS = {"sd3-medium": 2.085, "sd3.5-medium": 2.470, "sd3.5-large": 8.146}

TINY = {
    "sd3-like": MMDiTConfig(depth=2, pos_embed_max_size=8, adm_in_channels=24, context_in_channels=20),
    "sd3.5-medium-like": MMDiTConfig(depth=3, pos_embed_max_size=10, adm_in_channels=24, context_in_channels=20,
                                     qk_norm=True, dual_attention_layers=(0, 1)),
    "sd3.5-large-like": MMDiTConfig(depth=2, pos_embed_max_size=8, adm_in_channels=24, context_in_channels=20,
                                    qk_norm=True),
}


def _shapes(state) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def _diffusers_transformer(config: MMDiTConfig, device: str = "cpu"):
    from diffusers import SD3Transformer2DModel

    with torch.device(device):
        return SD3Transformer2DModel(
            sample_size=128, patch_size=config.patch_size, in_channels=config.in_channels,
            num_layers=config.depth, attention_head_dim=64, num_attention_heads=config.depth,
            joint_attention_dim=config.context_in_channels, caption_projection_dim=config.hidden_size,
            pooled_projection_dim=config.adm_in_channels, out_channels=config.out_channels,
            pos_embed_max_size=config.pos_embed_max_size, dual_attention_layers=config.dual_attention_layers,
            qk_norm="rms_norm" if config.qk_norm else None)


def _converted(state: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(dict(state))


def _random_mmdit(config: MMDiTConfig, seed: int = 0) -> MMDiT:
    generator = torch.Generator().manual_seed(seed)
    model = MMDiT(config).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return model


# --- full size, on the meta device ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SD3_PRESETS))
def test_full_size_preset_maps_exactly_onto_diffusers_sd3_transformer(name):
    """Every released key and shape converts with diffusers' single-file converter onto the
    SD3Transformer2DModel of the released diffusers config, nothing left over; diffusers recognises the
    prefixed keys as that release; the shapes read back to the preset; the count is the released one."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    with torch.device("meta"):
        state = MMDiT(SD3_PRESETS[name]).state_dict()
    diffusers_config = dict(DIFFUSERS_CONFIGS[name])
    with torch.device("meta"):
        from diffusers import SD3Transformer2DModel
        theirs = SD3Transformer2DModel(**diffusers_config)
    assert _shapes(_converted(state)) == _shapes(theirs.state_dict())
    assert infer_diffusers_model_type({"model.diffusion_model." + k: v for k, v in state.items()}) == \
        DIFFUSERS_MODEL_TYPE[name]
    assert mmdit_config_from_shapes(_shapes(state)) == SD3_PRESETS[name]
    count = sum(math.prod(v.shape) for v in state.values())
    assert count == sum(v.numel() for v in theirs.state_dict().values())
    assert round(count / 1e9, 3) == RELEASED_BILLIONS[name]


def test_full_size_first_stage_maps_exactly_onto_diffusers_sd3_vae():
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with torch.device("meta"):
        ours = UnquantizedAutoencoderKL(**SD3_FIRST_STAGE_PARAMS)
        theirs = AutoencoderKL(**_diffusers_vae_config(SD3_FIRST_STAGE_PARAMS["ddconfig"]))
    state = ours.state_dict()
    assert _shapes(convert_ldm_vae_checkpoint(state, theirs.config)) == _shapes(theirs.state_dict())
    count = sum(v.numel() for v in state.values())
    assert count == sum(p.numel() for p in theirs.parameters()) == 83_819_683  # as the Flux autoencoder's


# --- tiny random weights against diffusers ----------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(TINY))
def test_tiny_mmdit_equals_diffusers_on_the_same_weights(kind):
    """Batch of two with different timesteps, a non-square latent cropped from the grid's centre."""
    config = TINY[kind]
    ours = _random_mmdit(config)
    assert mmdit_config_from_shapes(_shapes(ours.state_dict())) == config
    theirs = _diffusers_transformer(config).eval()
    theirs.load_state_dict(_converted(ours.state_dict()), strict=True)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 6, 10, generator=generator)
    sigma = torch.tensor([0.9, 0.15])
    pooled = torch.randn(2, config.adm_in_channels, generator=generator)
    context = torch.randn(2, 7, config.context_in_channels, generator=generator)
    with torch.no_grad():
        got = ours(x, sigma * 1000, y=pooled, context=context)
        want = theirs(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                      timestep=sigma * 1000).sample
    assert got.shape == want.shape == (2, 16, 6, 10)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    with torch.no_grad():  # skip-layer guidance's call
        skipped = ours(x, sigma * 1000, y=pooled, context=context, skip_layers=[0])
        want_skipped = theirs(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                              timestep=sigma * 1000, skip_layers=[0]).sample
    assert (skipped - want_skipped).abs().max() <= 1e-4 * want_skipped.abs().max()
    assert not torch.allclose(skipped, got)


def test_cropped_positional_embedding_equals_diffusers_for_untiled_latents():
    from diffusers.models.embeddings import PatchEmbed

    ours = _random_mmdit(TINY["sd3-like"])
    theirs = PatchEmbed(height=16, width=16, patch_size=2, in_channels=16, embed_dim=128, pos_embed_max_size=8)
    theirs.pos_embed.copy_(ours.pos_embed)
    for height, width in [(16, 16), (6, 10), (2, 16), (12, 4)]:
        assert torch.equal(ours.cropped_pos_embed(height, width), theirs.cropped_pos_embed(height, width))


def test_a_tiles_embedding_at_its_place_equals_that_crop_of_the_whole_canvas():
    """A tile's tokens entering the first block (patches plus positions) are exactly the whole canvas's
    tokens at the tile's place, wherever the tile sits, edges included."""
    model = _random_mmdit(TINY["sd3-like"])
    canvas = torch.randn(1, 16, 12, 14, generator=torch.Generator().manual_seed(2))
    rows, cols = 6, 7
    whole = model.pos_window(rows, cols).view(rows, cols, -1)
    whole_tokens = (model.x_embedder(canvas) + model.pos_window(rows, cols)).view(rows, cols, -1)
    for top, left, height, width in [(0, 0, 3, 4), (2, 3, 4, 4), (3, 3, 3, 4), (0, 0, 6, 7)]:
        window = model.pos_window(height, width, origin=(top, left), canvas=(rows, cols))
        assert torch.equal(window.view(height, width, -1), whole[top:top + height, left:left + width])
        tile = canvas[:, :, 2 * top:2 * (top + height), 2 * left:2 * (left + width)]
        tokens = model.x_embedder(tile) + window
        assert torch.allclose(tokens.view(height, width, -1),
                              whole_tokens[top:top + height, left:left + width], atol=1e-6)


def test_a_tile_called_with_its_place_equals_the_untiled_call_when_it_is_the_whole_canvas():
    model = _random_mmdit(TINY["sd3-like"])
    x, c = torch.randn(1, 16, 6, 10), torch.randn(1, 7, 20)
    with torch.no_grad():
        untiled = model(x, torch.tensor([300.0]), y=torch.ones(1, 24), context=c)
        placed = model(x, torch.tensor([300.0]), y=torch.ones(1, 24), context=c, pos_origin=(0, 0), pos_canvas=(3, 5))
        shifted = model(x, torch.tensor([300.0]), y=torch.ones(1, 24), context=c, pos_origin=(1, 0), pos_canvas=(4, 5))
    assert torch.equal(untiled, placed)
    assert not torch.allclose(untiled, shifted)


def test_placements_outside_the_grid_or_canvas_are_refused():
    model = MMDiT(TINY["sd3-like"])
    with pytest.raises(UsageError, match="larger than this model's position grid of 8x8 patches"):
        model(torch.zeros(1, 16, 18, 4), torch.tensor([1.0]), y=torch.zeros(1, 24), context=torch.zeros(1, 1, 20))
    with pytest.raises(UsageError, match="not a multiple of the patch size 2"):
        model(torch.zeros(1, 16, 5, 4), torch.tensor([1.0]), y=torch.zeros(1, 24), context=torch.zeros(1, 1, 20))
    with pytest.raises(ValueError, match="outside the 4x4 canvas"):
        model.pos_window(2, 2, origin=(4, 0), canvas=(4, 4))
    with pytest.raises(UsageError, match="runs past this model's position grid of 8x8 patches"):
        model.pos_window(2, 2, origin=(0, 7), canvas=(4, 8))


def test_config_from_shapes_refuses_what_is_not_an_mmdit():
    shapes = _shapes(MMDiT(TINY["sd3-like"]).state_dict())
    with pytest.raises(CheckpointError, match="pos_embed is missing"):
        mmdit_config_from_shapes({k: v for k, v in shapes.items() if k != "pos_embed"})
    with pytest.raises(CheckpointError, match="needs 2 joint blocks of 64-wide heads, found 1"):
        mmdit_config_from_shapes({k: v for k, v in shapes.items() if not k.startswith("joint_blocks.1.")})
    assert mmdit_config_from_shapes({**shapes, "joint_blocks.0.x_block.mlp.fc1.weight": (384, 128)}).mlp_hidden == 384


# --- the single file and its 16-channel autoencoder -------------------------------------------------------

TINY_DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def _diffusers_vae_config(ddconfig: dict) -> dict:
    levels = len(ddconfig["ch_mult"])
    return dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=ddconfig["num_res_blocks"],
                block_out_channels=[ddconfig["ch"] * m for m in ddconfig["ch_mult"]],
                down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=SD3_SCALE_FACTOR,
                shift_factor=SD3_SHIFT_FACTOR)


def _random_vae(seed: int = 3) -> UnquantizedAutoencoderKL:
    generator = torch.Generator().manual_seed(seed)
    vae = UnquantizedAutoencoderKL(ddconfig=TINY_DDCONFIG, embed_dim=16).eval()
    with torch.no_grad():
        for tensor in vae.state_dict().values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return vae


def test_tiny_single_file_splits_into_parts_that_load_strictly_and_round_trip():
    transformer, vae = _random_mmdit(TINY["sd3.5-medium-like"]), _random_vae()
    clip_l = {"transformer.text_model.final_layer_norm.weight": torch.ones(8)}
    t5 = {"transformer.shared.weight": torch.ones(4, 8)}
    single = {**{"model.diffusion_model." + k: v for k, v in transformer.state_dict().items()},
              **{"first_stage_model." + k: v for k, v in vae.state_dict().items()},
              **{"text_encoders.clip_l." + k: v for k, v in clip_l.items()},
              **{"text_encoders.t5xxl." + k: v for k, v in t5.items()}}
    parts = split_sd3_single_file(single)
    assert parts.transformer is not None and parts.first_stage is not None
    assert sorted(parts.text_encoders) == ["clip_l", "t5xxl"] and parts.other == {}
    assert parts.text_encoders["clip_l"] == clip_l and parts.text_encoders["t5xxl"] == t5
    loaded = MMDiT(mmdit_config_from_shapes(_shapes(parts.transformer)))
    loaded.load_state_dict(parts.transformer, strict=True)
    reloaded_vae = UnquantizedAutoencoderKL(ddconfig=TINY_DDCONFIG, embed_dim=16)
    reloaded_vae.load_state_dict(parts.first_stage, strict=True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in transformer.state_dict().items())
    assert split_sd3_single_file({"model.diffusion_model.pos_embed": 1, "stray": 2}).other == {"stray": 2}
    assert split_sd3_single_file({"first_stage_model.encoder.conv_in.weight": 1}).transformer is None


def test_tiny_16_channel_first_stage_equals_diffusers_autoencoder_kl():
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours = _random_vae()
    theirs = AutoencoderKL(**_diffusers_vae_config(TINY_DDCONFIG)).eval()
    theirs.load_state_dict(convert_ldm_vae_checkpoint(ours.state_dict(), theirs.config), strict=True)
    image = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        latent, want_latent = ours.encode(image), theirs.encode(image).latent_dist.mean
        decoded, want_decoded = ours.decode(latent), theirs.decode(want_latent).sample
    assert latent.shape == (1, 16, 16, 12)
    assert (latent - want_latent).abs().max() <= 1e-4 * want_latent.abs().max()
    assert (decoded - want_decoded).abs().max() <= 1e-4 * want_decoded.abs().max()


# --- diffusers names: the folder layout and LoRA targets --------------------------------------------------

@pytest.mark.parametrize("kind", sorted(TINY))
def test_diffusers_folder_state_converts_back_to_the_released_keys_exactly(kind):
    """diffusers' own converter one way, ours back: the same keys and the same tensors."""
    state = _random_mmdit(TINY[kind]).state_dict()
    back = mmdit_state_from_diffusers(_converted(state))
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_diffusers_state_with_a_stray_or_missing_key_is_refused():
    diffusers_state = _converted(_random_mmdit(TINY["sd3-like"]).state_dict())
    with pytest.raises(CheckpointError, match="1 keys have no place in the MMDiT .*: controlnet.weight"):
        mmdit_state_from_diffusers({**diffusers_state, "controlnet.weight": torch.zeros(1)})
    del diffusers_state["transformer_blocks.0.attn.to_k.weight"]
    with pytest.raises(CheckpointError, match="joint_blocks.0.x_block.attn.qkv.weight needs q, k and v; found 2"):
        mmdit_state_from_diffusers(diffusers_state)


def _apply_lora_file(model: MMDiT, path) -> int:
    from ldmtool.addons.lora import apply_network, read_network
    from ldmtool.addons.mmdit_lora import mmdit_lora_targets

    return apply_network(model, mmdit_lora_targets(model, ""), read_network(path), (1.0, 1.0), str(path))


def test_a_peft_lora_saved_by_diffusers_names_changes_ours_as_it_changes_diffusers(tmp_path):
    """PEFT LoRA on diffusers' model (q/k/v of both streams and of the dual attention, outputs, MLPs, the
    image stream's adaLN, the patch conv), saved with the `transformer.` prefix; applied to ours, both agree."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = TINY["sd3.5-medium-like"]
    ours = _random_mmdit(config)
    theirs = _diffusers_transformer(config).eval()
    theirs.load_state_dict(_converted(ours.state_dict()), strict=True)
    torch.manual_seed(5)
    modules = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
               "ff.net.0.proj", "ff_context.net.2", "norm1.linear", "pos_embed.proj", "proj_out"]
    theirs.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=modules))
    lora = {"transformer." + k: v.detach().clone() for k, v in get_peft_model_state_dict(theirs).items()}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    assert _apply_lora_file(ours, tmp_path / "lora.safetensors") == len(lora) // 2
    x, pooled, context = torch.randn(1, 16, 4, 6), torch.randn(1, 24), torch.randn(1, 5, 20)
    with torch.no_grad():
        got = ours(x, torch.tensor([400.0]), y=pooled, context=context)
        want = theirs(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                      timestep=torch.tensor([400.0])).sample
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_a_kohya_lora_on_the_fused_qkv_equals_diffusers_named_layers_on_its_rows(tmp_path):
    """sd-scripts names the released layers (`lora_unet_joint_blocks_0_context_block_attn_qkv`); the same
    change written as diffusers' add_q/k/v_proj layers (the up matrix's row thirds) lands identically."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(6)
    down, up = torch.randn(2, 128, generator=generator), torch.randn(384, 2, generator=generator)
    save_file({"lora_unet_joint_blocks_0_context_block_attn_qkv.lora_down.weight": down,
               "lora_unet_joint_blocks_0_context_block_attn_qkv.lora_up.weight": up,
               "lora_unet_joint_blocks_0_context_block_attn_qkv.alpha": torch.tensor(1.0)},
              str(tmp_path / "kohya.safetensors"))
    peft_layers = {}
    for third, name in enumerate(["add_q_proj", "add_k_proj", "add_v_proj"]):
        peft_layers[f"transformer.transformer_blocks.0.attn.{name}.lora_A.weight"] = down.clone()
        rows = up[128 * third:128 * (third + 1)].clone()
        peft_layers[f"transformer.transformer_blocks.0.attn.{name}.lora_B.weight"] = rows
        peft_layers[f"transformer.transformer_blocks.0.attn.{name}.alpha"] = torch.tensor(1.0)
    save_file(peft_layers, str(tmp_path / "peft.safetensors"))
    kohya, peft, base = (_random_mmdit(TINY["sd3-like"]) for _ in range(3))
    _apply_lora_file(kohya, tmp_path / "kohya.safetensors")
    _apply_lora_file(peft, tmp_path / "peft.safetensors")
    key = "joint_blocks.0.context_block.attn.qkv.weight"
    assert torch.allclose(kohya.state_dict()[key], base.state_dict()[key] + 0.5 * up @ down, atol=1e-5)
    assert all(torch.equal(kohya.state_dict()[k], v) for k, v in peft.state_dict().items())


def test_the_tiled_autoencoder_serves_the_16_channel_first_stage_as_it_serves_the_ldm_ones():
    """tiling/vae.py calls quant_conv / post_quant_conv as modules: the unquantized first stage's tiled
    encode and decode equal its untiled ones within 1/255."""
    from ldmtool.tiling.vae import VAETiling, tiled_decode, tiled_encode

    vae = _random_vae()
    image = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        latent, decoded = vae.encode(image), vae.decode(vae.encode(image))
        tiled_latent = tiled_encode(vae, image, VAETiling(tile=8))
        tiled_decoded = tiled_decode(vae, latent, VAETiling(tile=4))
    assert (tiled_latent - latent).abs().max() <= 1 / 255
    assert (tiled_decoded - decoded).abs().max() <= 2 / 255  # images span [-1, 1]: 1/255 of the pixel range


@pytest.mark.parametrize("name", sorted(SD3_PRESETS))
def test_a_reduced_preset_keeps_the_structure_that_names_its_release(name):
    reduced = reduced_mmdit_config(name)
    with torch.device("meta"):
        shapes = _shapes(MMDiT(reduced).state_dict())
    assert mmdit_config_from_shapes(shapes) == reduced
    assert sd3_preset_for(reduced) == sd3_preset_for(SD3_PRESETS[name]) == name


def test_a_batch_of_tiles_each_at_its_own_place_equals_the_tiles_called_one_by_one():
    """The tiled engine folds tiles into one network batch: one origin per batch item."""
    model = _random_mmdit(TINY["sd3.5-large-like"])
    generator = torch.Generator().manual_seed(8)
    tiles, context = torch.randn(2, 16, 4, 6, generator=generator), torch.randn(2, 5, 20, generator=generator)
    pooled, t = torch.randn(2, 24, generator=generator), torch.tensor([700.0, 700.0])
    origins = [(0, 0), (1, 2)]
    with torch.no_grad():
        batched = model(tiles, t, y=pooled, context=context, pos_origin=origins, pos_canvas=(3, 5))
        one_by_one = torch.cat([model(tiles[i:i + 1], t[i:i + 1], y=pooled[i:i + 1], context=context[i:i + 1],
                                      pos_origin=origins[i], pos_canvas=(3, 5)) for i in range(2)])
        centred = model(tiles[1:], t[1:], y=pooled[1:], context=context[1:])
    assert torch.allclose(batched, one_by_one, rtol=1e-5, atol=1e-5 * one_by_one.abs().max().item())
    assert not torch.allclose(batched[1:], centred)  # the second tile's place is not the centre crop


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_and_inputs_give_the_fp32_result_within_its_rounding(dtype):
    """The whole network runs in the precision it is cast to (positions and timestep embedding follow x)."""
    model = _random_mmdit(TINY["sd3.5-medium-like"])
    generator = torch.Generator().manual_seed(9)
    x, pooled, context = (torch.randn(1, 16, 8, 8, generator=generator), torch.randn(1, 24, generator=generator),
                          torch.randn(1, 5, 20, generator=generator))
    with torch.no_grad():
        want = model(x, 500.0, y=pooled, context=context)
        got = model.to(dtype)(x.to(dtype), 500.0, y=pooled.to(dtype), context=context.to(dtype))
    assert got.dtype == dtype
    assert (got.float() - want).abs().max() <= 0.05 * want.abs().max()
