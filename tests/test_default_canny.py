"""The shipped default-canny ControlNet works: `txt2img --controlnet default-canny` puts the shapes of
held-out captioned scenes on their canny edges, far more than the same prompt and seed without control."""
import numpy as np
import pytest
from PIL import Image

from ldmtool.checkpoints.presets import shipped_controlnet, shipped_model
from ldmtool.pipelines.preprocess import PreprocessSettings, canny, edge_agreement
from ldmtool.runtime.seeds import derive_seed
from ldmtool.train.procedural import shape_scene

SCENES = 3
STEPS = "10"

pytestmark = pytest.mark.skipif(shipped_model("default-canny") is None, reason="default-canny is not installed")


def _cli(args):
    from ldmtool.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)


def test_the_shipped_canny_controlnet_is_named_like_a_default():
    assert shipped_controlnet("default-canny") == shipped_model("default-canny").weights
    assert shipped_controlnet("default-txt2img") is None  # a model, not a ControlNet
    assert shipped_controlnet("no-such-name") is None


def test_outputs_follow_the_hint_edges_far_better_than_without_control(tmp_path):
    controlled, plain = [], []
    for i in range(SCENES):
        scene, caption = shape_scene(derive_seed(11, f"canny-check/{i}"), 64)  # not a training scene
        hint = canny(scene, PreprocessSettings(), 0)
        Image.fromarray(hint).save(tmp_path / f"hint{i}.png")
        args = ["txt2img", "--prompt", caption, "--steps", STEPS, "--seed", str(i), "--quiet"]
        _cli([*args, "--controlnet", "default-canny", "--control-image", str(tmp_path / f"hint{i}.png"),
              "-o", str(tmp_path / f"controlled{i}.png")])
        _cli([*args, "-o", str(tmp_path / f"plain{i}.png")])
        for name, scores in (("controlled", controlled), ("plain", plain)):
            output = np.asarray(Image.open(tmp_path / f"{name}{i}.png").convert("RGB"))
            scores.append(edge_agreement(output, hint[..., 0] > 0))
    # measured: 0.78 / 0.71 / 0.87 with control, 0.22 / 0.34 / 0.34 without
    assert all(c > p for c, p in zip(controlled, plain)), (controlled, plain)
    assert np.mean(controlled) > 0.6 and np.mean(controlled) > 2 * np.mean(plain), (controlled, plain)


def test_load_controlnet_by_name_takes_the_heads_its_yaml_records():
    """The Python API: `ldmtool.load_controlnet("default-canny")` is the network the commands run (whose heads
    come from the base model), not one with the released models' default heads."""
    import torch

    import ldmtool
    from ldmtool.addons.controlnet import base_heads

    bundle = ldmtool.load_model("default-txt2img")
    by_name = ldmtool.load_controlnet("default-canny")
    as_run = ldmtool.load_controlnet(shipped_controlnet("default-canny"), heads=base_heads(bundle))
    released_heads = ldmtool.load_controlnet(shipped_controlnet("default-canny"), heads={"num_heads": 8})
    generator = torch.Generator().manual_seed(0)
    x, hint = torch.randn(1, 3, 16, 16, generator=generator), torch.rand(1, 3, 64, 64, generator=generator)
    context, t = torch.randn(1, 4, 64, generator=generator), torch.tensor([500])
    with torch.inference_mode():
        ours, theirs, other = (net(x, hint, t, context)[-1] for net in (by_name, as_run, released_heads))
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, other)


def test_a_controlnet_given_as_the_model_points_to_controlnet_in_one_line(tmp_path):
    from clirun import run_cli

    result = run_cli("txt2img", "--model", "default-canny", "--prompt", "a red circle", "-o", tmp_path / "x.png")
    assert result.exit_code == 3
    assert "--controlnet" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
