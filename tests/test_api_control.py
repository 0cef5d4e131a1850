"""`ldmtool.txt2img/img2img/inpaint(..., controlnet=..., control_image=...)` give the CLI's pixels for the same
item seed (tiny model and ControlNet of tests/test_controlnet_hires.py; hints in memory or as files)."""
import numpy as np
import pytest
from PIL import Image

import ldmtool
from test_api import _cli
from test_controlnet import hint_image
from test_controlnet_hires import files  # noqa: F401 - the tiny model and ControlNet files

SAMPLING = {"steps": 2, "sampler": "euler", "cfg": 3.0}
CLI_SAMPLING = ("--steps", 2, "--sampler", "euler", "--cfg", 3)


def test_txt2img_with_a_controlnet_and_a_hint_in_memory_matches_the_cli(tmp_path, files):  # noqa: F811
    model, controlnet, hint = files
    (cli,) = _cli(tmp_path, "txt2img", "--prompt", "a house", "--model", model, *CLI_SAMPLING, "-W", 64, "-H", 64,
                  "--controlnet", f"{controlnet}:2", "--control-image", hint, "--seed", 5)
    with Image.open(hint) as image:
        edges = np.asarray(image.convert("RGB"))
    (api,) = ldmtool.txt2img("a house", model=str(model), **SAMPLING, width=64, height=64,
                             controlnet=f"{controlnet}:2", control_image=edges, seed=5)
    np.testing.assert_array_equal(api, cli)  # the CLI's ControlNet acts (tests/test_controlnet.py), so the API's does


def test_img2img_and_inpaint_with_a_controlnet_match_the_cli(tmp_path, files):  # noqa: F811
    model, controlnet, hint = files
    source = tmp_path / "x.png"
    photo = np.asarray(hint_image(source, 8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    Image.fromarray(mask).save(tmp_path / "x_mask.png")
    common = ("--prompt", "a cat", "--model", model, *CLI_SAMPLING, "--item-seed", 3, "--controlnet", controlnet)
    (cli,) = _cli(tmp_path / "a", "img2img", source, *common, "--control-image", hint)
    api = ldmtool.img2img(photo, prompt="a cat", model=str(model), **SAMPLING, seed=3, controlnet=str(controlnet),
                          control_image=hint)
    np.testing.assert_array_equal(api, cli)
    (cli,) = _cli(tmp_path / "b", "inpaint", source, *common, "--control-image", "inpaint")
    api = ldmtool.inpaint(photo, mask, prompt="a cat", model=str(model), **SAMPLING, seed=3,
                          controlnet=str(controlnet), control_image="inpaint")
    np.testing.assert_array_equal(api, cli)


def test_the_inpaint_hint_is_refused_by_txt2img_in_the_api_too(files):  # noqa: F811
    from ldmtool.errors import UsageError

    model, controlnet, _hint = files
    with pytest.raises(UsageError, match="--control-image inpaint"):
        ldmtool.txt2img("x", model=str(model), controlnet=str(controlnet), control_image="inpaint")
