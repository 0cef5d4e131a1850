"""ControlNet hint preprocessors (no model weights) and `ldmtool preprocess` as a batch command with resume."""
import json

import numpy as np
import pytest
from PIL import Image

from ldmtool.cli.app import main
from ldmtool.pipelines.preprocess import PREPROCESSORS, PreprocessSettings, inpaint_hint

S = PreprocessSettings()


def square(size=48, lo=16, hi=32, value=255):
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[lo:hi, lo:hi] = value
    return image


def test_canny_finds_the_outline_of_a_square_and_nothing_else():
    edges = PREPROCESSORS["canny"](square(), S, 0)
    assert edges.shape == (48, 48, 3) and set(np.unique(edges)) == {0, 255}
    ys, xs = np.nonzero(edges[:, :, 0])
    assert ys.min() >= 14 and ys.max() <= 33 and xs.min() >= 14 and xs.max() <= 33  # on the border
    assert not edges[20:28, 20:28].any()  # not inside


def test_scribble_is_white_exactly_where_the_grey_image_is_above_the_threshold():
    image = square(value=200)
    assert np.array_equal(PREPROCESSORS["scribble"](image, PreprocessSettings(threshold=199), 0), square(value=255))
    assert not PREPROCESSORS["threshold"](image, PreprocessSettings(threshold=200), 0).any()


def test_tile_keeps_the_size_and_a_smooth_image():
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    out = PREPROCESSORS["tile"](noisy, PreprocessSettings(down=4), 0)
    assert out.shape == noisy.shape
    assert np.abs(np.diff(out.astype(float), axis=1)).mean() < np.abs(np.diff(noisy.astype(float), axis=1)).mean() / 2
    assert np.array_equal(PREPROCESSORS["tile"](noisy, PreprocessSettings(down=1), 0), noisy)


def test_shuffle_moves_content_by_seed_and_keeps_a_flat_image_flat():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    small = PreprocessSettings(cells=16)
    a, b = PREPROCESSORS["shuffle"](image, small, 1), PREPROCESSORS["shuffle"](image, small, 2)
    assert a.shape == image.shape and not np.array_equal(a, b)
    assert np.array_equal(a, PREPROCESSORS["shuffle"](image, small, 1))
    flat = np.full((32, 32, 3), 77, dtype=np.uint8)
    assert np.array_equal(PREPROCESSORS["shuffle"](flat, small, 3), flat)


def test_inpaint_hint_sets_the_masked_pixels_to_minus_one():
    rgb = np.full((4, 4, 3), 0.5, dtype=np.float32)
    mask = np.zeros((4, 4), dtype=np.float32)
    mask[1, 2] = 1.0
    hint = inpaint_hint(rgb, mask)
    assert (hint[1, 2] == -1).all() and (np.delete(hint.reshape(16, 3), 6, axis=0) == 0.5).all()


def test_preprocess_command_writes_hints_records_settings_and_resumes(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a", "b"):
        Image.fromarray(square()).save(photos / f"{name}.png")
    args = ["preprocess", "canny", str(photos), "-o", str(tmp_path / "hints"), "--low", "50", "--high", "150", "--json"]
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 0
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in first if e["event"] in ("done", "skipped")] == ["done", "done"]
    with Image.open(tmp_path / "hints" / "a.png") as hint:
        recipe = json.loads(hint.info["ldmtool"])
        assert np.array_equal(np.asarray(hint.convert("RGB")), PREPROCESSORS["canny"](square(), PreprocessSettings(50, 150), 0))
    assert recipe["parameters"]["preprocessor"] == "canny"
    assert (recipe["parameters"]["low"], recipe["parameters"]["high"]) == (50, 150)
    with pytest.raises(SystemExit):
        main(args)
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in again if e["event"] in ("done", "skipped")] == ["skipped", "skipped"]


def test_an_unknown_preprocessor_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["preprocess", "depth", str(tmp_path), "-o", str(tmp_path / "out")])
    assert exit.value.code == 2
    assert "preprocess 'depth': choose one of canny" in capsys.readouterr().err
