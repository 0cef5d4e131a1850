"""The SD3 / SD3.5 family entry: the presets on the meta device are the MMDiT and VAE that tests/test_mmdit.py
checks against the released files, tiny random single files in each released layout (full file, without text
encoders, ComfyUI's prefixed or bare transformer) and a diffusers folder load with no flag into the MMDiT their
tensors build, the standalone SD3 VAE is named beside FLUX.1's autoencoder, and commands name in one line what an
incomplete file lacks."""
from __future__ import annotations

import json
import math

import pytest
import torch

from clirun import run_cli
from ldmtool import build_model, load_model
from ldmtool.checkpoints.files import save_safetensors
from ldmtool.checkpoints.tiny import randomise_, tiny_config
from ldmtool.families.info import Parameterization
from ldmtool.nets.autoencoder import AutoEncoder
from ldmtool.nets.mmdit import MMDiT, MMDiTConfig, mmdit_config_from_shapes
from ldmtool.nets.sd3_files import SD3_FIRST_STAGE_PARAMS, SD3_PRESETS, UnquantizedAutoencoderKL
from test_mmdit import RELEASED_BILLIONS, _converted, _diffusers_transformer, _diffusers_vae_config

torch.set_num_threads(1)

PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TINY = {
    "sd3-medium-like": MMDiTConfig(depth=2, pos_embed_max_size=8, adm_in_channels=24, context_in_channels=20),
    "sd3.5-medium-like": MMDiTConfig(depth=3, pos_embed_max_size=10, adm_in_channels=24, context_in_channels=20,
                                     qk_norm=True, dual_attention_layers=(0, 1)),
    "sd3.5-large-like": MMDiTConfig(depth=2, pos_embed_max_size=8, adm_in_channels=24, context_in_channels=20,
                                    qk_norm=True),
}
TINY_AE = dict(resolution=32, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, z_channels=16)
# Stand-ins for the embedded text encoders: the bundle leaves their keys to the pipeline, whatever they hold.
TEXT_ENCODERS = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8),
                 "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight": torch.ones(12),
                 "text_encoders.t5xxl.transformer.shared.weight": torch.ones(4, 8)}


def _shapes(state) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


# --- full size, on the meta device -----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SD3_PRESETS))
def test_full_size_presets_are_the_released_mmdit_and_vae(name):
    """The preset builds the network whose keys, shapes and count test_mmdit.py checks against diffusers'
    released configs, under the single file's prefixes, with the VAE and the reference's latent constants."""
    bundle = build_model(name, device="meta")
    with torch.device("meta"):
        mmdit, vae = MMDiT(SD3_PRESETS[name]), UnquantizedAutoencoderKL(**SD3_FIRST_STAGE_PARAMS)
    assert _shapes(bundle.denoiser.state_dict()) == _shapes(mmdit.state_dict())
    assert _shapes(bundle.first_stage.state_dict()) == _shapes(vae.state_dict())
    assert set(bundle.state_dict()) == {PREFIX + k for k in mmdit.state_dict()} | \
        {VAE_PREFIX + k for k in vae.state_dict()}
    count = sum(math.prod(v.shape) for v in bundle.denoiser.state_dict().values())
    assert round(count / 1e9, 3) == RELEASED_BILLIONS[name]
    assert (bundle.scale_factor, bundle.shift_factor) == (1.5305, 0.0609)
    assert bundle.info.parameterization is Parameterization.FLOW and bundle.info.latent_channels == 16
    assert bundle.info.pixel_multiple == 16 and bundle.info.entry == "sd3"


# --- tiny single files --------------------------------------------------------------------------------------

def _tiny_parts(kind: str, seed: int = 0) -> tuple[MMDiT, AutoEncoder]:
    net = randomise_(MMDiT(TINY[kind]), seed, scale=0.2).eval()
    vae = randomise_(AutoEncoder(**TINY_AE), seed + 1, scale=0.05).eval()
    return net, vae


def _single_file(net: MMDiT, vae, *, prefix: str = PREFIX, text_encoders: bool = False) -> dict:
    state = {prefix + k: v for k, v in net.state_dict().items()}
    if vae is not None:
        state.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    return {**state, **(TEXT_ENCODERS if text_encoders else {})}


@pytest.mark.parametrize(("case", "kind", "layout", "preset"), [
    ("sd3-medium-full", "sd3-medium-like", dict(text_encoders=True), "sd3-medium"),
    ("sd3.5-medium-full", "sd3.5-medium-like", dict(text_encoders=True), "sd3.5-medium"),
    ("sd3.5-large-full", "sd3.5-large-like", dict(text_encoders=True), "sd3.5-large"),
    ("sd3.5-medium-without-text-encoders", "sd3.5-medium-like", {}, "sd3.5-medium"),
    ("comfyui-transformer", "sd3.5-medium-like", dict(vae=False), "sd3.5-medium"),
    ("bare-transformer", "sd3-medium-like", dict(vae=False, prefix=""), "sd3-medium"),
])
def test_tiny_single_files_load_with_no_flag_into_the_mmdit_their_tensors_build(tmp_path, case, kind, layout, preset):
    net, vae = _tiny_parts(kind)
    with_vae = layout.pop("vae", True)
    state = _single_file(net, vae if with_vae else None, **layout)
    save_safetensors(state, tmp_path / f"{case}.safetensors")
    bundle = load_model(tmp_path / f"{case}.safetensors")
    assert bundle.family == preset and bundle.load_info.config_used.startswith(f"detected: {preset}")
    direct = MMDiT(mmdit_config_from_shapes(_shapes(net.state_dict()))).eval()
    direct.load_state_dict(net.state_dict(), strict=True)
    assert bundle.denoiser.config == direct.config == TINY[kind]
    ours = bundle.denoiser.state_dict()
    assert ours.keys() == direct.state_dict().keys() and all(torch.equal(ours[k], v) for k, v in
                                                             direct.state_dict().items())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 16, 8, 6, generator=g), torch.randn(1, 24, generator=g)
    context = torch.randn(1, 5, 20, generator=g)
    with torch.no_grad():  # equal weights; the loaded ones are laid out otherwise (memory-mapped), so the
        got = bundle.denoiser(x, torch.tensor([700.0]), y=y, context=context)  # kernels may round otherwise
        want = direct(x, torch.tensor([700.0]), y=y, context=context)
    assert (got - want).norm() <= 1e-5 * want.norm()
    assert (bundle.first_stage is not None) == with_vae
    if with_vae:
        assert all(torch.equal(bundle.first_stage.state_dict()[k], v) for k, v in vae.state_dict().items())
        assert (bundle.scale_factor, bundle.shift_factor) == (1.5305, 0.0609)
    assert not any(k.startswith("text_encoders.") for k in bundle.state_dict())
    expected_missing = () if layout.get("text_encoders") else ("the CLIP-L and OpenCLIP bigG text encoders",)
    if not with_vae:
        expected_missing = (bundle.info.missing_parts[0], *expected_missing)
        assert "VAE" in expected_missing[0]
    assert bundle.info.missing_parts == expected_missing


def test_models_inspect_names_the_family_and_convert_keeps_the_network_and_vae(tmp_path):
    """Convert writes the bundle's parts; the text encoders stay in the original file, and the converted
    one says they are missing."""
    net, vae = _tiny_parts("sd3.5-medium-like", seed=2)
    save_safetensors(_single_file(net, vae, text_encoders=True), tmp_path / "sd3.5_medium.safetensors")
    result = run_cli("models", "inspect", tmp_path / "sd3.5_medium.safetensors", "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["detected_family"] == "sd3.5-medium" and report["matches"]
    assert report["problem"] is None
    result = run_cli("models", "convert", tmp_path / "sd3.5_medium.safetensors", tmp_path / "converted.safetensors")
    assert result.exit_code == 0
    bundle = load_model(tmp_path / "converted.safetensors")
    assert bundle.load_info.config_used == "config stored in the file" and bundle.family == "sd3.5-medium"
    assert bundle.state_dict().keys() == _single_file(net, vae).keys()
    assert all(torch.equal(bundle.state_dict()[k], v) for k, v in _single_file(net, vae).items())
    assert bundle.info.missing_parts == ("the CLIP-L and OpenCLIP bigG text encoders",)


def test_a_diffusers_folder_loads_the_transformer_and_vae_under_the_released_names(tmp_path):
    """Written by diffusers' own models from the keys diffusers' single-file converters give."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    net, vae = _tiny_parts("sd3.5-medium-like", seed=5)
    theirs = _diffusers_transformer(TINY["sd3.5-medium-like"])
    theirs.load_state_dict(_converted(net.state_dict()), strict=True)
    theirs.save_pretrained(tmp_path / "transformer")
    ddconfig = dict(ch=TINY_AE["ch"], ch_mult=TINY_AE["ch_mult"], num_res_blocks=TINY_AE["num_res_blocks"])
    their_vae = AutoencoderKL(**_diffusers_vae_config(ddconfig))
    their_vae.load_state_dict(convert_ldm_vae_checkpoint(vae.state_dict(), their_vae.config), strict=True)
    their_vae.save_pretrained(tmp_path / "vae")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    bundle = load_model(tmp_path)
    assert bundle.family == "sd3.5-medium" and bundle.first_stage is not None
    assert bundle.info.missing_parts == ("the CLIP-L and OpenCLIP bigG text encoders",)
    expected = {**net.state_dict(), **vae.state_dict()}
    state = bundle.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())


# --- the standalone VAE ----------------------------------------------------------------------------------

def test_the_standalone_sd3_vae_is_named_beside_the_flux_autoencoder_and_chosen_by_preset(tmp_path):
    """The same keys and shapes as ae.safetensors: detection names FLUX.1's, lists SD3's and says how to take
    it; SD3's preset (here its tiny config) gives the same weights with SD3's latent constants."""
    doc = tiny_config("sd3-vae")
    vae = randomise_(build_model(doc), seed=3)
    save_safetensors(vae.state_dict(), tmp_path / "vae.safetensors")
    detected = load_model(tmp_path / "vae.safetensors")
    assert detected.family == "flux-ae" and detected.load_info.detection.alternatives == ("sd3-vae",)
    assert "--preset sd3-vae" in detected.load_info.config_used
    chosen = load_model(tmp_path / "vae.safetensors", config=doc)
    assert chosen.family == "sd3-vae" and (chosen.scale_factor, chosen.shift_factor) == (1.5305, 0.0609)
    assert chosen.denoiser is None and chosen.info.missing_parts == ("an SD3 / SD3.5 transformer",)
    assert all(torch.equal(chosen.state_dict()[k], v) for k, v in vae.state_dict().items())
    result = run_cli("models", "inspect", tmp_path / "vae.safetensors", "--json")
    assert json.loads(result.stdout)["detected_alternatives"] == ["sd3-vae"]


# --- commands --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("whole", [True, False], ids=["whole-file", "transformer-only"])
def test_a_command_on_an_incomplete_sd3_file_names_what_it_needs_in_one_line(tmp_path, whole):
    net, vae = _tiny_parts("sd3-medium-like", seed=4)
    save_safetensors(_single_file(net, vae if whole else None, text_encoders=whole), tmp_path / "sd3.safetensors")
    result = run_cli("txt2img", "--model", tmp_path / "sd3.safetensors", "--prompt", "a cat", "-o", tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 3 and len(lines) == 1 and "Traceback" not in result.output
    assert "sd3.safetensors: a run of this SD3 model needs" in lines[0]
    if whole:  # the file holds a T5 encoder, whose tokenizer no file carries
        assert lines[0].endswith("needs T5's tokenizer.json (pass --tokenizer DIR)")
    else:
        assert "autoencoder (pass --vae FILE" in lines[0] and "OpenCLIP bigG text encoder (pass --text-encoder" in lines[0]
