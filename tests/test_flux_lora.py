"""LoRA for FLUX.1 (issue 24): kohya-ss / ComfyUI files on BFL's fused layers and diffusers/PEFT files on
diffusers' split ones, applied by ldmtool through the add-on path every family takes (`ModelAddons.apply` on
a loaded bundle), agree with diffusers' FluxTransformer2DModel holding the same file through diffusers' own
LoRA loader (peft)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ldmtool import load_model
from ldmtool.addons.apply import ModelAddons
from ldmtool.addons.networks import Network
from ldmtool.checkpoints.files import save_safetensors
from ldmtool.errors import CheckpointError
from test_flux import FULL_HIDDEN, FULL_MLP, _convert_transformer, _diffusers_transformer, _tiny_transformer, _tokens

torch.set_num_threads(1)

RANK = 2
# Every layer diffusers gives a FLUX.1 transformer except `norm_out.linear` (its halves are swapped: left out).
PEFT_MODULES = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                "norm1_context.linear", "norm.linear", "proj_mlp", "proj_out", "x_embedder", "context_embedder",
                "linear_1", "linear_2"]


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory):
    """A tiny dev transformer in BFL's layout (two blocks of each kind), its parameters and diffusers' twin."""
    net, params = _tiny_transformer(seed=21, depth=2, depth_single_blocks=2)
    path = tmp_path_factory.mktemp("flux") / "flux1-tiny.safetensors"
    save_safetensors(net.state_dict(), path)
    return path, net.state_dict(), params


def _theirs(flux_file):
    _, state, params = flux_file
    theirs = _diffusers_transformer(params).eval()
    theirs.load_state_dict(_convert_transformer(state, params), strict=True)
    return theirs


def _ours(flux_file, *networks: tuple[object, float]):
    bundle = load_model(flux_file[0])
    return ModelAddons(networks=tuple(Network(path, weight) for path, weight in networks)).apply(bundle).denoiser


def _outputs(ours, theirs, params) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    batch, h, w, text = 2, 2, 3, 5
    img = torch.randn(batch, h * w, params["in_channels"], generator=g)
    txt = torch.randn(batch, text, params["context_in_dim"], generator=g)
    y = torch.randn(batch, params["vec_in_dim"], generator=g)
    t, guidance = torch.tensor([0.8, 0.3]), torch.tensor([3.5, 2.0])
    img_ids, txt_ids = _tokens(batch, h, w, text)
    with torch.no_grad():
        got = ours(img, img_ids.expand(batch, -1, -1), txt, txt_ids.expand(batch, -1, -1), t, y, guidance=guidance)
        want = theirs(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                      img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
    return got, want


def _peft_file(flux_file, path) -> dict[str, torch.Tensor]:
    """A random PEFT LoRA made by peft on diffusers' model, saved with the `transformer.` prefix."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    scratch = _diffusers_transformer(flux_file[2])
    torch.manual_seed(22)
    scratch.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False, target_modules=PEFT_MODULES))
    lora = {"transformer." + k: v.detach().clone() * 0.3 for k, v in get_peft_model_state_dict(scratch).items()}
    save_file(lora, str(path))
    return lora


def _kohya_file(flux_file, path) -> dict[str, torch.Tensor]:
    """A random kohya-ss LoRA on every layer of BFL's transformer with a weight matrix, with alphas."""
    from ldmtool.addons.layer_names import matrix_layers
    from ldmtool.nets.flux import Flux

    _, state, params = flux_file
    g = torch.Generator().manual_seed(23)
    lora = {}
    for name in sorted(matrix_layers(Flux(**params))):
        out, inner = state[f"{name}.weight"].shape
        address = "lora_unet_" + name.replace(".", "_")
        lora[f"{address}.lora_down.weight"] = torch.randn(RANK, inner, generator=g) * 0.3
        lora[f"{address}.lora_up.weight"] = torch.randn(out, RANK, generator=g) * 0.3
        # diffusers' converter leaves the final layer's alphas out (its "TODO: alphas"): alpha = rank there.
        lora[f"{address}.alpha"] = torch.tensor(float(RANK if "final_layer" in name else 1.5))
    save_file(lora, str(path))
    return lora


def _diffusers_from_kohya(lora: dict, params: dict) -> dict[str, torch.Tensor]:
    """diffusers' own kohya conversion (names, row splits, the final modulation's swapped halves). It splits `linear1` at the full model's widths, so a reduced model's rows
    are placed where the full model has them and the converted pieces cropped back (as test_flux.py does)."""
    from diffusers import FluxPipeline

    hidden, mlp = params["hidden_size"], int(params["hidden_size"] * params["mlp_ratio"])
    padded = dict(lora)
    for key in [k for k in lora if "_linear1.lora_up" in k]:
        full = lora[key].new_zeros(3 * FULL_HIDDEN + FULL_MLP, RANK)
        for i in range(3):
            full[i * FULL_HIDDEN: i * FULL_HIDDEN + hidden] = lora[key][i * hidden: (i + 1) * hidden]
        full[3 * FULL_HIDDEN: 3 * FULL_HIDDEN + mlp] = lora[key][3 * hidden:]
        padded[key] = full
    # Its names for the top-level layers (x_embedder, norm_out.linear, ...) lack the `transformer.` prefix that
    # its loader keeps (so `load_lora_weights` drops them silently); the prefix is added here.
    converted = {k if k.startswith("transformer.") else f"transformer.{k}": v
                 for k, v in FluxPipeline.lora_state_dict(padded).items()}
    for key in [k for k in converted if ".single_transformer_blocks." in k and ".lora_B." in k]:
        if any(f".{name}." in key for name in ("to_q", "to_k", "to_v", "proj_mlp")):
            converted[key] = converted[key][: mlp if ".proj_mlp." in key else hidden]
    return converted


def test_a_peft_lora_in_diffusers_names_changes_ours_as_diffusers_loader_changes_theirs(flux_file, tmp_path):
    lora = _peft_file(flux_file, tmp_path / "peft.safetensors")
    theirs = _theirs(flux_file)
    before = _outputs(_ours(flux_file), theirs, flux_file[2])[1]
    theirs.load_lora_adapter(dict(lora), prefix="transformer", adapter_name="peft")
    got, want = _outputs(_ours(flux_file, (tmp_path / "peft.safetensors", 1.0)), theirs, flux_file[2])
    assert (want - before).norm() > 0.03 * want.norm()  # the LoRA changes the output
    assert (got - want).norm() <= 1e-4 * want.norm()


def test_a_kohya_lora_in_bfl_names_changes_ours_as_diffusers_converter_and_loader_change_theirs(flux_file, tmp_path):
    """Every layer (fused q/k/v, single blocks' linear1 and linear2, modulations, embedders, the final layer),
    with alphas; diffusers converts the kohya names to its own and loads the result."""
    lora = _kohya_file(flux_file, tmp_path / "kohya.safetensors")
    theirs = _theirs(flux_file)
    before = _outputs(_ours(flux_file), theirs, flux_file[2])[1]
    theirs.load_lora_adapter(_diffusers_from_kohya(lora, flux_file[2]), prefix="transformer", adapter_name="kohya")
    got, want = _outputs(_ours(flux_file, (tmp_path / "kohya.safetensors", 1.0)), theirs, flux_file[2])
    assert (want - before).norm() > 0.03 * want.norm()
    assert (got - want).norm() <= 1e-4 * want.norm()


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # diffusers' second adapter
def test_several_loras_at_their_own_weights_add_up_as_diffusers_weighted_adapters(flux_file, tmp_path):
    peft = _peft_file(flux_file, tmp_path / "peft.safetensors")
    kohya = _kohya_file(flux_file, tmp_path / "kohya.safetensors")
    theirs = _theirs(flux_file)
    theirs.load_lora_adapter(dict(peft), prefix="transformer", adapter_name="peft")
    theirs.load_lora_adapter(_diffusers_from_kohya(kohya, flux_file[2]), prefix="transformer", adapter_name="kohya")
    theirs.set_adapters(["peft", "kohya"], weights=[0.6, -0.4])
    networks = ((tmp_path / "peft.safetensors", 0.6), (tmp_path / "kohya.safetensors", -0.4))
    got, want = _outputs(_ours(flux_file, *networks), theirs, flux_file[2])
    assert (got - want).norm() <= 1e-4 * want.norm()


def test_the_diffusers_kohya_form_lands_on_the_same_rows_as_the_peft_form(flux_file, tmp_path):
    """`lora_transformer_single_transformer_blocks_1_proj_mlp` (diffusers' names, kohya's form) and
    `transformer.single_transformer_blocks.1.proj_mlp` change the same rows of `linear1`, and only those."""
    g = torch.Generator().manual_seed(24)
    hidden = flux_file[2]["hidden_size"]
    down, up = torch.randn(RANK, hidden, generator=g), torch.randn(4 * hidden, RANK, generator=g)
    save_file({"lora_transformer_single_transformer_blocks_1_proj_mlp.lora_down.weight": down,
               "lora_transformer_single_transformer_blocks_1_proj_mlp.lora_up.weight": up},
              str(tmp_path / "kohya_form.safetensors"))
    save_file({"transformer.single_transformer_blocks.1.proj_mlp.lora_A.weight": down,
               "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight": up},
              str(tmp_path / "peft_form.safetensors"))
    base = flux_file[1]["single_blocks.1.linear1.weight"]
    for name in ("kohya_form", "peft_form"):
        weight = _ours(flux_file, (tmp_path / f"{name}.safetensors", 1.0)).single_blocks[1].linear1.weight
        assert torch.equal(weight[: 3 * hidden], base[: 3 * hidden])
        assert torch.allclose(weight[3 * hidden:], base[3 * hidden:] + up @ down, atol=1e-6)


def test_bfl_names_under_diffusion_model_land_where_kohya_names_do(flux_file, tmp_path):
    """ComfyUI also reads BFL's names with their dots under `diffusion_model.`: the same change as kohya's name."""
    g = torch.Generator().manual_seed(26)
    down, up = torch.randn(RANK, 128, generator=g), torch.randn(384, RANK, generator=g)
    save_file({"lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight": down,
               "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight": up}, str(tmp_path / "kohya.safetensors"))
    save_file({"diffusion_model.double_blocks.1.txt_attn.qkv.lora_A.weight": down,
               "diffusion_model.double_blocks.1.txt_attn.qkv.lora_B.weight": up}, str(tmp_path / "bfl.safetensors"))
    kohya, bfl = (_ours(flux_file, (tmp_path / f"{name}.safetensors", 1.0)).state_dict() for name in ("kohya", "bfl"))
    key = "double_blocks.1.txt_attn.qkv.weight"
    assert torch.allclose(bfl[key], flux_file[1][key] + up @ down, atol=1e-6)
    assert all(torch.equal(bfl[k], v) for k, v in kohya.items())


def test_layers_with_no_place_in_the_transformer_are_reported_in_one_line(flux_file, tmp_path):
    """diffusers' swapped final modulation and a text-encoder layer (FLUX.1's text encoders are not bundle
    parts) match nothing: one line naming the file and the layers."""
    pair = {"lora_A.weight": torch.zeros(RANK, 128), "lora_B.weight": torch.zeros(256, RANK)}
    lora = {f"transformer.norm_out.linear.{k}": v for k, v in pair.items()}
    lora.update({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(RANK, 8),
                 "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, RANK),
                 "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(RANK, 128),
                 "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(384, RANK)})
    save_file(lora, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(CheckpointError) as err:
        _ours(flux_file, (tmp_path / "mixed.safetensors", 1.0))
    message = str(err.value)
    assert "\n" not in message and "mixed.safetensors" in message and "2 layers match nothing" in message
    assert "transformer_norm_out_linear" in message and "lora_te1_text_model_encoder_layers_0_mlp_fc1" in message


def test_an_autoencoder_file_takes_no_lora_in_one_line(tmp_path):
    from ldmtool.checkpoints.tiny import randomise_
    from ldmtool.nets.autoencoder import AutoEncoder
    from test_flux import TINY_AE

    save_safetensors(randomise_(AutoEncoder(**TINY_AE), 0).state_dict(), tmp_path / "ae.safetensors")
    save_file({"lora_unet_img_in.lora_down.weight": torch.zeros(RANK, 64),
               "lora_unet_img_in.lora_up.weight": torch.zeros(128, RANK)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="holds only an autoencoder"):
        ModelAddons(networks=(Network(tmp_path / "lora.safetensors"),)).apply(load_model(tmp_path / "ae.safetensors"))


def test_an_sd3_bundle_takes_a_lora_through_the_same_add_on_path(tmp_path):
    """The MMDiT targets (`addons/mmdit_lora.py`, checked against diffusers in test_mmdit.py) reach an SD3
    single file's `bundle.denoiser` through `ModelAddons`, as FLUX.1's do."""
    from test_mmdit import _apply_lora_file
    from test_sd3_family import _single_file, _tiny_parts

    net, vae = _tiny_parts("sd3-medium-like", seed=4)
    save_safetensors(_single_file(net, vae), tmp_path / "sd3.safetensors")
    g = torch.Generator().manual_seed(25)
    width = net.config.hidden_size
    save_file({"lora_unet_joint_blocks_1_x_block_attn_qkv.lora_down.weight": torch.randn(RANK, width, generator=g),
               "lora_unet_joint_blocks_1_x_block_attn_qkv.lora_up.weight": torch.randn(3 * width, RANK, generator=g),
               "transformer.transformer_blocks.0.ff.net.2.lora_A.weight": torch.randn(RANK, 4 * width, generator=g),
               "transformer.transformer_blocks.0.ff.net.2.lora_B.weight": torch.randn(width, RANK, generator=g)},
              str(tmp_path / "lora.safetensors"))
    bundle = ModelAddons(networks=(Network(tmp_path / "lora.safetensors", 1.0),)).apply(
        load_model(tmp_path / "sd3.safetensors"))
    _apply_lora_file(net, tmp_path / "lora.safetensors")
    ours = bundle.denoiser.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in net.state_dict().items())
    assert not torch.equal(ours["joint_blocks.1.x_block.attn.qkv.weight"], _tiny_parts("sd3-medium-like", 4)[0]
                           .state_dict()["joint_blocks.1.x_block.attn.qkv.weight"])
