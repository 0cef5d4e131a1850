"""`ldmtool img2img` end to end on tiny random checkpoints: text families and an unconditional model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from clirun import run_cli
from ldmtool import load_model
from ldmtool.checkpoints.tiny import save_tiny_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for preset in ("sd1", "ldm-text2img256", "ldm-celebahq256", "ldm-inpainting-big"):
        paths[preset] = folder / f"{preset}.safetensors"
        save_tiny_checkpoint(paths[preset], preset, seed=2, with_config=True)
    return paths



def _run(*args):
    return run_cli("img2img", *args, "--steps", "4", "--sampler", "euler", "--quiet")


def _photo(path, size=(70, 50), alpha=False, seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))
    if alpha:
        image.putalpha(Image.fromarray((rng.random((size[1], size[0])) * 255).astype(np.uint8)))
    image.save(path)
    return path


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image).copy()


@pytest.mark.parametrize("preset, extra", [
    ("sd1", ("--prompt", "an oil painting", "--negative", "dull", "--cfg", 4)),
    ("ldm-text2img256", ("--prompt", "an oil painting")),
    ("ldm-celebahq256", ()),
])
def test_any_input_size_keeps_its_size_and_records_the_recipe(tmp_path, models, preset, extra):
    src = _photo(tmp_path / "in.png", size=(70, 50))  # not a multiple of 32 or 64: padded, then cropped
    result = _run(src, *extra, "--strength", 0.5, "--model", models[preset], "-o", tmp_path / "out.png", "--seed", 3)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == (70, 50)
        recipe = json.loads(out.info["ldmtool"])
    params = recipe["parameters"]
    assert recipe["command"] == "img2img"
    assert (params["strength"], params["model_family"], params["size"]) == (0.5, preset, [70, 50])
    assert params["prompt"] == (extra[1] if extra else "")


def test_strength_zero_is_the_first_stage_round_trip(tmp_path, models):
    src = _photo(tmp_path / "in.png", size=(64, 64))
    result = _run(src, "--prompt", "x", "--strength", 0, "--model", models["sd1"], "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    bundle = load_model(models["sd1"])
    x = torch.from_numpy(_pixels(src)).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    with torch.no_grad():
        expected = (bundle.first_stage.decode(bundle.first_stage.encode(x)) + 1) / 2
    expected = (expected.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.abs(_pixels(tmp_path / "out.png").astype(int) - expected).max() <= 1


def test_same_seed_same_files_batch_size_and_alpha(tmp_path, models):
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(folder / "a.png", size=(64, 64), seed=1)
    _photo(folder / "b.png", size=(40, 30), seed=2, alpha=True)
    _photo(folder / "c.png", size=(64, 64), seed=3)
    for name, batch in (("b1", 1), ("again", 1), ("b3", 3)):
        result = _run(folder, "--prompt", "x", "--model", models["sd1"], "-o", tmp_path / name, "--seed", 7,
                      "--batch-size", batch)
        assert result.exit_code == 0, result.output
    for stem in "abc":
        assert (tmp_path / "b1" / f"{stem}.png").read_bytes() == (tmp_path / "again" / f"{stem}.png").read_bytes()
        assert np.array_equal(_pixels(tmp_path / "b1" / f"{stem}.png"), _pixels(tmp_path / "b3" / f"{stem}.png"))
    with Image.open(tmp_path / "b3" / "b.png") as out, Image.open(folder / "b.png") as src:
        assert out.mode == "RGBA" and out.size == (40, 30)
        assert np.array_equal(np.asarray(out)[..., 3], np.asarray(src)[..., 3])  # alpha passed through


def test_models_that_cannot_do_img2img_fail_in_one_line(tmp_path, models):
    src = _photo(tmp_path / "in.png", size=(32, 32))
    result = _run(src, "--model", models["ldm-inpainting-big"], "-o", tmp_path / "o1")
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "cannot do img2img" in result.output
    result = _run(src, "--prompt", "a face", "--model", models["ldm-celebahq256"], "-o", tmp_path / "o2")
    assert result.exit_code == 2
    assert "is unconditional and takes no prompt" in result.output


def test_strength_outside_zero_to_one_is_a_usage_error(tmp_path, models):
    src = _photo(tmp_path / "in.png", size=(32, 32))
    result = _run(src, "--strength", 1.5, "--model", models["sd1"], "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "--strength" in result.output


def test_a_strength_that_runs_no_step_is_warned(tmp_path, models):
    """--steps 1 --strength 0.5 (a one-step distilled model's settings at half strength) runs floor(0.5) = 0
    steps, as diffusers: the image comes back unchanged, and the run says so once and how to fix it."""
    photo = _photo(tmp_path / "p.png")
    result = run_cli("img2img", photo, "-m", models["ldm-text2img256"], "-p", "a fox", "-o", tmp_path / "out.png",
                     "--steps", "1", "--strength", "0.5", "--sampler", "euler")
    assert result.exit_code == 0, result.output
    assert result.output.count("--strength 0.5 of 1 step(s) runs no step") == 1
    assert "use --steps 2 or more" in result.output
    ran = run_cli("img2img", photo, "-m", models["ldm-text2img256"], "-p", "a fox", "-o", tmp_path / "ran.png",
                  "--steps", "2", "--strength", "0.5", "--sampler", "euler")
    assert ran.exit_code == 0 and "runs no step" not in ran.output
