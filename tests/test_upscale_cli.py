"""Upscale by diffusion: `img2img --scale` and `txt2img --hires` on a tiny random SD 1.x checkpoint."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clirun import run_cli
from ldmtool import load_model
from ldmtool.checkpoints.tiny import save_tiny_checkpoint
from ldmtool.pipelines.engine import Engine, ModelChoice, SamplingChoice
from ldmtool.tiling.vae import PixelSource


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "sd1.safetensors"
    save_tiny_checkpoint(path, "sd1", seed=3, with_config=True)
    return path


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


def _photo(path, size, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return path


SAMPLING = ("--steps", 3, "--sampler", "euler", "--cfg", 3, "--quiet")


def test_hires_equals_txt2img_then_img2img_scale_with_the_item_seed(tmp_path, sd1):
    common = ("--prompt", "a red fox", "--negative", "blurry", "--model", sd1, *SAMPLING)
    size = ("-W", 64, "-H", 64)
    hires = run_cli("txt2img", *common, "--seed", 11, "--hires", 2, "--hires-strength", 0.6, *size, "-o", tmp_path / "h.png")
    first = run_cli("txt2img", *common, "--seed", 11, *size, "-o", tmp_path / "first.png")
    assert hires.exit_code == first.exit_code == 0, hires.output + first.output
    second = run_cli("img2img", tmp_path / "first.png", *common, "--scale", 2, "--strength", 0.6, "--item-seed", 11,
                     "-o", tmp_path / "second.png")
    assert second.exit_code == 0, second.output
    together, chained = _pixels(tmp_path / "h.png"), _pixels(tmp_path / "second.png")
    assert together.shape == chained.shape == (128, 128, 3)
    assert np.array_equal(together, chained)
    assert not np.array_equal(together, cv2.resize(_pixels(tmp_path / "first.png"), (128, 128),
                                                   interpolation=cv2.INTER_LANCZOS4))  # the model did change it


def test_scale_at_strength_zero_is_the_lanczos_upscale_through_the_first_stage(tmp_path, sd1):
    """The Lanczos image (OpenCV), padded 100x80 → 128x128 and cropped back, through the untiled first stage."""
    source = _photo(tmp_path / "in.png", (50, 40))
    result = run_cli("img2img", source, "--prompt", "x", "--model", sd1, *SAMPLING, "--scale", 2, "--strength", 0,
                     "--no-colour-fix", "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    big = cv2.resize(_pixels(source), (100, 80), interpolation=cv2.INTER_LANCZOS4)
    x = torch.from_numpy(big).permute(2, 0, 1)[None].float() / 127.5 - 1
    x = F.pad(x, (0, 28, 0, 48), mode="replicate")
    bundle = load_model(sd1)
    with torch.no_grad():
        expected = (bundle.first_stage.decode(bundle.first_stage.encode(x)) + 1) / 2
    expected = (expected.clamp(0, 1)[0].permute(1, 2, 0).numpy()[:80, :100] * 255 + 0.5).astype(np.uint8)
    out = _pixels(tmp_path / "out.png")
    assert out.shape == (80, 100, 3)
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_tiled_encode_from_uint8_pixels_matches_the_untiled_encode(sd1):
    pixels = np.random.default_rng(1).integers(0, 256, (72, 90, 3), dtype=np.uint8)
    tiled = Engine(ModelChoice(model=str(sd1), device="cpu"), SamplingChoice(vae_tile=4)).open()
    whole = Engine(ModelChoice(model=str(sd1), device="cpu"), SamplingChoice(vae_tile=0)).open()
    assert tiled._vae_tiled(16, 16) and not whole._vae_tiled(16, 16)
    got, expected = tiled.encode_pixels(pixels, 64), whole.encode_pixels(pixels, 64)
    assert got.shape == expected.shape == (1, 4, 16, 16)
    assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max().item())


def test_colour_fix_keeps_the_inputs_colour_and_brightness(tmp_path, sd1):
    source = _photo(tmp_path / "in.png", (32, 32))
    outputs = {}
    for flag in ("--colour-fix", "--no-colour-fix"):
        out = tmp_path / f"{flag}.png"
        result = run_cli("img2img", source, "--prompt", "x", "--model", sd1, *SAMPLING, "--scale", 2,
                         "--strength", 0.8, flag, "--seed", 1, "-o", out)
        assert result.exit_code == 0, result.output
        outputs[flag] = _pixels(out).astype(np.float32)
    reference = cv2.resize(_pixels(source), (64, 64), interpolation=cv2.INTER_LANCZOS4).astype(np.float32)

    def colour_error(image):
        return np.abs(cv2.GaussianBlur(image, (0, 0), 4) - cv2.GaussianBlur(reference, (0, 0), 4)).mean()

    assert colour_error(outputs["--colour-fix"]) < 0.5 * colour_error(outputs["--no-colour-fix"])


def test_pixel_source_crops_equal_replicate_padding_of_the_float_image():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    source = PixelSource(pixels, (8, 12))
    padded = F.pad(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1, (0, 5, 0, 3), mode="replicate")
    assert source.shape == padded.shape
    assert torch.equal(source.crop(0, 8, 0, 12), padded)
    assert torch.equal(source.crop(3, 8, 4, 10), padded[..., 3:8, 4:10])
    assert torch.equal(source.crop(-2, 3, 10, 14), padded[..., [6, 7, 0, 1, 2], :][..., [10, 11, 0, 1]])  # wraps


@pytest.mark.parametrize("args, message", [
    (("--colour-fix",), "--colour-fix/--no-colour-fix"),
])
def test_usage_errors_are_one_line(tmp_path, sd1, args, message):
    source = _photo(tmp_path / "in.png", (32, 32))
    result = run_cli("img2img", source, "--prompt", "x", "--model", sd1, *SAMPLING, *args, "-o", tmp_path / "o.png")
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
