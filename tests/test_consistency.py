"""Back-projection (superres --consistency): the strip-wise form equals the textbook loop, and the output
becomes consistent with its input (area-downscaling it gives the input back)."""
import cv2
import numpy as np
import pytest

from ldmtool.pipelines.consistency import back_project_, back_project_reference, consistency_error


def _pair(height: int, width: int, scale: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(a drifted ×scale output, its low-res input): truth = smooth texture, output = truth + colour cast
    + a low-frequency wave, so it disagrees with the input where the input has something to say."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    truth = cv2.resize(coarse, (width * scale, height * scale), interpolation=cv2.INTER_CUBIC)
    yy = np.arange(height * scale, dtype=np.float32)[:, None, None]
    drifted = truth + 12.0 + 10.0 * np.sin(yy / 9.0)
    low = cv2.resize(np.clip(truth, 0, 255), (width, height), interpolation=cv2.INTER_AREA)
    return np.clip(np.rint(drifted), 0, 255).astype(np.uint8), np.clip(np.rint(low), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("scale, height, width, strip_rows", [(4, 37, 23, 16), (4, 16, 16, 256), (2, 21, 30, 6)])
def test_strips_equal_the_whole_image_loop(scale, height, width, strip_rows):
    output, low = _pair(height, width, scale)
    expected = back_project_reference(output, low, iterations=3)
    got = back_project_(output.copy(), low, iterations=3, strip_rows=strip_rows)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # float32 summation order only


def test_output_converges_to_consistency_with_the_input():
    output, low = _pair(40, 48, 4)
    errors = [consistency_error(back_project_(output.copy(), low, iterations=k), low) for k in (0, 1, 3, 10)]
    assert errors[0] > 8 and errors == sorted(errors, reverse=True) and errors[-1] < 0.5, errors


def test_float_output_and_uint8_input_share_one_range():
    output, low = _pair(16, 20, 4)
    as_float = output.astype(np.float32) / 255
    fixed = back_project_(as_float, low, iterations=3)
    assert fixed.dtype == np.float32 and 0 <= fixed.min() and fixed.max() <= 1
    reference = back_project_reference(output, low, iterations=3).astype(np.float32) / 255
    assert np.abs(fixed - reference).max() < 1.5 / 255


def test_sizes_that_are_not_a_multiple_are_refused():
    with pytest.raises(ValueError, match="not an integer multiple"):
        back_project_(np.zeros((17, 16, 3), np.uint8), np.zeros((4, 4, 3), np.uint8))


def test_memory_does_not_grow_with_height():
    """Peak extra memory is four low-res arrays plus strips, linear in the input's size, not more."""
    import tracemalloc

    peaks = []
    for height in (256, 2048):
        out = np.zeros((height * 4, 256, 3), np.uint8)
        low = np.zeros((height, 64, 3), np.uint8)
        tracemalloc.start()
        back_project_(out, low)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    low_res = 2048 * 64 * 3 * 4  # one low-res float32 array
    strips = 4 * 256 * 256 * 3 * 4  # a few float32 strips of 256 rows
    assert peaks[1] <= 4 * low_res + strips, (peaks, low_res)


# -- the CLI option -----------------------------------------------------------------------------------


def test_cli_consistency_from_flag_and_model_config(tmp_path):
    import json

    import yaml
    from PIL import Image

    from clirun import run_cli
    from ldmtool.checkpoints.tiny import save_tiny_checkpoint

    model = tmp_path / "bsr.safetensors"
    save_tiny_checkpoint(model, "ldm-bsr-sr", seed=3, with_config=True)
    doc = yaml.safe_load(model.with_suffix(".yaml").read_text())
    doc.setdefault("ldmtool", {})["consistency"] = True
    config = tmp_path / "consistent.yaml"
    config.write_text(yaml.safe_dump(doc))
    low = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    Image.fromarray(low).save(tmp_path / "in.png")

    def upscale(name, *extra):
        result = run_cli("superres", tmp_path / "in.png", "-o", tmp_path / name, "--model", model, "--steps", 2,
                         "--sampler", "euler", "--seed", 4, "--quiet", *extra)
        assert result.exit_code == 0, result.output
        with Image.open(tmp_path / name / "in.png") as image:
            return np.asarray(image.convert("RGB")), json.loads(image.info["ldmtool"])["parameters"]["consistency"]

    (plain, off), (on, flag), (configured, by_config) = upscale("plain"), upscale("on", "--consistency"), \
        upscale("config", "--config", config)
    assert (off, flag, by_config) == (False, True, True)
    np.testing.assert_array_equal(on, configured)
    assert np.abs(on.astype(int) - back_project_reference(plain, low).astype(int)).max() <= 1
    assert consistency_error(on, low) < 0.5 * consistency_error(plain, low)
