"""ControlNet in the hires fix (`txt2img --hires`) and in upscale by diffusion with a user's hint
(`img2img --scale --control-image`): the hint file resized to the upscaled size, as A1111's hires pass does."""
import numpy as np
import pytest
import torch

from clirun import run_cli
from ldmtool import build_model
from ldmtool.checkpoints.files import save_safetensors
from ldmtool.checkpoints.tiny import randomise_, tiny_config, tiny_model
from test_controlnet import NET_SCALE, SCALE, hint_image
from test_upscale_cli import _pixels

SAMPLING = ("--steps", 2, "--sampler", "euler", "--cfg", 3, "--quiet")  # the hires pass at 0.6 runs one step


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import yaml

    folder = tmp_path_factory.mktemp("hires")
    bundle = randomise_(tiny_model("sd1"), seed=7, scale=SCALE)
    randomise_(bundle.first_stage_model, seed=8, scale=0.3)  # a decoder whose pixels follow the latent
    model = folder / "sd1-tiny.safetensors"
    save_safetensors(bundle.state_dict(), model)
    model.with_suffix(".yaml").write_text(yaml.safe_dump(bundle.config, sort_keys=False))
    net = randomise_(build_model(tiny_config("controlnet-sd15")), seed=3, scale=NET_SCALE).eval()
    controlnet = folder / "control_v11p_sd15_canny.pth"
    torch.save({"control_model." + k: v for k, v in net.state_dict().items()}, controlnet)
    hint_image(folder / "edges.png", 5)
    return model, controlnet, folder / "edges.png"


def test_hires_with_a_controlnet_equals_txt2img_then_img2img_scale_with_the_same_hint(tmp_path, files):
    model, controlnet, hint = files
    common = ("--prompt", "a red fox", "--model", model, *SAMPLING, "--controlnet", f"{controlnet}:2",
              "--control-image", hint)
    size = ("-W", 64, "-H", 64)
    hires = run_cli("txt2img", *common, "--seed", 11, "--hires", 2, "--hires-strength", 0.6, "--no-hires-colour-fix",
                    *size, "-o", tmp_path / "h.png")
    first = run_cli("txt2img", *common, "--seed", 11, *size, "-o", tmp_path / "first.png")
    assert hires.exit_code == first.exit_code == 0, hires.output + first.output
    assert "resized" not in hires.output  # the hint is made for the first pass; its upscale is not news
    second = run_cli("img2img", tmp_path / "first.png", *common, "--scale", 2, "--strength", 0.6, "--no-colour-fix",
                     "--item-seed", 11, "-o", tmp_path / "second.png")
    assert second.exit_code == 0, second.output
    together, chained = _pixels(tmp_path / "h.png"), _pixels(tmp_path / "second.png")
    assert together.shape == chained.shape == (128, 128, 3)
    assert np.array_equal(together, chained)
    # The second pass is controlled: the same chain with the ControlNet on the first pass only differs.
    uncontrolled = run_cli("img2img", tmp_path / "first.png", *common[:-4], "--scale", 2, "--strength", 0.6,
                           "--no-colour-fix", "--item-seed", 11, "-o", tmp_path / "plain.png")
    assert uncontrolled.exit_code == 0, uncontrolled.output
    assert np.abs(together.astype(int) - _pixels(tmp_path / "plain.png")).max() > 5
