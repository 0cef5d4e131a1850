"""`inpaint --control-image inpaint`: a ControlNet's hint made from the input and its mask (A1111's
`inpaint_only`), checked against the recipe diffusers' ControlNet inpaint documentation gives
(`make_inpaint_condition`: the image in [0, 1], pixels whose mask is over 0.5 set to -1), written out here."""
import numpy as np
import pytest
import torch
from PIL import Image

from test_controlnet import hint_image, run_ours
from test_controlnet_hires import files  # noqa: F401 - the tiny model and ControlNet files


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
    ours, recipe = run_ours(*common, "--controlnet", f"{controlnet}:2", "--control-image", "inpaint",
                            "-o", tmp_path / "out.png")
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
