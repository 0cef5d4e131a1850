"""SDXL from the command line (issue 18) on tiny random single files: txt2img, img2img, inpaint (9-channel
and masked with base), tile-synth and the base -> refiner hand-off (txt2img, img2img, inpaint, and the
Python API), each with the tiled engine off and on.

A tile as large as the canvas must give the untiled pixels exactly; smaller tiles must change them (the tiled
engine ran) and still give a whole, finite image of the right size."""
import json

import numpy as np
import pytest
from PIL import Image

import ldmtool
from clirun import run_cli
from ldmtool.checkpoints.tiny import save_tiny_checkpoint

FAST = ("--steps", "2", "--sampler", "euler", "--cfg", "3", "--seed", "11", "--quiet")
UNTILED, TILED = ("--tile", "0"), ("--tile", "8", "--tile-overlap", "4")  # latent pixels; 8 is the least


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-models")
    paths = {}
    for seed, preset in enumerate(["sdxl-base", "sdxl-refiner", "sdxl-inpainting"]):
        paths[preset] = folder / f"{preset}.safetensors"
        save_tiny_checkpoint(paths[preset], preset, seed=seed, with_config=True)
    return paths


def _run(command, *args):
    result = run_cli(command, *map(str, args), *FAST)
    assert result.exit_code == 0, result.output
    return result


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image).astype(int)


def _recipe(path):
    with Image.open(path) as image:
        return json.loads(image.info["ldmtool"])


def _photo(path, size=(128, 64)):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return path


def _tiling_cases(tmp_path, command, *args, whole=False):
    """Pixels of the same run untiled, with small tiles, and (`whole`) with one tile covering the canvas."""
    cases = (("off", UNTILED), ("on", TILED), *((("whole", ("--tile", "16")),) if whole else ()))
    out = {}
    for name, tiling in cases:
        _run(command, *args, *tiling, "-o", tmp_path / f"{name}.png")
        out[name] = _pixels(tmp_path / f"{name}.png")
    assert np.abs(out["on"] - out["off"]).max() > 0
    if whole:
        assert np.array_equal(out["off"], out["whole"])
    return out


def test_sdxl_txt2img_untiled_and_tiled(tmp_path, models):
    out = _tiling_cases(tmp_path, "txt2img", "--prompt", "a red fox", "--model", models["sdxl-base"],
                        "-W", 128, "-H", 64, whole=True)
    assert out["on"].shape == out["off"].shape == (64, 128, 3)
    params = _recipe(tmp_path / "on.png")["parameters"]
    assert params["model_family"] == "sdxl-base" and (params["width"], params["height"]) == (128, 64)


def test_sdxl_refuses_sizes_off_its_multiple(tmp_path, models):
    result = run_cli("txt2img", "--prompt", "x", "--model", models["sdxl-base"], "-W", 80, "-H", 64, *FAST,
                     "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and "multiple of 32" in result.output


def test_sdxl_inpainting_model_with_txt2img_says_it_takes_an_image_not_that_it_has_no_text_encoder(tmp_path, models):
    """It said 'a sdxl-inpainting model has no text encoder', which it has (and reads for inpaint)."""
    for args in [("--model", models["sdxl-inpainting"]),
                 ("--model", models["sdxl-base"], "--refiner", models["sdxl-inpainting"])]:
        result = run_cli("txt2img", "--prompt", "x", *map(str, args), "-W", "64", "-H", "64", "-o", str(tmp_path / "o"))
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.stderr
        assert "a sdxl-inpainting model takes an image (e.g. a masked image and its mask) beside the prompt, so it " \
               "cannot do txt2img; use it with inpaint" in lines[0]


def test_sdxl_img2img_untiled_and_tiled(tmp_path, models):
    src = _photo(tmp_path / "in.png", size=(120, 48))  # padded to 128 x 64 for the model, cropped back
    out = _tiling_cases(tmp_path, "img2img", src, "--prompt", "a painting", "--strength", 0.6,
                        "--model", models["sdxl-base"])
    assert out["on"].shape == out["off"].shape == (48, 120, 3)
    assert np.abs(out["off"] - _pixels(src)).mean() > 5


@pytest.mark.parametrize(("preset", "kind"), [("sdxl-inpainting", "sd-hybrid"), ("sdxl-base", "masked")])
def test_sdxl_inpaint_untiled_and_tiled_keeps_the_unmasked_pixels(tmp_path, models, preset, kind):
    src = _photo(tmp_path / "img.png")
    mask = np.zeros((64, 128), np.uint8)
    mask[16:40, 20:100] = 255
    Image.fromarray(mask).save(tmp_path / "img_mask.png")
    out = _tiling_cases(tmp_path, "inpaint", src, tmp_path / "img_mask.png", "--prompt", "a window",
                        "--feather", 0, "--model", models[preset])
    before, hole = _pixels(src), mask > 127
    for pixels in out.values():
        assert np.array_equal(pixels[~hole], before[~hole])
        assert np.abs(pixels[hole] - before[hole]).mean() > 5
    assert _recipe(tmp_path / "on.png")["parameters"]["inpaint_kind"] == kind


def test_sdxl_tile_synth_wide_and_seamless(tmp_path, models):
    args = ("--prompt", "moss", "--model", models["sdxl-base"], "--width", 128, "--height", 64)
    _run("tile-synth", *args, *TILED, "-o", tmp_path / "wide.png")
    _run("tile-synth", *args, *UNTILED, "-o", tmp_path / "whole.png")
    wide, whole = _pixels(tmp_path / "wide.png"), _pixels(tmp_path / "whole.png")
    assert wide.shape == whole.shape == (64, 128, 3) and np.abs(wide - whole).max() > 0
    _run("tile-synth", *args, *TILED, "--seamless", "x", "-o", tmp_path / "seamless.png")
    seamless = _pixels(tmp_path / "seamless.png")
    # the wrapped seam is as smooth as the canvas's own neighbouring columns
    seam = np.abs(seamless[:, 0] - seamless[:, -1]).mean()
    inner = np.abs(np.diff(seamless, axis=1)).mean()
    assert seam < 2 * inner


def test_sdxl_refiner_handoff_untiled_and_tiled(tmp_path, models):
    args = ("--prompt", "a red fox", "--model", models["sdxl-base"], "--refiner", models["sdxl-refiner"], "-W", 128,
            "-H", 64)
    out = _tiling_cases(tmp_path, "txt2img", *args, "--refiner-at", 0.6)
    _run("txt2img", "--prompt", "a red fox", "--model", models["sdxl-base"], "-W", 128, "-H", 64, *UNTILED,
         "-o", tmp_path / "base.png")
    assert np.abs(out["off"] - _pixels(tmp_path / "base.png")).max() > 0  # the refiner ran
    params = _recipe(tmp_path / "off.png")["parameters"]
    assert params["refiner"] == "sdxl-refiner.safetensors" and params["refiner_at"] == 0.6


def test_sdxl_refiner_at_out_of_range_is_a_usage_error(tmp_path, models):
    result = run_cli("txt2img", "--prompt", "x", "--model", models["sdxl-base"], "--refiner", models["sdxl-refiner"],
                     "--refiner-at", 1.5, *FAST, "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and "--refiner-at 1.5" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_sdxl_img2img_refiner_handoff_untiled_and_tiled(tmp_path, models):
    src = _photo(tmp_path / "in.png", size=(120, 48))
    out = _tiling_cases(tmp_path, "img2img", src, "--prompt", "a painting", "--strength", 0.6,
                        "--model", models["sdxl-base"], "--refiner", models["sdxl-refiner"], "--refiner-at", 0.7)
    assert out["on"].shape == out["off"].shape == (48, 120, 3)
    assert _recipe(tmp_path / "on.png")["parameters"]["refiner_at"] == 0.7


@pytest.mark.parametrize("preset", ["sdxl-inpainting", "sdxl-base"])
def test_sdxl_inpaint_handoff_keeps_the_unmasked_pixels_and_plans_the_refiner(tmp_path, models, preset):
    """9-channel SDXL inpainting or masked sampling with base, then the refiner by masked sampling: pixels
    outside the mask are the input's, inside they differ from the run without the refiner; the plan event
    counts the refiner's weights in the peak memory."""
    src = _photo(tmp_path / "img.png", size=(64, 32))
    mask = np.zeros((32, 64), np.uint8)
    mask[8:24, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "img_mask.png")
    args = ("inpaint", src, tmp_path / "img_mask.png", "--prompt", "a window", "--feather", 0,
            "--model", models[preset], "--json")
    alone = _run(*args, "-o", tmp_path / "alone.png")
    refined = _run(*args, "--refiner", models["sdxl-refiner"], "--refiner-at", 0.5, "-o", tmp_path / "refined.png")
    before, hole = _pixels(src), mask > 127
    with_refiner, without = _pixels(tmp_path / "refined.png"), _pixels(tmp_path / "alone.png")
    assert np.array_equal(with_refiner[~hole], before[~hole])
    assert np.abs(with_refiner[hole] - without[hole]).max() > 0
    recipe = _recipe(tmp_path / "refined.png")
    assert recipe["parameters"]["refiner"] == "sdxl-refiner.safetensors"
    job = recipe["job"]["options"]  # the refiner file's contents and hand-off point make the job
    assert job["refiner_at"] == 0.5 and len(job["refiner_sha256"]) == 64

    def plan(result):
        return [json.loads(line) for line in result.stdout.splitlines() if '"plan"' in line][-1]

    refiner = ldmtool.load_model(models["sdxl-refiner"])
    weights = sum(t.numel() * t.element_size() for t in [*refiner.parameters(), *refiner.buffers()])
    assert plan(refined)["peak_memory"] - plan(alone)["peak_memory"] == weights
    assert plan(refined)["peak_parts"]["refiner"] == weights and "refiner" not in plan(alone)["peak_parts"]


def _api_run(command, model, refiner, tmp_path):
    """One item through the Python API with an ancestral sampler, handing off at 0.5 when `refiner` is given."""
    options = dict(model=str(model), steps=4, sampler="euler_a", cfg=3.0, seed=3, prompt="a red fox")
    handoff = {} if refiner is None else dict(refiner=str(refiner), refiner_at=0.5)
    if command == "txt2img":
        return ldmtool.txt2img(width=64, height=64, **options, **handoff)[0]
    photo = _photo(tmp_path / "photo.png", size=(64, 64))
    if command == "img2img":
        return ldmtool.img2img(photo, strength=0.9, **options, **handoff)
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    return ldmtool.inpaint(photo, mask, feather=0, **options, **handoff)


@pytest.mark.parametrize("command", ["txt2img", "img2img", "inpaint"])
def test_sdxl_model_handing_off_to_itself_is_the_model_alone_even_with_an_ancestral_sampler(tmp_path, models, command):
    """The hand-off splits one schedule and one noise stream per item: the base as its own refiner walks exactly
    the path the base alone walks, fresh noise included (were the refiner's noise restarted from the item's seed,
    Euler a would differ after the hand-off). Through the Python API, which takes `refiner=` as the CLI does."""
    alone = _api_run(command, models["sdxl-base"], None, tmp_path)
    assert np.array_equal(alone, _api_run(command, models["sdxl-base"], models["sdxl-base"], tmp_path))
    other = _api_run(command, models["sdxl-base"], models["sdxl-refiner"], tmp_path)
    assert np.abs(other.astype(int) - alone.astype(int)).max() > 0  # control: the refiner ran


def test_sdxl_refiner_options_are_checked_before_anything_loads(tmp_path, models):
    src = _photo(tmp_path / "in.png", size=(64, 64))
    result = run_cli("img2img", src, "--refiner-at", 0.5, "--model", models["sdxl-base"], *FAST, "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and "--refiner-at goes with --refiner" in result.output
    result = run_cli("img2img", src, "--scale", 2, "--refiner", models["sdxl-refiner"], "--model", models["sdxl-base"],
                     *FAST, "-o", tmp_path / "y.png")
    assert result.exit_code == 2 and "--refiner: img2img takes it without --scale" in result.output
    assert "Traceback" not in result.output


def _overflowing_vae_file(base, path):
    """The tiny SDXL base with a VAE decoder that overflows in fp16 as the released SDXL VAE does: its first
    conv scaled by 1e6, so the decoder's residual stream carries values near 1e6 (over fp16's 65504, far
    inside fp32's range) until the output GroupNorm scales them back; the fp32 decode stays finite."""
    import shutil

    from safetensors.torch import load_file, save_file

    state = load_file(base)
    for name in ("weight", "bias"):
        state[f"first_stage_model.decoder.conv_in.{name}"] *= 1e6
    save_file(state, path)
    shutil.copy(base.with_suffix(".yaml"), path.with_suffix(".yaml"))


def test_sdxl_fp16_vae_overflow_is_caught_and_recomputed_in_fp32(tmp_path, models):
    """The non-finite guard (`Engine.finite`, the step every task decodes through): an fp16 decode that
    overflows is recomputed on the fp32 twin and gives the fp32 decode's pixels exactly."""
    import torch

    from ldmtool.options import ModelChoice, SamplingChoice
    from ldmtool.pipelines.engine import Engine

    model = tmp_path / "overflow.safetensors"
    _overflowing_vae_file(models["sdxl-base"], model)
    half, full = (Engine(ModelChoice(model=str(model), precision=p), SamplingChoice()).open() for p in ("fp16", "fp32"))
    assert (half.dtype, full.dtype) == (torch.float16, torch.float32)
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))  # small: CPU fp16 convs are slow
    assert torch.isfinite(full.decode(latent)).all()
    assert not torch.isfinite(half.decode(latent)).all()  # the overflow is real: fp16 alone gives a broken image
    pixels = half.finite(lambda engine: engine.decode_pixels(latent), "item")  # raises NonFiniteResult in fp16
    assert np.array_equal(pixels.numpy(), full.decode_pixels(latent).numpy())
    floats = half.finite(lambda engine: engine.decode(latent), "item")  # the float decode img2img / inpaint use
    assert floats.dtype == torch.float32 and torch.equal(floats, full.decode(latent))


def test_sdxl_refiner_reads_the_runs_embeddings_with_its_own_tower(tmp_path, models):
    """An SDXL embedding's `clip_g` vectors reach the refiner's bigG, so a prompt naming it means the same on
    both sides of the hand-off."""
    import torch

    from ldmtool.checkpoints.files import save_safetensors
    from ldmtool.options import ModelChoice, SamplingChoice
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.refiner import Refiner, refiner_engine

    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_safetensors({"clip_l": torch.ones(2, 32), "clip_g": torch.ones(2, 32)}, folder / "fox-style.safetensors")
    choice, sampling = ModelChoice(model=str(models["sdxl-base"]), embeddings_dir=folder), SamplingChoice()
    refiner = Refiner(refiner_engine(choice, sampling, models["sdxl-refiner"]), None)
    refiner.open(Engine(choice, sampling).open(), "txt2img")
    assert refiner.texts.ti_hashes("a fox-style fox").startswith("fox-style: ")
