"""The Python API (`ldmtool.superres(...)` and the others) gives exactly the CLI's pixels for the same item seed.

Shipped default models, one or two steps, small crops of examples/: each test runs the command through the
real CLI entry point (in-process, so the model cache serves both) and the API call, and compares pixels.
"""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import ldmtool
from clirun import run_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _cli(tmp_path, *args):
    out = tmp_path / "cli"
    result = run_cli(*args, "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    return [np.asarray(Image.open(path)) for path in sorted(out.glob("*.png"))]


def _crop(source, box):
    with Image.open(source) as image:
        return np.asarray(image.crop(box))


def _save(path, array):
    Image.fromarray(array).save(path)
    return path


def test_import_ldmtool_does_not_import_torch():
    code = "import sys, ldmtool; ldmtool.__all__; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_superres_matches_the_cli_and_takes_pillow_images(tmp_path):
    photo = _crop(EXAMPLES / "photos" / "cups.png", (40, 20, 60, 36))
    (cli,) = _cli(tmp_path, "superres", _save(tmp_path / "in.png", photo), "--steps", "1", "--item-seed", "5")
    api = ldmtool.superres(photo, steps=1, seed=5)
    assert api.dtype == np.uint8 and api.shape == (64, 80, 3)
    np.testing.assert_array_equal(api, cli)
    np.testing.assert_array_equal(ldmtool.superres(Image.fromarray(photo), steps=1, seed=5), cli)


def test_superres_sixteen_bit_in_sixteen_bit_out(tmp_path):
    photo = _crop(EXAMPLES / "photos" / "boats.png", (50, 30, 66, 42)).astype(np.uint16) * 257
    photo[::2, ::3] += 100  # values an 8-bit image cannot hold
    cv2.imwrite(str(tmp_path / "deep.png"), np.ascontiguousarray(photo[:, :, ::-1]))  # OpenCV writes BGR
    result = run_cli("superres", tmp_path / "deep.png", "--steps", "1", "--item-seed", "2", "-o", tmp_path / "cli",
                     "--quiet")
    assert result.exit_code == 0, result.output
    cli = cv2.imread(str(tmp_path / "cli" / "deep.png"), cv2.IMREAD_UNCHANGED)[:, :, ::-1]  # 16-bit, as written
    api = ldmtool.superres(photo, steps=1, seed=2)
    assert api.dtype == np.uint16 and cli.dtype == np.uint16
    np.testing.assert_array_equal(api, cli)  # the CLI writes the same 16-bit pixels
    assert np.any(api % 257), "16-bit precision, not 8-bit values scaled up"


def test_img2img_matches_the_cli(tmp_path):
    photo = _crop(EXAMPLES / "photos" / "leaf.png", (10, 10, 42, 42))
    (cli,) = _cli(tmp_path, "img2img", _save(tmp_path / "in.png", photo), "--prompt", "x", "--steps", "2",
                  "--item-seed", "4")
    np.testing.assert_array_equal(ldmtool.img2img(photo, prompt="x", steps=2, seed=4), cli)


def test_inpaint_matches_the_cli(tmp_path):
    box = (32, 12, 80, 52)  # the mask's white part lies inside
    photo, mask = _crop(EXAMPLES / "inpaint" / "coffee.png", box), _crop(EXAMPLES / "inpaint" / "coffee_mask.png", box)
    (tmp_path / "in").mkdir()
    _save(tmp_path / "in" / "x.png", photo)
    _save(tmp_path / "in" / "x_mask.png", mask)
    (cli,) = _cli(tmp_path, "inpaint", tmp_path / "in", "--steps", "2", "--item-seed", "9")
    np.testing.assert_array_equal(ldmtool.inpaint(photo, mask, steps=2, seed=9), cli)
    np.testing.assert_array_equal(ldmtool.inpaint(photo, mask > 127, steps=2, seed=9), cli)


def test_semantic2img_and_tile_synth_match_the_cli(tmp_path):
    labels = _crop(EXAMPLES / "labelmaps" / "landscape.png", (0, 16, 64, 48))
    source = _save(tmp_path / "map.png", labels)
    (cli,) = _cli(tmp_path, "semantic2img", source, "--steps", "1", "--item-seed", "3")
    np.testing.assert_array_equal(ldmtool.semantic2img(labels, steps=1, seed=3), cli)
    np.testing.assert_array_equal(ldmtool.semantic2img(source, steps=1, seed=3), cli)
    (canvas,) = _cli(tmp_path / "tile", "tile-synth", source, "--width", "96", "--height", "32", "--steps", "1",
                     "--item-seed", "6")
    (api,) = ldmtool.tile_synth(labels, width=96, height=32, steps=1, seed=6)
    np.testing.assert_array_equal(api, canvas)


def test_layout2img_matches_the_cli(tmp_path):
    layout = EXAMPLES / "layouts" / "park.json"
    (cli,) = _cli(tmp_path, "layout2img", layout, "--width", "64", "--height", "64", "--steps", "1",
                  "--item-seed", "8")
    np.testing.assert_array_equal(ldmtool.layout2img(layout, width=64, height=64, steps=1, seed=8), cli)
    import json

    document = json.loads(layout.read_text())
    np.testing.assert_array_equal(ldmtool.layout2img(document, width=64, height=64, steps=1, seed=8), cli)


def test_txt2img_and_sample_seed_their_items_as_the_cli(tmp_path):
    cli = _cli(tmp_path / "t", "txt2img", "--prompt", "a red circle", "--n", "2", "--steps", "1", "--seed", "7")
    api = ldmtool.txt2img("a red circle", n=2, steps=1, seed=7)
    for mine, theirs in zip(api, cli, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    cli = _cli(tmp_path / "s", "sample", "--n", "2", "--steps", "1", "--seed", "3")
    for mine, theirs in zip(ldmtool.sample(n=2, steps=1, seed=3), cli, strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_a_uint8_mask_of_zeros_and_ones_is_refused_not_read_as_black():
    """It was read as 0/255 and 1/255, all below the repaint threshold: the inpaint silently changed nothing."""
    from ldmtool.errors import UsageError
    from ldmtool.pipelines.arrays import read_mask_input

    labels = np.zeros((8, 8), np.uint8)
    labels[2:6, 2:6] = 1
    with pytest.raises(UsageError, match="a uint8 array of 0 and 1"):
        read_mask_input(labels, size=(8, 8))
    assert read_mask_input(labels.astype(bool), size=(8, 8)).sum() == 16
    assert read_mask_input(labels * 255, size=(8, 8)).sum() == 16


def test_unknown_options_and_missing_masks_are_errors():
    from ldmtool.errors import UsageError

    photo = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'"):
        ldmtool.superres(photo, stepz=1)
    with pytest.raises(UsageError, match="give a mask"):
        ldmtool.inpaint(photo)
