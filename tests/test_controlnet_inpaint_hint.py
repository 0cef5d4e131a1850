"""`inpaint --control-image inpaint`: a ControlNet's hint made from the input and its mask (A1111's
`inpaint_only`), checked against the recipe diffusers' ControlNet inpaint documentation gives
(`make_inpaint_condition`: the image in [0, 1], pixels whose mask is over 0.5 set to -1), written out here, and
with the 9-channel inpainting model against `StableDiffusionControlNetInpaintPipeline`."""
import numpy as np
import pytest
import torch
from PIL import Image

from test_controlnet import hint_image
from test_controlnet_hires import files  # noqa: F401 - the tiny model and ControlNet files
from test_sd_vs_diffusers import run_ours as run_cli_like_diffusers


def make_inpaint_condition(image, image_mask):
    """diffusers' documented recipe for the ControlNet inpaint condition (B, 3, H, W)."""
    image = np.array(image.convert("RGB")).astype(np.float32) / 255.0
    image_mask = np.array(image_mask.convert("L")).astype(np.float32) / 255.0
    image[image_mask > 0.5] = -1.0
    return torch.from_numpy(np.expand_dims(image, 0).transpose(0, 3, 1, 2))


def test_the_hint_given_to_the_controlnet_is_diffusers_inpaint_condition(tmp_path, files, monkeypatch):  # noqa: F811
    from ldmtool.nets.controlnet import ControlNet

    model, controlnet, _hint = files
    source = tmp_path / "x.png"
    hint_image(source, 6)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[8:40, 20:56] = 255
    Image.fromarray(mask).save(tmp_path / "x_mask.png")
    seen = []
    forward = ControlNet.forward
    monkeypatch.setattr(ControlNet, "forward", lambda self, x, hint, *rest, **kw: seen.append(hint.clone())
                        or forward(self, x, hint, *rest, **kw))
    common = ("inpaint", source, "--prompt", "a cat", "--model", model, "--feather", 0)
    ours, recipe = run_cli_like_diffusers(*common, "--controlnet", f"{controlnet}:2", "--control-image", "inpaint",
                                          "-o", tmp_path / "out.png", steps=1)
    with Image.open(source) as image, Image.open(tmp_path / "x_mask.png") as mask_image:
        expected = make_inpaint_condition(image, mask_image)
    assert seen and all(torch.equal(hint, expected.expand_as(hint)) for hint in seen)  # cond and uncond rows
    assert recipe["parameters"]["control_hint_from_mask"] == [controlnet.name]
    with Image.open(source) as image:  # kept pixels are the input's (the ControlNet's effect: test_controlnet.py)
        assert np.array_equal((ours * 255).round()[mask == 0], np.asarray(image, dtype=np.float64)[mask == 0])


def test_the_inpaint_hint_outside_inpaint_is_one_line_and_exit_2(tmp_path, files, capsys):  # noqa: F811
    from ldmtool.cli.app import main

    model, controlnet, _hint = files
    with pytest.raises(SystemExit) as exit:
        main(["txt2img", "--prompt", "x", "--model", str(model), "--controlnet", str(controlnet),
              "--control-image", "inpaint", "-o", str(tmp_path / "o.png"), "--quiet"])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--control-image inpaint: the hint made from the input and its mask" in err


def test_inpainting_model_with_controlnet_inpaint_equals_diffusers_controlnet_inpaint_pipeline(tmp_path):
    """The 9-channel inpainting model (as tests/test_sd_vs_diffusers.py's inpaint test: same mask, same start
    noise; the first stage's posterior made sharp, so diffusers' sampled masked-image latent is ldmtool's mean)
    with a ControlNet given the hint from the mask: inside the mask, diffusers'
    `StableDiffusionControlNetInpaintPipeline`'s image within 1/255."""
    import torch
    import yaml
    from diffusers import StableDiffusionControlNetInpaintPipeline

    from ldmtool import build_model
    from ldmtool.checkpoints.files import save_safetensors
    from ldmtool.checkpoints.tiny import randomise_, tiny_config, tiny_model
    from ldmtool.runtime.seeds import NoiseSource
    from test_controlnet import NET_SCALE, SCALE, diffusers_controlnet
    from test_sd_vs_diffusers import CFG, PROMPT, SIZE, diffusers_pipeline

    model = tmp_path / "sd1-inpainting-tiny.safetensors"
    bundle = randomise_(tiny_model("sd1-inpainting"), seed=7, scale=SCALE)  # test_controlnet.py's scales
    randomise_(bundle.first_stage_model, seed=8, scale=0.3)
    with torch.no_grad():  # logvar -30: the posterior's spread (3e-7) is far below what a pixel shows
        bundle.first_stage_model.quant_conv.weight[4:] = 0
        bundle.first_stage_model.quant_conv.bias[4:] = -30
    save_safetensors(bundle.state_dict(), model)
    model.with_suffix(".yaml").write_text(yaml.safe_dump(bundle.config, sort_keys=False))
    net = randomise_(build_model(tiny_config("controlnet-sd15")), seed=3, scale=NET_SCALE).eval()
    controlnet = tmp_path / "control_v11p_sd15_inpaint.pth"
    torch.save({"control_model." + k: v for k, v in net.state_dict().items()}, controlnet)
    source, mask_file = tmp_path / "in.png", tmp_path / "hole.png"
    hint_image(source, 1)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[12:44, 20:52] = 255
    Image.fromarray(mask).save(mask_file)
    args = ("inpaint", source, mask_file, "--prompt", PROMPT, "--feather", 0, "--model", model)
    ours, recipe = run_cli_like_diffusers(*args, "--controlnet", f"{controlnet}:2", "--control-image", "inpaint",
                                          "-o", tmp_path / "out.png", steps=2)
    base = diffusers_pipeline(bundle, "StableDiffusionInpaintPipeline")
    parts = {k: v for k, v in base.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    pipe = StableDiffusionControlNetInpaintPipeline(
        **parts, controlnet=diffusers_controlnet(net.state_dict(), dict(base.unet.config, in_channels=4)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with Image.open(source) as image, Image.open(mask_file) as hole, torch.no_grad():
        theirs = pipe(PROMPT, image=image, mask_image=hole, control_image=make_inpaint_condition(image, hole),
                      num_inference_steps=2, guidance_scale=CFG, eta=0.0, controlnet_conditioning_scale=2.0,
                      latents=NoiseSource([recipe["seed"]]).randn((4, SIZE // 8, SIZE // 8)),
                      output_type="np").images[0]
    inside = mask > 127
    assert np.abs(ours[inside] - theirs[inside]).max() <= 1 / 255
    plain, _ = run_cli_like_diffusers(*args, "-o", tmp_path / "plain.png", steps=2)
    assert np.abs(ours[inside] - plain[inside]).max() > 5 / 255  # the comparison is sensitive to the ControlNet
