"""`ldmtool inpaint` end to end on tiny random checkpoints of the three model kinds: LDM inpainting_big
(7-channel concat), SD 1.x/2.x inpainting (9-channel hybrid) and masked sampling with any other model."""
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clirun import run_cli
from ldmtool.checkpoints.tiny import save_tiny_checkpoint
from ldmtool.io.discover import discover
from ldmtool.pipelines.engine import Engine, ModelChoice, SamplingChoice
from ldmtool.pipelines.inpaint import InpaintTask
from ldmtool.runtime.runner import RunOptions, run_task

KINDS = {"ldm-inpainting-big": "ldm-concat", "sd1-inpainting": "sd-hybrid", "sd2-inpainting": "sd-hybrid",
         "sd1": "masked", "ldm-celebahq256": "masked"}



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for preset in [*KINDS, "ldm-bsr-sr"]:
        paths[preset] = folder / f"{preset}.safetensors"
        save_tiny_checkpoint(paths[preset], preset, seed=5, with_config=True)
    return paths



def _run(*args):
    return run_cli("inpaint", *args, "--steps", "3", "--sampler", "euler", "--quiet")


def _photo(path, size=(70, 50), seed=0, alpha=None):
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))
    if alpha is not None:
        image.putalpha(Image.fromarray(alpha))
    image.save(path)
    return path


def _mask(path, size=(70, 50), box=(20, 10, 40, 30)):
    array = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = 255
    Image.fromarray(array).save(path)
    return path


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image).astype(int)


def _band(mask, grow, feather):
    """Pixels the output may differ in: the mask grown by a disc of `grow`, then by the feather's square."""
    repaint = (mask > 127).astype(np.uint8)
    if grow:
        repaint = cv2.dilate(repaint, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    if feather:
        repaint = cv2.dilate(repaint, np.ones((2 * feather + 1, 2 * feather + 1), np.uint8))
    return repaint.astype(bool)


@pytest.mark.parametrize("preset", KINDS)
@pytest.mark.parametrize("grow, feather", [(0, 4), (3, 0)])
def test_pixels_outside_the_feathered_band_are_the_input_exactly(tmp_path, models, preset, grow, feather):
    src, mask = _photo(tmp_path / "img.png"), _mask(tmp_path / "hole.png")
    prompt = () if preset.startswith("ldm") else ("--prompt", "a window", "--cfg", 3)
    result = _run(src, mask, *prompt, "--model", models[preset], "-o", tmp_path / "out.png", "--seed", 1,
                  "--grow", grow, "--feather", feather)
    assert result.exit_code == 0, result.output
    out, before = _pixels(tmp_path / "out.png"), _pixels(src)
    band = _band(_pixels(mask), grow, feather)
    assert out.shape == before.shape
    assert np.array_equal(out[~band], before[~band])
    inside = _pixels(mask) > 127
    assert np.abs(out[inside] - before[inside]).mean() > 5  # the hole was repainted
    with Image.open(tmp_path / "out.png") as image:
        params = json.loads(image.info["ldmtool"])["parameters"]
    assert (params["inpaint_kind"], params["grow"], params["feather"]) == (KINDS[preset], grow, feather)


def _unet_inputs(model, image, mask, prompt=""):
    """Run one item through InpaintTask and return the first UNet input (B, C, h, w) and the bundle."""
    engine = Engine(ModelChoice(model=str(model)), SamplingChoice(sampler="euler", steps=1, cfg=1.0))
    bundle = engine.open().bundle
    seen = []
    handle = bundle.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        task = InpaintTask(engine, prompt=prompt, feather=0)
        run_task(task, discover([str(image), str(mask)], pair_masks=True),
                 RunOptions(output=image.parent / "out", seed=1, quiet=True))
    finally:
        handle.remove()
    return seen[0], bundle


def _model_range(path):
    return torch.from_numpy(_pixels(path)).permute(2, 0, 1)[None].float() / 255 * 2 - 1


def test_ldm_inpainting_big_gets_the_reference_concat(tmp_path, models):
    """As latent-diffusion's inpaint script: masked = (1 - m) * image in [0, 1], everything to [-1, 1];
    cond = cat(first-stage encode(masked) (VQ, unquantized), nearest-resized mask in [-1, 1])."""
    src, mask = _photo(tmp_path / "img.png", size=(64, 32)), _mask(tmp_path / "m.png", size=(64, 32), box=(9, 5, 30, 22))
    unet_in, bundle = _unet_inputs(models["ldm-inpainting-big"], src, mask)
    image01 = (_model_range(src) + 1) / 2
    m = torch.from_numpy((_pixels(mask) > 127).astype(np.float32))[None, None]
    with torch.no_grad():
        c = bundle.first_stage.encode(((1 - m) * image01) * 2 - 1)
    cc = F.interpolate(m * 2 - 1, size=c.shape[-2:])
    assert unet_in.shape[1] == 7
    torch.testing.assert_close(unet_in[:, 3:6], c, atol=1e-5, rtol=1e-5)
    assert torch.equal(unet_in[:, 6:], cc)


def test_sd_inpainting_gets_the_reference_concat(tmp_path, models):
    """As the SD scripts and diffusers: masked = image * (m < 0.5) in [-1, 1];
    cat(x, nearest-resized mask in [0, 1], scale_factor * first-stage latent of masked)."""
    src, mask = _photo(tmp_path / "img.png", size=(64, 64)), _mask(tmp_path / "m.png", size=(64, 64), box=(3, 17, 45, 50))
    unet_in, bundle = _unet_inputs(models["sd1-inpainting"], src, mask, prompt="a cat")
    image = _model_range(src)
    m = torch.from_numpy((_pixels(mask) > 127).astype(np.float32))[None, None]
    with torch.no_grad():
        c = bundle.first_stage.encode(image * (m < 0.5)) * bundle.scale_factor
    assert unet_in.shape[1] == 9
    assert torch.equal(unet_in[:, 4:5], F.interpolate(m, size=c.shape[-2:]))
    torch.testing.assert_close(unet_in[:, 5:], c, atol=1e-5, rtol=1e-5)


def test_folder_pairing_same_seed_and_batch_size(tmp_path, models):
    folder, masks = tmp_path / "in", tmp_path / "masks"
    folder.mkdir(), masks.mkdir()
    _photo(folder / "a.png", size=(64, 64), seed=1)
    _mask(folder / "a_mask.png", size=(64, 64))
    _photo(folder / "b.png", size=(64, 64), seed=2)
    _mask(masks / "b.png", size=(64, 64), box=(0, 0, 20, 64))
    _photo(folder / "c.png", size=(48, 40), seed=3)
    _mask(folder / "c_mask.png", size=(48, 40), box=(5, 5, 20, 20))
    for name, batch in (("b1", 1), ("again", 1), ("b3", 3)):
        result = _run(folder, "--masks", masks, "--model", models["sd1-inpainting"], "--prompt", "x",
                      "-o", tmp_path / name, "--seed", 4, "--batch-size", batch)
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "b1").glob("*.png")) == ["a.png", "b.png", "c.png"]
    for stem in "abc":
        assert (tmp_path / "b1" / f"{stem}.png").read_bytes() == (tmp_path / "again" / f"{stem}.png").read_bytes()
        assert np.array_equal(_pixels(tmp_path / "b1" / f"{stem}.png"), _pixels(tmp_path / "b3" / f"{stem}.png"))
    before, after = _pixels(folder / "b.png"), _pixels(tmp_path / "b1" / "b.png")
    assert np.array_equal(before[:, 25:], after[:, 25:]) and not np.array_equal(before[:, :20], after[:, :20])


def test_mask_from_alpha_repaints_the_transparent_pixels(tmp_path, models):
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[8:16, 8:16] = 0
    src = _photo(tmp_path / "img.png", size=(32, 32), alpha=alpha)
    result = _run(src, "--mask-from-alpha", "--feather", 0, "--model", models["ldm-celebahq256"],
                  "-o", tmp_path / "out.png", "--seed", 2)
    assert result.exit_code == 0, result.output
    out, before = _pixels(tmp_path / "out.png"), _pixels(src)
    assert out.shape == (32, 32, 3)  # repainted pixels are opaque: no alpha written
    keep = alpha > 0
    assert np.array_equal(out[keep], before[..., :3][keep]) and not np.array_equal(out[~keep], before[..., :3][~keep])


def test_missing_or_mismatched_masks_fail_their_items_in_one_line(tmp_path, models):
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(folder / "ok.png", size=(32, 32))
    _mask(folder / "ok_mask.png", size=(32, 32))
    _photo(folder / "nomask.png", size=(32, 32))
    _photo(folder / "wrong.png", size=(32, 32))
    _mask(folder / "wrong_mask.png", size=(40, 32))
    result = _run(folder, "--model", models["ldm-inpainting-big"], "-o", tmp_path / "out", "--json", "--seed", 1)
    assert result.exit_code == 1
    events = {e["key"]: e for e in map(json.loads, filter(lambda line: line.startswith("{"), result.output.splitlines()))
              if "key" in e}
    assert events["ok.png"]["event"] == "done"
    assert "nomask.png: no mask found" in events["nomask.png"]["error"]
    assert "the mask is 40x32 but its image is 32x32" in events["wrong.png"]["error"]


def test_models_that_cannot_inpaint_or_take_no_prompt_are_usage_errors(tmp_path, models):
    src, mask = _photo(tmp_path / "img.png", size=(32, 32)), _mask(tmp_path / "m.png", size=(32, 32))
    result = _run(src, mask, "--model", models["ldm-bsr-sr"], "-o", tmp_path / "o1.png")
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "cannot inpaint" in result.output
    result = _run(src, mask, "--prompt", "x", "--model", models["ldm-inpainting-big"], "-o", tmp_path / "o2.png")
    assert result.exit_code == 2 and "takes no prompt" in result.output


def _smooth_photo(path, size=(70, 50)):
    """Left half orange, right half blue, with a little texture: the hole's surroundings know its colour."""
    rng = np.random.default_rng(3)
    pixels = np.zeros((size[1], size[0], 3), np.float32)
    pixels[:, : size[0] // 2] = (230, 140, 40)
    pixels[:, size[0] // 2 :] = (40, 90, 220)
    pixels += rng.normal(0, 6, pixels.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def test_colour_fix_takes_the_hole_colours_from_a_telea_fill(tmp_path, models):
    src, mask = _smooth_photo(tmp_path / "img.png"), _mask(tmp_path / "hole.png", box=(5, 15, 25, 35))
    runs = {}
    for name, flags in {"default": (), "off": ("--no-colour-fix",), "on": ("--colour-fix",)}.items():
        out = tmp_path / f"{name}.png"
        result = _run(src, mask, "--model", models["ldm-inpainting-big"], "-o", out, "--seed", 1, *flags)
        assert result.exit_code == 0, result.output
        with Image.open(out) as image:
            runs[name] = (np.asarray(image).astype(float), json.loads(image.info["ldmtool"])["parameters"]["colour_fix"])
    assert np.array_equal(runs["default"][0], runs["off"][0])  # the tiny config does not ask for it
    assert [runs[k][1] for k in ("default", "off", "on")] == [False, False, True]
    before, inside = _pixels(src), _pixels(mask) > 127
    band = _band(_pixels(mask), 0, 4)
    assert np.array_equal(runs["on"][0][~band], before[~band])  # still exact outside the band
    telea = cv2.inpaint(before.astype(np.uint8), inside.astype(np.uint8) * 255, 5, cv2.INPAINT_TELEA)
    hole_colour = lambda image: image[inside].mean(0)  # noqa: E731
    assert np.abs(hole_colour(runs["on"][0]) - hole_colour(telea)).max() < 12  # the orange of the surroundings
    assert np.abs(hole_colour(runs["off"][0]) - hole_colour(telea)).max() > 40  # random weights paint anything


def test_colour_fix_with_a_mask_over_the_whole_image_does_not_bring_the_image_back(tmp_path, models):
    """Telea has no surroundings to fill a whole-image hole from and returns the image itself: the colour fix
    then put back the colours the mask asked to repaint. It leaves the model's result as it is there."""
    src = _smooth_photo(tmp_path / "img.png")
    mask = tmp_path / "all.png"
    Image.new("L", (70, 50), 255).save(mask)
    runs = {}
    for name, flag in (("on", "--colour-fix"), ("off", "--no-colour-fix")):
        out = tmp_path / f"{name}.png"
        result = _run(src, mask, "--model", models["ldm-inpainting-big"], "-o", out, "--seed", 1, flag)
        assert result.exit_code == 0, result.output
        runs[name] = _pixels(out).astype(float)
    assert np.array_equal(runs["on"], runs["off"])
    assert np.abs(runs["on"] - _pixels(src)).mean() > 20


def test_colour_fix_to_keeps_detail_and_moves_low_frequencies():
    from ldmtool.pipelines.colour_fix import colour_fix_to, gaussian_blur

    yy, xx = np.mgrid[0:64, 0:64]
    detail = np.where((yy + xx) % 2 == 0, 0.1, -0.1).astype(np.float32)[..., None].repeat(3, 2)
    grey = 0.5 + detail
    reference = np.zeros_like(grey) + np.array([0.8, 0.4, 0.2], np.float32)
    fixed = colour_fix_to(grey, reference, sigma=3.0)
    assert np.allclose(gaussian_blur(fixed, 3.0)[8:-8, 8:-8], reference[8:-8, 8:-8], atol=0.01)
    assert np.allclose((fixed - gaussian_blur(fixed, 3.0))[8:-8, 8:-8], detail[8:-8, 8:-8], atol=0.02)


def test_a_mask_with_transparency_is_named_once_since_only_its_colours_count(tmp_path, models):
    """Editors disagree on what a mask's transparency means, so it is not read; a warning says so (a white
    layer under transparent pixels repaints them)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name, alpha in (("a", 255), ("b", 0)):
        _photo(folder / f"{name}.png", size=(32, 32))
        mask = Image.open(_mask(folder / f"{name}_mask.png", size=(32, 32))).convert("RGBA")
        mask.putalpha(alpha)
        mask.save(folder / f"{name}_mask.png")
    result = run_cli("inpaint", folder, "--model", models["ldm-inpainting-big"], "-o", tmp_path / "out", "--seed", 1,
                     "--steps", "2")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "transparency" in line]
    assert warnings == [f"ldmtool: warning: {folder / 'b_mask.png'}: the mask's transparency is not read: its "
                        "colours decide, the ones under transparent pixels too (white repaints); flatten it onto "
                        "black, or give the image's own transparency with --mask-from-alpha"]
