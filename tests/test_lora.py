"""LoRA and LyCORIS (issue 19): a kohya-ss LoRA written here on a tiny SD 1.x model (UNet with conv LoRA,
text encoder, alpha) gives diffusers' `load_lora_weights` + `fuse_lora` image within 1/255 (diffusers and
PEFT are the test-only oracle); LoHa and LoKr change each weight by their delta computed directly here;
weight 0 is the base image exactly; `<lora:NAME:W>` in prompts; each LoRA set applied once per load."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldmtool.addons.networks import Network, apply_networks, network_hash
from ldmtool.checkpoints.files import save_safetensors
from ldmtool.checkpoints.tiny import tiny_model
from ldmtool.cli.app import main
from test_sd_vs_diffusers import CFG, SEED, SIZE, STEPS, diffusers_pipeline, run_ours, save_checkpoint

PROMPT = "a red fox jumping over a fence"
RANK, ALPHA, WEIGHT = 4, 2.0, 0.8
# Layers of every kind a kohya LoRA trains: attention and feed-forward linears, 1x1 projections, the
# resnets' 3x3 convolutions (conv LoRA: k x k down, 1 x 1 up), time embedding projections and shortcuts.
UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
               "conv2", "time_emb_proj", "conv_shortcut")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _pair(module, generator):
    """(down, up) for a layer, shaped as kohya-ss writes them."""
    weight = module.weight
    if weight.dim() == 4:
        out, inp, kh, kw = weight.shape
        down, up = torch.randn(RANK, inp, kh, kw, generator=generator), torch.randn(out, RANK, 1, 1, generator=generator)
    else:
        down, up = torch.randn(RANK, weight.shape[1], generator=generator), torch.randn(weight.shape[0], RANK, generator=generator)
    return down * 0.3, up * 0.3


def kohya_lora(pipe, generator):
    """A kohya-ss LoRA over the diffusers modules of the UNet and the text encoder (`lora_unet_`/`lora_te_`)."""
    state = {}
    # transformers 5's CLIPTextModel has no `text_model` level; kohya-ss files name it (transformers 4 did)
    for prefix, model, layers in (("lora_unet_", pipe.unet, UNET_LAYERS),
                                  ("lora_te_text_model_", pipe.text_encoder, TEXT_LAYERS)):
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(layers):
                key = prefix + name.replace(".", "_")
                state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = _pair(module, generator)
                state[f"{key}.alpha"] = torch.tensor(ALPHA)
    return state


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    model = folder / "sd1-tiny.safetensors"
    bundle = save_checkpoint(model)
    pipe = diffusers_pipeline(bundle)
    lora = folder / "loras" / "fox-style.safetensors"
    lora.parent.mkdir()
    save_safetensors(kohya_lora(pipe, torch.Generator().manual_seed(3)), lora)
    return model, bundle, pipe, lora


def test_kohya_lora_equals_diffusers_load_lora_weights_and_fuse_lora(tmp_path, setup):
    model, bundle, pipe, lora = setup
    ours, recipe = run_ours("txt2img", "--prompt", PROMPT, "--model", model, "-W", SIZE, "-H", SIZE,
                            "--lora", f"{lora}:{WEIGHT}", "-o", tmp_path / "fox.png")
    pipe.load_lora_weights(str(lora), adapter_name="style")
    pipe.fuse_lora(lora_scale=WEIGHT)
    try:
        with torch.no_grad():
            theirs = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG, eta=0.0,
                          generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]
    finally:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    assert np.abs(ours - theirs).max() <= 1 / 255
    with torch.no_grad():  # control: the LoRA changed diffusers' image too
        base = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG, eta=0.0,
                    generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]
    assert np.abs(ours - base).max() > 10 / 255
    assert recipe["parameters"]["lora_hashes"] == f"fox-style: {network_hash(lora)}"
    with Image.open(tmp_path / "fox.png") as image:
        assert f'Lora hashes: "fox-style: {network_hash(lora)}"' in image.info["parameters"]


def test_a_tags_text_encoder_and_unet_weights_equal_diffusers_fusing_each_part_apart(tmp_path, setup):
    """`<lora:NAME:TE:UNET>` as A1111 reads it: the first weight is the text encoder's, the second the UNet's
    (it was read as one weight for both, the second ignored)."""
    model, _, pipe, lora = setup
    te, unet = 0.3, 0.9
    ours, recipe = run_ours("txt2img", "--prompt", f"{PROMPT} <lora:fox-style:{te}:{unet}>", "--model", model,
                            "-W", SIZE, "-H", SIZE, "--lora-dir", lora.parent, "-o", tmp_path / "a.png")
    named, _ = run_ours("txt2img", "--prompt", f"{PROMPT} <lora:fox-style:unet={unet}:te={te}>", "--model", model,
                        "-W", SIZE, "-H", SIZE, "--lora-dir", lora.parent, "-o", tmp_path / "b.png")
    pipe.load_lora_weights(str(lora), adapter_name="style")
    pipe.fuse_lora(components=["unet"], lora_scale=unet)
    pipe.fuse_lora(components=["text_encoder"], lora_scale=te)
    try:
        with torch.no_grad():
            theirs = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG, eta=0.0,
                          generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]
    finally:
        pipe.unfuse_lora(components=["unet", "text_encoder"])
        pipe.unload_lora_weights()
    assert np.abs(ours - theirs).max() <= 1 / 255
    assert np.array_equal(ours, named)
    one_weight, _ = run_ours("txt2img", "--prompt", f"{PROMPT} <lora:fox-style:{unet}>", "--model", model,
                             "-W", SIZE, "-H", SIZE, "--lora-dir", lora.parent, "-o", tmp_path / "c.png")
    assert np.abs(ours - one_weight).max() > 2 / 255  # control: the text encoder's weight counts
    assert recipe["job"]["options"]["lora_sha256"][0][1:] == [unet, te]


def test_weight_zero_is_the_base_image_and_a_prompt_tag_equals_the_option(tmp_path, setup):
    model, _, _, lora = setup
    base, _ = run_ours("txt2img", "--prompt", PROMPT, "--model", model, "-W", SIZE, "-H", SIZE, "-o", tmp_path / "a.png")
    zero, _ = run_ours("txt2img", "--prompt", PROMPT, "--model", model, "-W", SIZE, "-H", SIZE,
                       "--lora", f"{lora}:0", "-o", tmp_path / "b.png")
    option, _ = run_ours("txt2img", "--prompt", PROMPT, "--model", model, "-W", SIZE, "-H", SIZE,
                         "--lora", f"{lora}:0.5", "-o", tmp_path / "c.png")
    tagged, recipe = run_ours("txt2img", "--prompt", f"{PROMPT} <lora:fox-style:0.5>", "--model", model,
                              "-W", SIZE, "-H", SIZE, "--lora-dir", lora.parent, "-o", tmp_path / "d.png")
    assert np.array_equal(base, zero)
    assert np.array_equal(option, tagged)
    assert recipe["parameters"]["lora_hashes"] == f"fox-style: {network_hash(lora)}"


def test_prompt_file_lines_with_lora_sets_apply_each_set_once(tmp_path, setup, monkeypatch):
    """Lines alternate between two LoRA sets; the model cache keys on base file + set, so each set is
    applied once, and every line's image equals that line run alone."""
    model, _, _, lora = setup
    from ldmtool.addons import apply as apply_module
    from ldmtool.runtime.cache import model_cache

    model_cache().clear()  # earlier tests loaded this set already
    applied = []
    real = apply_module.apply_networks
    monkeypatch.setattr(apply_module, "apply_networks", lambda b, n: (applied.append(n), real(b, n)))
    monkeypatch.setenv("LDMTOOL_LORA_DIR", str(lora.parent))
    lines = [f"{PROMPT} <lora:fox-style:0.5>", "a blue bird", "a cat <lora:fox-style:0.5>", "a dog"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    try:
        main(["txt2img", "--prompts", str(tmp_path / "prompts.txt"), "--model", str(model), "-W", str(SIZE), "-H",
              str(SIZE), "--steps", "2", "--seed", "1", "--quiet", "-o", str(out), "--batch-size", "4"])
    except SystemExit as exit:
        assert not exit.code
    sets = [n for n in applied if n]
    assert len(sets) == 1 and sets[0][0].weight == 0.5
    written = sorted(out.glob("*.png"))
    assert len(written) == 4
    recipes = [json.loads(Image.open(path).info["ldmtool"]) for path in written]
    assert [bool(r["parameters"].get("lora_hashes")) for r in recipes] == [True, False, True, False]
    try:
        main(["txt2img", "--prompt", lines[2], "--model", str(model), "-W", str(SIZE), "-H", str(SIZE), "--steps", "2",
              "--item-seed", str(recipes[2]["seed"]), "--quiet",
              "-o", str(tmp_path / "alone.png")])
    except SystemExit as exit:
        assert not exit.code
    assert np.array_equal(np.asarray(Image.open(tmp_path / "alone.png")), np.asarray(Image.open(written[2])))


def test_loha_and_lokr_add_their_directly_computed_deltas():
    bundle = tiny_model("sd1")
    g = torch.Generator().manual_seed(0)
    linear = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # (32, 32)
    conv = "model.diffusion_model.input_blocks.1.0.in_layers.2"  # (32, 32, 3, 3)
    loha = {"hada_w1_a": torch.randn(32, 2, generator=g), "hada_w1_b": torch.randn(2, 32, generator=g),
            "hada_w2_a": torch.randn(32, 2, generator=g), "hada_w2_b": torch.randn(2, 32, generator=g),
            "alpha": torch.tensor(1.0)}
    lokr = {"lokr_w1": torch.randn(4, 4, generator=g), "lokr_w2_a": torch.randn(8, 2, generator=g),
            "lokr_w2_b": torch.randn(2, 8, 3, 3, generator=g), "alpha": torch.tensor(4.0)}
    expected_loha = (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"]) * (1.0 / 2)
    w2 = torch.einsum("or,rikl->oikl", lokr["lokr_w2_a"], lokr["lokr_w2_b"])
    expected_lokr = torch.kron(lokr["lokr_w1"][:, :, None, None], w2) * (4.0 / 2)
    state = {**{f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.{k}": v for k, v in loha.items()},
             **{f"lora_unet_input_blocks_1_0_in_layers_2.{k}": v for k, v in lokr.items()}}
    before = {name: bundle.get_parameter(f"{name}.weight").clone() for name in (linear, conv)}
    path = _tmp_file(state)
    apply_networks(bundle, (Network(path, 0.7),))
    assert torch.allclose(bundle.get_parameter(f"{linear}.weight"), before[linear] + 0.7 * expected_loha, atol=1e-5)
    assert torch.allclose(bundle.get_parameter(f"{conv}.weight"), before[conv] + 0.7 * expected_lokr, atol=1e-5)


def _tmp_file(state):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "lyco.safetensors"
    save_safetensors(state, path)
    return path


def test_keys_for_another_model_are_one_clear_error(tmp_path, setup, capsys):
    model, _, _, _ = setup
    bad = tmp_path / "sdxl-lora.safetensors"
    save_safetensors({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
                      "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2)}, bad)
    odd = tmp_path / "odd.safetensors"
    save_safetensors({"something.else": torch.zeros(2)}, odd)
    for path, words in ((bad, "match nothing in this model"), (odd, "cannot read")):
        with pytest.raises(SystemExit) as exit:
            main(["txt2img", "--prompt", "x", "--model", str(model), "-W", "64", "-H", "64", "--steps", "1",
                  "--lora", str(path), "--quiet", "-o", str(tmp_path / "x.png")])
        assert exit.value.code == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0] and words in err[0]


def test_sd2_text_encoder_keys_land_on_rows_of_openclips_fused_attention():
    """kohya names SD 2.x's OpenCLIP text encoder in the transformers layout: q/k/v are thirds of in_proj_weight."""
    bundle = tiny_model("sd2")
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    key = "lora_te_text_model_encoder_layers_1_self_attn_k_proj"
    path = _tmp_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
    name = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"
    before = bundle.get_parameter(name).clone()
    apply_networks(bundle, (Network(path, 1.0),))
    after = bundle.get_parameter(name)
    assert torch.allclose(after[32:64], before[32:64] + up @ down, atol=1e-6)
    assert torch.equal(after[:32], before[:32]) and torch.equal(after[64:], before[64:])


@pytest.mark.parametrize("keys", [
    {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": "down",  # kohya, diffusers names
     "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": "up", "lora_unet_mid_block_attentions_0_proj_in.alpha": 1.0},
    {"lora_unet_middle_block_1_proj_in.lora_down.weight": "down",  # kohya, CompVis names
     "lora_unet_middle_block_1_proj_in.lora_up.weight": "up", "lora_unet_middle_block_1_proj_in.alpha": 1.0},
    {"unet.mid_block.attentions.0.proj_in.lora_A.weight": "down",  # PEFT (rank 2, alpha 1: scale 1/2)
     "unet.mid_block.attentions.0.proj_in.lora_B.weight": "up", "unet.mid_block.attentions.0.proj_in.alpha": 1.0},
    {"unet.mid_block.attentions.0.proj_in.lora.down.weight": "down",  # older diffusers
     "unet.mid_block.attentions.0.proj_in.lora.up.weight": "up", "unet.mid_block.attentions.0.proj_in.alpha": 1.0},
])
def test_every_naming_of_a_layer_lands_on_the_same_weight(keys):
    bundle = tiny_model("sd1")
    g = torch.Generator().manual_seed(4)
    values = {"down": torch.randn(2, 128, 1, 1, generator=g), "up": torch.randn(128, 2, 1, 1, generator=g)}
    name = "model.diffusion_model.middle_block.1.proj_in.weight"  # a 1x1 conv (128, 128, 1, 1)
    before = bundle.get_parameter(name).clone()
    state = {k: values[v] if isinstance(v, str) else torch.tensor(v) for k, v in keys.items()}
    apply_networks(bundle, (Network(_tmp_file(state), 1.0),))
    expected = before + (values["up"].flatten(1) @ values["down"].flatten(1)).reshape(before.shape) / 2
    assert torch.allclose(bundle.get_parameter(name), expected, atol=1e-5)


def test_dora_and_tucker_layers_are_refused_by_name():
    from ldmtool.addons.lora import read_network
    from ldmtool.errors import CheckpointError

    key = "lora_unet_mid_block_attentions_0_proj_in"
    for extra, words in (("dora_scale", "DoRA"), ("lora_mid.weight", "Tucker")):
        path = _tmp_file({f"{key}.lora_down.weight": torch.zeros(2, 8), f"{key}.lora_up.weight": torch.zeros(8, 2),
                          f"{key}.{extra}": torch.zeros(2)})
        with pytest.raises(CheckpointError, match=words):
            read_network(path)


def test_a_run_wide_prompt_tag_applies_to_img2img_as_the_option_does(tmp_path, setup):
    model, _, _, lora = setup
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(source)
    images = []
    for name, prompt, extra in (("a", f"{PROMPT} <lora:fox-style:0.6>", ["--lora-dir", lora.parent]),
                                ("b", PROMPT, ["--lora", f"{lora}:0.6"]), ("c", PROMPT, [])):
        pixels, _ = run_ours("img2img", source, "--prompt", prompt, "--strength", 0.5, "--model", model,
                                  *extra, "-o", tmp_path / f"{name}.png")
        images.append(pixels)
    assert np.array_equal(images[0], images[1])
    assert np.abs(images[0] - images[2]).max() > 2 / 255


def test_resume_tells_a_replaced_lora_file_from_the_one_that_made_the_output(tmp_path, setup):
    from safetensors.torch import load_file

    from clirun import run_cli

    model, _, _, lora = setup
    mine = tmp_path / "style.safetensors"
    mine.write_bytes(lora.read_bytes())
    out = tmp_path / "fox.png"
    args = ("txt2img", "--prompt", PROMPT, "--model", model, "-W", SIZE, "-H", SIZE, "--steps", "2",
            "--lora", f"{mine}:0.5", "--seed", "3", "-o", out, "--quiet")
    assert run_cli(*args).exit_code == 0
    with Image.open(out) as image:
        recipe = json.loads(image.info["ldmtool"])
    assert recipe["job"]["options"]["lora_sha256"][0][1] == 0.5
    assert run_cli(*args).exit_code == 0  # the same file: done already
    state = load_file(str(mine))
    save_safetensors({k: v * 2 if k.endswith("up.weight") else v for k, v in state.items()}, mine)
    again = run_cli(*args)
    assert again.exit_code == 1 and "its lora file content differs" in again.output, again.output


def _doubled(path):
    """The LoRA file's contents changed, under the same name."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    save_safetensors({k: v * 2 if k.endswith("up.weight") else v for k, v in state.items()}, path)


@pytest.mark.parametrize("command", ["txt2img", "img2img"])
def test_resume_tells_a_replaced_lora_a_prompt_tag_names_from_the_one_that_made_the_output(tmp_path, setup, command):
    from clirun import run_cli

    model, _, _, lora = setup
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "style.safetensors").write_bytes(lora.read_bytes())
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(source)
    inputs = [source, "--strength", 0.5] if command == "img2img" else ["-W", SIZE, "-H", SIZE]
    args = (command, *inputs, "--prompt", f"{PROMPT} <lora:style:0.5>", "--model", model, "--steps", "2",
            "--lora-dir", folder, "--seed", "3", "-o", tmp_path / "fox.png", "--quiet")
    assert run_cli(*args).exit_code == 0
    assert run_cli(*args).exit_code == 0  # the same file: done already
    _doubled(folder / "style.safetensors")
    again = run_cli(*args)
    assert again.exit_code == 1 and "its lora file content differs" in again.output, again


@pytest.mark.parametrize("option", ["--lora {lora}:inf", "--lora {lora}:nan", "--prompt x<lora:fox-style:inf>"])
def test_a_weight_that_is_not_finite_is_a_usage_error(tmp_path, setup, option):
    from clirun import run_cli

    model, _, _, lora = setup
    flag, value = option.format(lora=lora).split(" ", 1)
    result = run_cli("txt2img", "--prompt", "x", "--model", model, "-W", 64, "-H", 64, "--steps", 1,
                     "--lora-dir", lora.parent, flag, value, "-o", tmp_path / "x.png", "--quiet")
    assert result.exit_code == 2 and "must be a finite number" in result.stderr, result
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("tag", ["<lora:nope:1>", "<lora:fox-style:abc>"])
def test_txt2img_refuses_a_bad_lora_tag_before_any_item_runs(tmp_path, setup, tag):
    from clirun import run_cli

    model, _, _, lora = setup
    lines = tmp_path / "prompts.txt"
    lines.write_text(f"a cat\na fox {tag}\n")
    for given in (["--prompt", f"a fox {tag}"], ["--prompts", lines]):
        result = run_cli("txt2img", *given, "--model", model, "-W", 64, "-H", 64, "--steps", 1, "--n", 2,
                         "--lora-dir", lora.parent, "-o", tmp_path / "out", "--quiet")
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result
        assert "<lora:" in result.stderr


def test_a_lora_for_wider_layers_names_its_file(tmp_path, setup, capsys):
    model, _, _, lora = setup
    wide = tmp_path / "wide.safetensors"
    key = "lora_unet_middle_block_1_proj_in"
    save_safetensors({f"{key}.lora_down.weight": torch.zeros(2, 999, 1, 1),
                      f"{key}.lora_up.weight": torch.zeros(999, 2, 1, 1)}, wide)
    with pytest.raises(SystemExit) as exit:
        main(["txt2img", "--prompt", "x", "--model", str(model), "-W", "64", "-H", "64", "--steps", "1",
              "--lora", str(lora), "--lora", str(wide), "--quiet", "-o", str(tmp_path / "x.png")])
    assert exit.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(wide) in err[0] and "made for another model" in err[0], err
