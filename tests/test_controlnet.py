"""ControlNet against diffusers 0.42.1 (test-only oracle) on tiny random weights written by the test in every
layout users hold: the v1.1 `.pth` (`control_model.` prefix), the v1.0 whole checkpoint, fp16 safetensors
without prefix, and diffusers' `ControlNetModel`. The diffusers model gets our weights through diffusers' own
single-file converter (`convert_controlnet_checkpoint`), so the key mapping is checked independently.
"""
import numpy as np
import pytest
import torch

import ldmtool
from ldmtool.addons.controlnet import base_heads, load_controlnet
from ldmtool.checkpoints.api import build_model
from ldmtool.checkpoints.files import save_safetensors
from ldmtool.checkpoints.tiny import randomise_, tiny_config, tiny_model

STEPS = 4  # DDIM steps of the whole runs: few, to keep them short; guidance and a schedule all the same
SCALE = 0.1  # UNet weights: the residuals move the output by about half its size (at 0.3, by 0.1%)
NET_SCALE = 0.1  # ControlNet weights: residuals of a few units (0.15 gives hundreds through the deep stack)


def diffusers_unet(bundle):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    config = create_unet_diffusers_config_from_ldm(bundle.config, bundle.state_dict(), image_size=64)
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(bundle.state_dict(), config), strict=True)
    return unet.eval(), config


def diffusers_controlnet(state, unet_config):
    """diffusers' ControlNetModel for the UNet's architecture, loaded with our released-layout weights."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    names = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
             "attention_head_dim", "use_linear_projection")
    config = {k: unet_config[k] for k in names}
    net = ControlNetModel(conditioning_channels=3, **config)
    net.load_state_dict(convert_controlnet_checkpoint(dict(state), config), strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def pair():
    """A tiny SD 1.x bundle, a tiny ControlNet for it (our layout), and diffusers' twins of both."""
    bundle = randomise_(tiny_model("sd1"), seed=7, scale=SCALE)
    randomise_(bundle.first_stage_model, seed=8, scale=0.3)  # a decoder whose pixels follow the latent
    net = randomise_(build_model(tiny_config("controlnet-sd15")), seed=3, scale=NET_SCALE).eval()
    unet, unet_config = diffusers_unet(bundle)
    return bundle, net, unet, unet_config


def run_ours(*args):
    """test_sd_vs_diffusers.run_ours (DDIM, eta 0, its cfg and seed) with STEPS steps; (pixels in [0, 1], recipe)."""
    from test_sd_vs_diffusers import run_ours as run_cli_like_diffusers

    return run_cli_like_diffusers(*args, steps=STEPS)


def inputs(seed=0, batch=1, size=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size // 8, size // 8, generator=g)
    hint = torch.rand(batch, 3, size, size, generator=g)
    context = torch.randn(batch, 77, 32, generator=g)
    return x, hint, torch.tensor([417] * batch), context


def write_layout(layout, state, bundle, folder):
    if layout == "v11-pth":
        path = folder / "control_v11p_sd15_canny.pth"
        torch.save({"control_model." + k: v for k, v in state.items()}, path)
    elif layout == "v10-ckpt":
        path = folder / "control_sd15_canny.ckpt"
        whole = {**bundle.state_dict(), **{"control_model." + k: v for k, v in state.items()}}
        torch.save({"state_dict": whole}, path)
    elif layout == "fp16-safetensors":
        path = folder / "control_canny-fp16.safetensors"
        save_safetensors({k: v.half() for k, v in state.items()}, path)
    else:
        raise ValueError(layout)
    return path


def test_presets_build_the_released_architectures_on_the_meta_device():
    sd15 = ldmtool.build_model("controlnet-sd15", device="meta")
    sd21 = ldmtool.build_model("controlnet-sd21", device="meta")
    keys = set(sd15.state_dict())
    assert {k.split(".")[0] for k in keys} == {"time_embed", "input_hint_block", "input_blocks", "zero_convs",
                                               "middle_block", "middle_block_out"}
    assert len([k for k in keys if k.startswith("zero_convs.") and k.endswith(".weight")]) == 12
    assert sd15.state_dict()["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert sd21.state_dict()["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 1024)
    assert sd21.state_dict()["input_blocks.1.1.proj_in.weight"].ndim == 2  # linear projections in SD 2.x
    assert len(sd15.zero_convs) + 1 == 13  # one residual per UNet skip, one for its middle block
    assert sd15.middle_block_out[0].weight.shape == (1280, 1280, 1, 1)


@pytest.mark.parametrize("layout", ["v11-pth", "v10-ckpt", "fp16-safetensors", "diffusers"])
def test_residuals_and_controlled_unet_equal_diffusers(tmp_path, pair, layout):
    bundle, net, unet, unet_config = pair
    state = net.state_dict()
    if layout == "fp16-safetensors":  # the oracle gets the same fp16-stored weights
        state = {k: v.half().float() for k, v in state.items()}
    theirs_net = diffusers_controlnet(state, unet_config)
    if layout == "diffusers":
        path = tmp_path / "diffusion_pytorch_model.safetensors"
        save_safetensors(theirs_net.state_dict(), path)
    else:
        path = write_layout(layout, state, bundle, tmp_path)
    ours_net = load_controlnet(path, heads=base_heads(bundle))
    assert set(ours_net.state_dict()) == set(state)
    x, hint, t, context = inputs()
    with torch.no_grad():
        ours = ours_net(x, hint, t, context)
        down, mid = theirs_net(x, t, context, controlnet_cond=hint, return_dict=False)
        assert len(ours) == len(down) + 1
        for a, b in zip(ours, [*down, mid]):
            assert a.shape == b.shape and (a - b).abs().max() < 1e-4
        controlled = bundle.unet(x, t, context=context, control=ours)
        reference = unet(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        plain = bundle.unet(x, t, context=context)
    assert (controlled - reference).abs().max() < 1e-4
    assert (controlled - plain).abs().max() > 1e-2  # the residuals matter


def test_a_file_without_controlnet_keys_is_one_clear_error(tmp_path):
    from ldmtool.errors import CheckpointError

    path = tmp_path / "lora.safetensors"
    save_safetensors({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="lora.safetensors: not a ControlNet"):
        load_controlnet(path)


def test_heads_follow_the_released_models_without_a_base(pair, tmp_path):
    """768-wide context (SD 1.x): 8 heads; otherwise 64-channel heads, as the released configs say."""
    from ldmtool.addons.controlnet_keys import controlnet_params

    shapes = {k: tuple(v.shape) for k, v in ldmtool.build_model("controlnet-sd15", device="meta").state_dict().items()}
    params = controlnet_params(shapes)
    preset = ldmtool.build_model("controlnet-sd15", device="meta").config
    for key in ("in_channels", "model_channels", "hint_channels", "num_res_blocks", "channel_mult",
                "attention_resolutions", "context_dim", "num_heads"):
        assert sorted(np.atleast_1d(params[key])) == sorted(np.atleast_1d(preset[key])), key
    shapes21 = {k: tuple(v.shape) for k, v in ldmtool.build_model("controlnet-sd21", device="meta").state_dict().items()}
    params21 = controlnet_params(shapes21)
    assert params21["num_head_channels"] == 64 and params21["use_linear_in_transformer"] and params21["context_dim"] == 1024


# -- whole runs: `ldmtool txt2img --controlnet` against diffusers' ControlNet pipelines

def hint_image(path, seed, size=64):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def files(tmp_path_factory, pair):
    """The tiny model and two ControlNets as files (released v1.1 layout), with hint images."""
    import yaml

    bundle, net, _unet, unet_config = pair
    folder = tmp_path_factory.mktemp("control")
    model = folder / "sd1-tiny.safetensors"
    save_safetensors(bundle.state_dict(), model)
    model.with_suffix(".yaml").write_text(yaml.safe_dump(bundle.config, sort_keys=False))
    second = randomise_(build_model(tiny_config("controlnet-sd15")), seed=11, scale=NET_SCALE).eval()
    nets = []
    for name, each in (("canny", net), ("depth", second)):
        path = folder / f"control_{name}.pth"
        torch.save({"control_model." + k: v for k, v in each.state_dict().items()}, path)
        nets.append((path, diffusers_controlnet(each.state_dict(), unet_config)))
    hints = [(folder / f"hint{i}.png", hint_image(folder / f"hint{i}.png", i)) for i in range(2)]
    return model, nets, hints


def diffusers_run(bundle, nets, images, scales, prompt):
    from diffusers import StableDiffusionControlNetPipeline

    from test_sd_vs_diffusers import CFG, SEED, SIZE, diffusers_pipeline

    base = diffusers_pipeline(bundle)
    parts = {k: v for k, v in base.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    pipe = StableDiffusionControlNetPipeline(**parts, controlnet=nets if len(nets) > 1 else nets[0],
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt, image=images if len(nets) > 1 else images[0], height=SIZE, width=SIZE,
                    num_inference_steps=STEPS, guidance_scale=CFG, eta=0.0,
                    controlnet_conditioning_scale=scales if len(nets) > 1 else scales[0],
                    generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]


PROMPT = "a lighthouse on a cliff"


@pytest.fixture(scope="module")
def plain(tmp_path_factory, files):
    """The run without control (pixels), which control runs are compared with."""
    from test_sd_vs_diffusers import SIZE

    out = tmp_path_factory.mktemp("plain") / "plain.png"
    return run_ours("txt2img", "--prompt", PROMPT, "--model", files[0], "-W", SIZE, "-H", SIZE, "-o", out)[0]


def test_txt2img_with_a_controlnet_equals_diffusers_controlnet_pipeline(tmp_path, pair, files, plain):
    from test_sd_vs_diffusers import SIZE

    bundle = pair[0]
    model, nets, hints = files
    ours, recipe = run_ours("txt2img", "--prompt", PROMPT, "--model", model, "-W", SIZE, "-H", SIZE,
                            "--controlnet", f"{nets[0][0]}:2.5", "--control-image", hints[0][0],
                            "-o", tmp_path / "out.png")
    reference = diffusers_run(bundle, [nets[0][1]], [hints[0][1]], [2.5], PROMPT)
    assert np.abs(ours - reference).max() <= 1 / 255
    assert np.abs(ours - plain).max() > 10 / 255  # the comparison is sensitive to control
    assert recipe["parameters"]["controlnet"] == [f"{nets[0][0].name}:2.5"]
    assert recipe["parameters"]["control_images"] == ["hint0.png"]


def test_two_controlnets_equal_diffusers_multi_controlnet(tmp_path, pair, files):
    from test_sd_vs_diffusers import SIZE

    bundle = pair[0]
    model, nets, hints = files
    ours, _ = run_ours("txt2img", "--prompt", PROMPT, "--model", model, "-W", SIZE, "-H", SIZE,
                       "--controlnet", f"{nets[0][0]}:0.7", "--control-image", hints[0][0],
                       "--controlnet", f"{nets[1][0]}:1.2", "--control-image", hints[1][0], "-o", tmp_path / "two.png")
    reference = diffusers_run(bundle, [n for _, n in nets], [h for _, h in hints], [0.7, 1.2], PROMPT)
    assert np.abs(ours - reference).max() <= 1 / 255


def test_strength_zero_gives_exactly_the_image_without_control(tmp_path, files, plain):
    from test_sd_vs_diffusers import SIZE

    model, nets, hints = files
    common = ("txt2img", "--prompt", PROMPT, "--model", model, "-W", SIZE, "-H", SIZE)
    zero, _ = run_ours(*common, "--controlnet", f"{nets[0][0]}:0", "--control-image", hints[0][0],
                       "-o", tmp_path / "zero.png")
    assert np.array_equal(zero, plain)


def test_tiles_get_the_matching_crop_of_the_hint():
    """A hint with one marked pixel, a canvas of 4x4 tiles: every tile the network sees carries exactly the
    hint's 8x crop of its latent rectangle, so the mark reaches only the tiles over it, at its place there."""
    from ldmtool.addons.controlnet import pack_hint
    from ldmtool.diffusion.cond import Cond
    from ldmtool.tiling.fusion import TileConfig, TiledDenoiser

    h, w = 40, 48  # latent; hint 320 x 384
    hint = torch.zeros(1, 3, 8 * h, 8 * w)
    mark = (8 * 17 + 3, 8 * 29 + 5)
    hint[0, :, mark[0], mark[1]] = 1.0
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    x = torch.stack([rows, cols, rows * 0, cols * 0])[None]  # each latent pixel knows where it is
    seen = []

    def inner(crops, sigma, cond):
        tiles = torch.nn.functional.pixel_shuffle(cond.control, 8)
        for crop, tile_hint in zip(crops, tiles):
            top, left = int(crop[0, 0, 0]), int(crop[1, 0, 0])
            th, tw = crop.shape[-2:]
            assert torch.equal(tile_hint, hint[0, :, 8 * top : 8 * (top + th), 8 * left : 8 * (left + tw)])
            seen.append((top, left, th, tw, tile_hint[0].nonzero().tolist()))
        return crops

    tiled = TiledDenoiser(inner, TileConfig(tile=(16, 16), overlap=4, tile_batch=3))
    tiled(x, torch.ones(1), Cond(control=pack_hint(hint)))
    assert len(seen) > 4
    for top, left, th, tw, marked in seen:
        inside = 8 * top <= mark[0] < 8 * (top + th) and 8 * left <= mark[1] < 8 * (left + tw)
        assert marked == ([[mark[0] - 8 * top, mark[1] - 8 * left]] if inside else [])
    assert any(marked for *_, marked in seen)


def test_img2img_folder_pairs_hints_by_name_and_equals_diffusers_controlnet_img2img(tmp_path, pair, files):
    """Inputs photos/x.png take hints/x.png; the run equals StableDiffusionControlNetImg2ImgPipeline (given our
    image latent, as test_sd_vs_diffusers does for img2img)."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline
    from PIL import Image

    from test_sd_vs_diffusers import CFG, SIZE, diffusers_pipeline

    bundle = pair[0]
    model, nets, hints = files
    (tmp_path / "photos").mkdir()
    (tmp_path / "hints").mkdir()
    source = tmp_path / "photos" / "x.png"
    hint_image(source, 5)
    hint = hint_image(tmp_path / "hints" / "x.png", 6)
    ours, recipe = run_ours("img2img", source, "--prompt", PROMPT, "--strength", 0.6, "--model", model,
                            "--controlnet", f"{nets[0][0]}:2", "--control-image", tmp_path / "hints",
                            "-o", tmp_path / "out.png")
    assert recipe["parameters"]["control_images"] == ["x.png"]
    with Image.open(source) as image:
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    base = diffusers_pipeline(bundle, "StableDiffusionImg2ImgPipeline")
    parts = {k: v for k, v in base.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    pipe = StableDiffusionControlNetImg2ImgPipeline(**parts, controlnet=nets[0][1], safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        latent = bundle.first_stage.encode(pixels) * bundle.scale_factor
        theirs = pipe(PROMPT, image=latent, control_image=hint, strength=0.6, num_inference_steps=STEPS,
                      guidance_scale=CFG, eta=0.0, controlnet_conditioning_scale=2.0, height=SIZE, width=SIZE,
                      generator=torch.Generator().manual_seed(recipe["seed"]), output_type="np").images[0]
    assert np.abs(ours - theirs).max() <= 1 / 255


def test_control_options_without_a_controlnet_are_a_usage_error(tmp_path, files):
    from ldmtool.cli.app import main

    model, _nets, hints = files
    with pytest.raises(SystemExit) as exit:
        main(["txt2img", "--prompt", "x", "--model", str(model), "--control-image", str(hints[0][0]),
              "-o", str(tmp_path / "o.png"), "--quiet"])
    assert exit.value.code == 2


def test_inpaint_with_a_controlnet_follows_the_hint_inside_the_mask_only(tmp_path, files):
    """Masked inpainting with a ControlNet and a hint of another size (resized): pixels outside the mask stay
    the input's, and inside they differ from the run without control."""
    from PIL import Image


    model, nets, hints = files
    source = tmp_path / "x.png"
    hint_image(source, 5)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "x_mask.png")
    hint_image(tmp_path / "big_hint.png", 9, size=128)
    common = ("inpaint", source, "--prompt", PROMPT, "--model", model, "--feather", 0)
    ours, recipe = run_ours(*common, "--controlnet", f"{nets[0][0]}:2", "--control-image", tmp_path / "big_hint.png",
                            "-o", tmp_path / "out.png")
    plain, _ = run_ours(*common, "-o", tmp_path / "plain.png")
    with Image.open(source) as image:
        original = np.asarray(image).astype(np.float64) / 255
    outside = mask == 0
    assert np.array_equal(ours[outside], original[outside])
    assert np.abs(ours - plain)[~outside].max() > 5 / 255
    assert recipe["parameters"]["control_images"] == ["big_hint.png"]


def test_a_hint_of_another_size_is_resized_and_said_once(tmp_path):
    from ldmtool.options import ControlInputs
    from ldmtool.pipelines.control import ControlRun

    hint_image(tmp_path / "hint.png", 1, size=96)
    (tmp_path / "net.safetensors").write_bytes(b"")
    run = ControlRun(ControlInputs(controlnet=[str(tmp_path / "net.safetensors")],
                                   control_image=[tmp_path / "hint.png"]))
    run.validate()
    for _ in range(3):
        (path, pixels), = run.hints(None, (64, 48))
        assert pixels.shape == (48, 64, 3) and path.name == "hint.png"
    assert run.notes == ["control hint hint.png is 96x96; resized to 64x48"]


def test_control_is_more_important_weights_residuals_and_spares_the_unconditional_rows(pair):
    """A1111's soft mode: residual i of n scaled by 0.825 ** (n - 1 - i), and guidance's unconditional rows
    (control_scale 0) run the UNet without control; oracle: diffusers' UNet given the weighted residuals."""
    from ldmtool.addons.controlnet import ActiveControl, ControlledNetwork, pack_hint

    bundle, net, unet, unet_config = pair
    theirs_net = diffusers_controlnet(net.state_dict(), unet_config)
    x, hint, t, context = inputs(batch=2)
    soft = ControlledNetwork(bundle.unet, [ActiveControl(net, 1.5, lambda t: True, 3, soft=True)])
    with torch.no_grad():
        ours = soft(x, t, context=context, control=pack_hint(hint), control_scale=torch.tensor([[1.0], [0.0]]))
        down, mid = theirs_net(x[:1], t[:1], context[:1], controlnet_cond=hint[:1], return_dict=False)
        n = len(down) + 1
        weights = [1.5 * 0.825 ** (n - 1 - i) for i in range(n)]
        weighted = [r * w for r, w in zip([*down, mid], weights)]
        reference = unet(x[:1], t[:1], context[:1], down_block_additional_residuals=weighted[:-1],
                         mid_block_additional_residual=weighted[-1]).sample
        uncontrolled = unet(x[1:], t[1:], context[1:]).sample
    assert (ours[:1] - reference).abs().max() < 1e-4
    assert (ours[1:] - uncontrolled).abs().max() < 1e-4


@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.3, 1.0), (0.0, 0.55), (0.2, 0.7)])
def test_control_window_acts_in_the_steps_diffusers_keeps(start, end):
    """--control-start/--control-end act at step i of n unless i/n < start or (i+1)/n > end, as diffusers'
    control_guidance_start/end (its `controlnet_keep`); sampler calls at the steps' timesteps."""
    from ldmtool.addons.controlnet import step_window

    timesteps = [901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]
    acts = step_window(timesteps, start, end)
    n = len(timesteps)
    keep = [not (i / n < start or (i + 1) / n > end) for i in range(n)]
    assert [acts(torch.tensor([t])) for t in timesteps] == keep


def test_img2img_scale_with_a_controlnet_uses_the_upscaled_input_as_the_hint(tmp_path, files):
    """ControlNet tile: `img2img --scale 2 --controlnet tile.pth` equals img2img of the Lanczos-upscaled image
    with that same image as --control-image (same key, so the same seed; no colour fix)."""
    from PIL import Image

    from ldmtool.pipelines.upscale import upscaled

    model, nets, _hints = files
    (tmp_path / "small").mkdir()
    (tmp_path / "big").mkdir()
    hint_image(tmp_path / "small" / "x.png", 4, size=32)
    with Image.open(tmp_path / "small" / "x.png") as image:
        big = upscaled(np.asarray(image.convert("RGB")), 2.0)
    Image.fromarray(big).save(tmp_path / "big" / "x.png")
    common = ("--prompt", PROMPT, "--model", model, "--strength", 0.7, "--controlnet", f"{nets[0][0]}:2")
    tiled, _ = run_ours("img2img", tmp_path / "small", *common, "--scale", 2, "--no-colour-fix", "-o", tmp_path / "a.png")
    direct, _ = run_ours("img2img", tmp_path / "big", *common, "--control-image", tmp_path / "big" / "x.png",
                         "-o", tmp_path / "b.png")
    assert tiled.shape == direct.shape == (64, 64, 3)
    assert np.abs(tiled - direct).max() <= 1 / 255
    plain, _ = run_ours("img2img", tmp_path / "small", *common[:6], "--scale", 2, "--no-colour-fix", "-o", tmp_path / "c.png")
    assert np.abs(tiled - plain).max() > 5 / 255  # the control acted


def test_a_controlnet_for_another_model_is_one_line_and_exit_3(tmp_path, files, capsys):
    from ldmtool.cli.app import main

    model, _nets, hints = files
    config = tiny_config("controlnet-sd15")
    config["model"]["params"]["control_stage_config"]["params"]["model_channels"] = 64
    path = tmp_path / "control_other.pth"
    torch.save({"control_model." + k: v for k, v in build_model(config).state_dict().items()}, path)
    with pytest.raises(SystemExit) as exit:
        main(["txt2img", "--prompt", "x", "--model", str(model), "-W", "64", "-H", "64", "--steps", "1",
              "--controlnet", str(path), "--control-image", str(hints[0][0]), "-o", str(tmp_path / "o.png")])
    assert exit.value.code == 3
    err = capsys.readouterr().err
    assert "control_other.pth: a ControlNet for another model (model_channels 64; the model's is 32)" in err
    assert "Traceback" not in err


def test_replay_redoes_a_controlled_output_from_its_recipe(tmp_path, files, capsys):
    from ldmtool.cli.app import main

    model, nets, hints = files
    out = tmp_path / "out"
    run_ours("txt2img", "--prompt", PROMPT, "--model", model, "-W", 64, "-H", 64, "--controlnet", f"{nets[0][0]}:1.5",
             "--control-image", hints[0][0], "-o", out / "a.png")
    with pytest.raises(SystemExit) as exit:
        main(["replay", str(out / "a.png"), "-o", str(tmp_path / "again.png")])
    assert exit.value.code == 0
    assert "again.png: identical pixels" in capsys.readouterr().err


def test_resume_tells_a_redone_hint_in_a_folder_from_the_one_that_made_the_output(tmp_path, files):
    from clirun import run_cli

    model, nets, _hints = files
    (tmp_path / "photos").mkdir()
    (tmp_path / "hints").mkdir()
    hint_image(tmp_path / "photos" / "x.png", 5)
    hint_image(tmp_path / "hints" / "x.png", 6)
    args = ("img2img", tmp_path / "photos", "--prompt", PROMPT, "--strength", 0.5, "--steps", 2, "--seed", 1,
            "--model", model, "--controlnet", nets[0][0], "--control-image", tmp_path / "hints",
            "-o", tmp_path / "out", "--quiet")
    assert run_cli(*args).exit_code == 0
    assert run_cli(*args).exit_code == 0  # the same hint: done already
    hint_image(tmp_path / "hints" / "x.png", 7)
    again = run_cli(*args)
    assert again.exit_code == 1 and "its control image file content differs" in again.output, again


def test_resume_tells_a_replaced_hint_file_or_controlnet_file_from_the_ones_that_made_the_output(tmp_path, files):
    """The run's identity was taken before the ControlNet options were parsed, so it held no hashes at all
    ("controlnet_sha256": []): a hint file or ControlNet file replaced under the same name was skipped as done."""
    import shutil

    from clirun import run_cli

    model, nets, _hints = files
    controlnet, hint = tmp_path / "control.pth", tmp_path / "hint.png"
    shutil.copy(nets[0][0], controlnet)
    hint_image(hint, 6)
    args = ("txt2img", "--prompt", PROMPT, "-W", 64, "-H", 64, "--steps", 1, "--seed", 1, "--model", model,
            "--controlnet", controlnet, "--control-image", hint, "-o", tmp_path / "out", "--quiet")
    assert run_cli(*args).exit_code == 0
    assert run_cli(*args).exit_code == 0  # the same files: done already
    hint_image(hint, 7)
    again = run_cli(*args)
    assert again.exit_code == 1 and "its control image file content differs" in again.output, again
    hint_image(hint, 6)
    shutil.copy(nets[1][0], controlnet)
    again = run_cli(*args)
    assert again.exit_code == 1 and "its controlnet file content differs" in again.output, again


def test_a_negative_strength_is_taken_as_diffusers_takes_it_and_said_once(tmp_path):
    """`--controlnet FILE:-1` (or `--adapter FILE:-1`) was taken without a word; diffusers multiplies the
    residuals by a negative conditioning scale too, so it stays allowed, with a note."""
    from ldmtool.options import ControlInputs
    from ldmtool.pipelines.control import ControlRun

    hint_image(tmp_path / "hint.png", 1, size=64)
    for name in ("net", "adapter"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    net, adapter = (f"{tmp_path / name}.safetensors:-0.5" for name in ("net", "adapter"))
    run = ControlRun(ControlInputs(controlnet=[net], adapter=[adapter], control_image=[tmp_path / "hint.png"]))
    run.validate()
    run.validate()
    assert [u.strength for u in (*run.units, *run.adapters)] == [-0.5, -0.5]
    assert run.notes == [f"--controlnet {net}: a negative strength subtracts its residuals (pushes away from the hint; "
                         "0 turns it off)",
                         f"--adapter {adapter}: a negative strength subtracts its residuals (pushes away from the "
                         "hint; 0 turns it off)"]


@pytest.mark.parametrize("case", ["strength inf", "strength nan", "hint folder", "hint not an image"])
def test_hints_and_strengths_every_item_would_fail_on_are_usage_errors(tmp_path, files, case):
    from clirun import run_cli

    model, nets, hints = files
    (tmp_path / "hints").mkdir()
    (tmp_path / "bad.png").write_text("not an image")
    unit, image = {"strength inf": (f"{nets[0][0]}:inf", hints[0][0]),
                   "strength nan": (f"{nets[0][0]}:nan", hints[0][0]),
                   "hint folder": (nets[0][0], tmp_path / "hints"),
                   "hint not an image": (nets[0][0], tmp_path / "bad.png")}[case]
    result = run_cli("txt2img", "--prompt", "x", "--model", model, "-W", 64, "-H", 64, "--steps", 1, "--n", 2,
                     "--controlnet", unit, "--control-image", image, "-o", tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result
    assert not (tmp_path / "out").exists()
