"""SDXL variants of issue 19's add-ons (issue 18): a kohya-ss SDXL LoRA (`lora_unet_` in the sgm names kohya
trains SDXL with, `lora_te1_`, `lora_te2_`) against diffusers' `load_lora_weights` + `fuse_lora`, and `--vae`
on an SDXL checkpoint in both file layouts, on tiny random weights."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldmtool.checkpoints.files import save_safetensors
from ldmtool.options import ModelChoice, SamplingChoice
from ldmtool.pipelines.engine import Engine
from test_lora import ALPHA, TEXT_LAYERS, WEIGHT, _pair
from test_sd_vs_diffusers import CFG, SEED, SIZE, STEPS, run_ours as run_sd_cli
from test_sdxl import PROMPT, diffusers_xl_pipeline, save_checkpoint

# sgm names of the layers a kohya SDXL LoRA trains: attention, feed-forward, projections, resnet convolutions
UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
               "in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection")
PREFIX = "first_stage_model."


def kohya_sdxl_lora(bundle, pipe, generator):
    """The UNet under its own (sgm) module names, as kohya-ss writes SDXL LoRAs; each text encoder under the
    transformers names of diffusers' text_encoder / text_encoder_2."""
    state = {}
    layers = [("lora_unet_", bundle.unet, UNET_LAYERS), ("lora_te1_", pipe.text_encoder, TEXT_LAYERS),
              ("lora_te2_", pipe.text_encoder_2, TEXT_LAYERS)]
    for prefix, model, endings in layers:
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(endings):
                name = name if prefix == "lora_unet_" else "text_model." + name.removeprefix("text_model.")
                key = prefix + name.replace(".", "_")
                state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = _pair(module, generator)
                state[f"{key}.alpha"] = torch.tensor(ALPHA)
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-addons")
    model = folder / "sdxl-base.safetensors"
    bundle = save_checkpoint(model, "sdxl-base", seed=5)
    return folder, model, bundle


def test_kohya_sdxl_lora_equals_diffusers_load_lora_weights_and_fuse_lora(tmp_path, files):
    _, model, bundle = files
    pipe = diffusers_xl_pipeline(bundle)
    lora = tmp_path / "fox-style.safetensors"
    state = kohya_sdxl_lora(bundle, pipe, torch.Generator().manual_seed(3))
    assert any(k.startswith("lora_unet_input_blocks_") for k in state) and any(k.startswith("lora_te2_") for k in state)
    save_safetensors(state, lora)
    ours, recipe = run_sd_cli("txt2img", "--prompt", PROMPT, "--model", model, "-W", SIZE, "-H", SIZE,
                              "--lora", f"{lora}:{WEIGHT}", "-o", tmp_path / "fox.png")

    def theirs():
        with torch.no_grad():
            return pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG, eta=0.0,
                        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]

    base = theirs()
    pipe.load_lora_weights(str(lora), adapter_name="style")
    pipe.fuse_lora(lora_scale=WEIGHT)
    reference = theirs()
    assert np.abs(ours - reference).max() <= 1 / 255
    assert np.abs(ours - base).max() > 10 / 255  # control: the LoRA changed the image
    assert recipe["parameters"]["lora_hashes"].startswith("fox-style: ")


def test_kohya_sdxl_lora_text_encoder_parts_land_on_both_towers(files):
    """Each tower changes by its own part of the file only (te1: CLIP-L, te2: bigG's fused attention rows)."""
    from ldmtool.addons.networks import Network, apply_networks
    from ldmtool.checkpoints.tiny import tiny_model

    bundle = tiny_model("sdxl-base", seed=1)
    before = {k: v.clone() for k, v in bundle.state_dict().items() if k.startswith("conditioner.")}
    down, up = torch.ones(1, 32), torch.ones(32, 1)
    state = {"lora_te1_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": down,
             "lora_te1_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight": up,
             "lora_te2_text_model_encoder_layers_1_self_attn_v_proj.lora_down.weight": down,
             "lora_te2_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight": up}
    path = files[0] / "towers.safetensors"
    save_safetensors(state, path)
    apply_networks(bundle, (Network(path, 1.0),))
    changed = {k: (v - before[k]).abs().sum().item() for k, v in bundle.state_dict().items() if k in before}
    assert {k for k, d in changed.items() if d} == {
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"}
    rows = bundle.state_dict()["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    old = before["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(rows[:64], old[:64]) and torch.allclose(rows[64:] - old[64:], torch.ones(32, 32))  # v only


def test_vae_files_on_sdxl_give_the_decode_of_the_checkpoint_holding_that_vae(files):
    """`--vae` on SDXL: a standalone VAE in the CompVis layout and in diffusers' layout (diffusers' converter)
    decodes as the same weights inside the checkpoint do; outputs record it."""
    import yaml
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    from clirun import run_cli

    folder, model, bundle = files
    state = bundle.state_dict()
    g = torch.Generator().manual_seed(2)
    vae = {k: v * (1 + 0.2 * torch.rand(v.shape, generator=g)) for k, v in state.items() if k.startswith(PREFIX)}
    save_safetensors({**state, **vae}, folder / "merged.safetensors")
    (folder / "merged.yaml").write_text(yaml.safe_dump(bundle.config, sort_keys=False))
    save_safetensors({k.removeprefix(PREFIX): v for k, v in vae.items()}, folder / "vae-compvis.safetensors")
    config = create_vae_diffusers_config_from_ldm(bundle.config, vae)
    converted = convert_ldm_vae_checkpoint(vae, config)
    save_safetensors({k: v.contiguous() for k, v in converted.items()}, folder / "vae-diffusers.safetensors")
    latent = torch.randn(1, 4, 8, 8, generator=g)

    def decoded(path, vae_file=None):
        return Engine(ModelChoice(model=str(path), vae=vae_file), SamplingChoice()).open().decode_pixels(latent).int()

    merged = decoded(folder / "merged.safetensors")
    assert torch.equal(decoded(model, folder / "vae-compvis.safetensors"), merged)
    assert (decoded(model, folder / "vae-diffusers.safetensors") - merged).abs().max() <= 1
    assert (decoded(model) - merged).abs().max() > 10  # control: the VAE matters
    result = run_cli("txt2img", "--prompt", "x", "--model", model, "--vae", folder / "vae-compvis.safetensors",
                     "-W", 64, "-H", 64, "--steps", 1, "--quiet", "-o", folder / "x.png")
    assert result.exit_code == 0, result.output
    with Image.open(folder / "x.png") as image:
        assert "VAE: vae-compvis.safetensors" in image.info["parameters"]
