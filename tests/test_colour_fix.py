"""Super-resolution colour fix: the strip-wise in-place version equals the whole-image formula, the result
takes its low frequencies from the bicubic reference and its high frequencies from the model output, memory
does not grow with the image height, and `superres --colour-fix/--no-colour-fix` reaches the pipeline,
defaults to the model config and is recorded in the output metadata."""
from __future__ import annotations

import json
import tracemalloc

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from clirun import run_cli
from ldmtool.checkpoints.tiny import save_tiny_checkpoint
from ldmtool.pipelines.colour_fix import blur_radius, colour_fix_, colour_fix_reference, colour_fix_sigma, gaussian_blur


def _random_pair(seed: int, low_hw=(37, 23), scale=4):
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (*low_hw, 3), dtype=np.uint8)
    out = rng.integers(0, 256, (low_hw[0] * scale, low_hw[1] * scale, 3), dtype=np.uint8)
    return out, low


@pytest.mark.parametrize("strip_rows", [1, 5, 9, 13, 64, 1000])
def test_strips_equal_whole_image_uint8(strip_rows):
    """Random pixels make every row matter; strips shorter than the halo (9 rows at x4) are included."""
    out, low = _random_pair(0)
    expected = colour_fix_reference(out, low)
    fixed = out.copy()
    assert colour_fix_(fixed, low, strip_rows=strip_rows) is fixed  # in place
    assert np.abs(fixed.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_strips_equal_whole_image_float(scale):
    out, low = _random_pair(1, low_hw=(21, 17), scale=scale)
    out, low = (out / 255.0).astype(np.float32), (low / 255.0).astype(np.float32)
    expected = colour_fix_reference(out, low)
    fixed = colour_fix_(out.copy(), low, strip_rows=7)
    np.testing.assert_allclose(fixed, expected, atol=1e-5)


def test_input_range_follows_the_output():
    """The pipeline's first pass gets a float (0..1) input and writes uint8 pixels: same result as uint8 both."""
    out, low = _random_pair(2)
    expected = colour_fix_reference(out, low)
    fixed = colour_fix_(out.copy(), (low / 255.0).astype(np.float32), strip_rows=16)
    assert np.abs(fixed.astype(int) - expected.astype(int)).max() <= 1
    floats = colour_fix_((out / 255.0).astype(np.float32), low)
    assert np.abs(floats * 255 - expected).max() <= 0.51


def test_sigma_scales_with_the_factor():
    assert colour_fix_sigma(4) == 3.0
    assert colour_fix_sigma(2) == 1.5
    assert blur_radius(3.0) == 9


def test_low_frequencies_from_reference_high_from_output():
    """Output = bicubic reference + a colour shift + a fine checkerboard: the fix removes the shift (a low
    frequency) and keeps the checkerboard (above the blur's pass band) exactly."""
    h, w = 24, 20
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    low = np.stack([60 + 4 * yy, 80 + 3 * xx, 120 + 2 * (yy - xx)], axis=-1).astype(np.uint8)
    reference = cv2.resize(low.astype(np.float32), (4 * w, 4 * h), interpolation=cv2.INTER_CUBIC)
    Y, X = np.mgrid[0 : 4 * h, 0 : 4 * w]
    checker = np.where((Y + X) % 2 == 0, 20.0, -20.0)[:, :, None]
    shift = np.array([40.0, -30.0, 25.0])
    output = np.clip(np.rint(reference + shift + checker), 0, 255).astype(np.uint8)

    fixed = colour_fix_(output.copy(), low, strip_rows=32).astype(np.float32)
    np.testing.assert_allclose(fixed.mean(axis=(0, 1)), reference.mean(axis=(0, 1)), atol=0.5)
    assert np.abs(fixed - (reference + checker)).max() <= 1.5  # rounding of output and result
    before = np.abs(output.astype(np.float32) - (reference + checker)).max()
    assert before >= 25


def test_gaussian_blur_kernel_is_truncated_at_the_halo():
    """An impulse spreads exactly `blur_radius` rows: the halo the strips use covers the whole kernel."""
    image = np.zeros((41, 5, 3), np.float32)
    image[20] = 1.0
    rows = np.nonzero(gaussian_blur(image, 3.0)[:, 2, 0] > 0)[0]
    assert (rows.min(), rows.max()) == (20 - 9, 20 + 9)


def test_memory_does_not_grow_with_height():
    """Peak extra memory (numpy and OpenCV buffers go through numpy's allocator) is the strip's, not the image's."""
    peaks = []
    for height in (256, 2048):
        out = np.zeros((height * 4, 512, 3), np.uint8)
        low = np.zeros((height, 128, 3), np.uint8)
        tracemalloc.start()
        colour_fix_(out, low)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] <= 1.1 * peaks[0], peaks
    window = (256 + 2 * 9) * 512 * 3 * 4  # one strip with its halo in float32
    assert peaks[1] <= 5 * window, (peaks, window)


# -- the CLI option -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bsr(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    path = folder / "bsr.safetensors"
    save_tiny_checkpoint(path, "ldm-bsr-sr", seed=3, with_config=True)
    return path


def _config_with(tmp_path, bsr, value):
    doc = yaml.safe_load(bsr.with_suffix(".yaml").read_text())
    doc.setdefault("ldmtool", {})["colour_fix"] = value
    path = tmp_path / f"config-{value}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _upscale(tmp_path, bsr, name, *extra):
    rng = np.random.default_rng(0)
    source = tmp_path / "in.png"
    if not source.exists():
        Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)).save(source)
    out = tmp_path / name
    result = run_cli("superres", source, "-o", out, "--model", bsr, "--steps", 2, "--sampler", "euler",
                     "--seed", 4, "--quiet", *extra)
    assert result.exit_code == 0, result.output
    with Image.open(out / "in.png") as image:
        return np.asarray(image.convert("RGB")), json.loads(image.info["ldmtool"])["parameters"]


def test_cli_colour_fix_round_trip(tmp_path, bsr):
    plain, plain_params = _upscale(tmp_path, bsr, "default")
    off, off_params = _upscale(tmp_path, bsr, "off", "--no-colour-fix")
    on, on_params = _upscale(tmp_path, bsr, "on", "--colour-fix")
    assert (plain_params["colour_fix"], off_params["colour_fix"], on_params["colour_fix"]) == (False, False, True)
    assert np.array_equal(plain, off)  # no config key: off, released checkpoints untouched
    low = np.asarray(Image.open(tmp_path / "in.png").convert("RGB"))
    expected = colour_fix_reference(off, low)  # the fix of the (8-bit rounded) plain output
    assert np.abs(on.astype(int) - expected.astype(int)).max() <= 2
    assert np.abs(on.astype(int) - off.astype(int)).max() > 2  # the fix did change the random model's colours


def test_cli_default_comes_from_the_model_config(tmp_path, bsr):
    config = _config_with(tmp_path, bsr, True)
    by_config, params = _upscale(tmp_path, bsr, "config", "--config", config)
    on, _ = _upscale(tmp_path, bsr, "on", "--colour-fix")
    assert params["colour_fix"] is True
    assert np.array_equal(by_config, on)
    _, params = _upscale(tmp_path, bsr, "override", "--config", config, "--no-colour-fix")
    assert params["colour_fix"] is False


def test_cli_bad_config_value_is_fatal(tmp_path, bsr):
    config = _config_with(tmp_path, bsr, "yes")
    source = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(source)
    result = run_cli("superres", source, "-o", tmp_path / "out", "--model", bsr, "--config", config, "--quiet")
    assert result.exit_code == 3
    assert "ldmtool.colour_fix" in result.output and "true or false" in result.output
