"""`ldmtool superres` end to end on tiny random checkpoints in the original key layout."""
import json

import numpy as np
import pytest
from PIL import Image

from clirun import run_cli
from ldmtool.checkpoints.tiny import save_tiny_checkpoint
from ldmtool.pipelines.superres import native_passes


@pytest.fixture(scope="module")
def bsr(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "bsr.safetensors"
    save_tiny_checkpoint(path, "ldm-bsr-sr", seed=3, with_config=True)
    return path


def _photo(path, size=(12, 8), mode="RGB"):
    rng = np.random.default_rng(0)
    array = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    image = Image.fromarray(array)
    if mode == "RGBA":
        image.putalpha(Image.fromarray((rng.random((size[1], size[0])) * 255).astype(np.uint8)))
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path



def _run(*args):
    """The real CLI entry point in-process (the model cache then serves every test)."""
    return run_cli("superres", *args, "--steps", "2", "--sampler", "euler", "--quiet")


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_output_size_is_scale_times_input(tmp_path, bsr, scale):
    src = _photo(tmp_path / "in.png", size=(10, 6))
    result = _run(src, "-o", tmp_path / "out", "--model", bsr, "--scale", scale, "--seed", 5)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out" / "in.png") as out:
        assert out.size == (10 * scale, 6 * scale)


def test_native_passes_rule():
    assert [native_passes(s) for s in (2, 3, 4, 6, 8, 16)] == [1, 1, 1, 1, 2, 2]


def test_same_seed_same_file_and_metadata(tmp_path, bsr):
    src = _photo(tmp_path / "a.png")
    for name in ("one", "two"):
        result = _run(src, "-o", tmp_path / name, "--model", bsr, "--seed", 11)
        assert result.exit_code == 0, result.output
    first = (tmp_path / "one" / "a.png").read_bytes()
    assert first == (tmp_path / "two" / "a.png").read_bytes()
    with Image.open(tmp_path / "one" / "a.png") as out:
        recipe = json.loads(out.info["ldmtool"])
    assert recipe["command"] == "superres"
    assert recipe["parameters"]["scale"] == 4.0
    assert recipe["parameters"]["model_family"] == "ldm-bsr-sr"


def test_batch_size_does_not_change_results(tmp_path, bsr):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        _photo(folder / f"p{i}.png")
    for name, batch in (("b1", 1), ("b3", 3)):
        result = _run(folder, "-o", tmp_path / name, "--model", bsr, "--seed", 2, "--batch-size", batch)
        assert result.exit_code == 0, result.output
    for i in range(3):
        assert (tmp_path / "b1" / f"p{i}.png").read_bytes() == (tmp_path / "b3" / f"p{i}.png").read_bytes()


def test_alpha_grayscale_and_16bit_inputs(tmp_path, bsr):
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(folder / "alpha.png", mode="RGBA")
    _photo(folder / "gray.png", mode="L")
    sixteen = (np.random.default_rng(1).random((8, 12, 3)) * 65535).astype(np.uint16)
    import cv2

    cv2.imwrite(str(folder / "deep.png"), sixteen)
    result = _run(folder, "-o", tmp_path / "out", "--model", bsr, "--seed", 1)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out" / "alpha.png") as out:
        assert out.mode == "RGBA" and out.size == (48, 32)
    for name in ("gray.png", "deep.png"):
        with Image.open(tmp_path / "out" / name) as out:
            assert out.size == (48, 32)


def test_model_that_cannot_upscale_is_a_usage_error(tmp_path):
    model = tmp_path / "uncond.safetensors"
    save_tiny_checkpoint(model, "ldm-celebahq256", with_config=True)
    src = _photo(tmp_path / "a.png")
    result = _run(src, "-o", tmp_path / "out", "--model", model)
    assert result.exit_code == 2
    assert "cannot do super-resolution" in result.output


def _upscaled(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int), json.loads(image.info["ldmtool"])["parameters"]


def test_temperature_scales_the_starting_noise(tmp_path, bsr):
    """At temperature 0 a deterministic sampler starts from the mean, so the seed no longer matters; the
    value is recorded, and the model config can set the default (the scaling itself: tests/test_guidance.py)."""
    src = _photo(tmp_path / "in.png")
    outputs = {}
    for name, extra in {"t0s1": ["--temperature", "0", "--seed", "1"], "t0s2": ["--temperature", "0", "--seed", "2"],
                        "t1": ["--seed", "1"], "t05": ["--temperature", "0.5", "--seed", "1"]}.items():
        result = _run(src, "-o", tmp_path / name, "--model", bsr, *extra)
        assert result.exit_code == 0, result.output
        outputs[name] = _upscaled(tmp_path / name / "in.png")
    assert np.array_equal(outputs["t0s1"][0], outputs["t0s2"][0])
    assert outputs["t1"][1]["temperature"] == 1.0 and outputs["t05"][1]["temperature"] == 0.5
    assert not np.array_equal(outputs["t05"][0], outputs["t1"][0])

    import yaml

    doc = yaml.safe_load(bsr.with_suffix(".yaml").read_text())
    doc.setdefault("ldmtool", {})["default_temperature"] = 0.0
    (tmp_path / "cold.yaml").write_text(yaml.safe_dump(doc))
    result = _run(src, "-o", tmp_path / "cold", "--model", bsr, "--config", tmp_path / "cold.yaml", "--seed", "2")
    assert result.exit_code == 0, result.output
    cold, params = _upscaled(tmp_path / "cold" / "in.png")
    assert params["temperature"] == 0.0 and np.array_equal(cold, outputs["t0s1"][0])
