"""A generated corpus of awkward and broken inputs, run as one batch through the real CLI.

Valid files are processed with the right orientation and colours; each bad one is reported in one line
naming the file; the batch goes on; no traceback; exit code 1. Root reads every file whatever its mode,
so when the tests run as root the command runs without the capabilities that bypass file permissions
(setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), which makes the mode-000 file unreadable.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

SETPRIV = "/usr/bin/setpriv"
NO_DAC_BYPASS = [SETPRIV, "--bounding-set", "-dac_override,-dac_read_search",
                 "--inh-caps", "-dac_override,-dac_read_search"]
PIXEL_LIMIT = 10_000


def _exif_orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def _build_corpus(folder: Path) -> dict[str, str]:
    """Write the corpus; returns {file name: expected outcome ('done' or a phrase of the error)}."""
    expected = {}
    (folder / "empty.png").write_bytes(b"")
    expected["empty.png"] = "the file is empty"

    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "whole.png").unlink()
    expected["truncated.png"] = "truncated"

    (folder / "text.png").write_text("this is a text file wearing a .png name\n")
    expected["text.png"] = "not an image file"

    deep = np.zeros((8, 8, 3), dtype=np.uint16)
    deep[..., 0], deep[..., 1], deep[..., 2] = 0x8000, 0x0101, 0xFFFF
    cv2.imwrite(str(folder / "deep16.png"), deep[:, :, ::-1])
    expected["deep16.png"] = "done"

    Image.new("RGB", (8, 8), (200, 40, 90)).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = "done"

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(folder / "palette.png", transparency=1)
    expected["palette.png"] = "done"

    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)  # with orientation 6 the stored left half is displayed on top
    Image.fromarray(stored).save(folder / "rotated.jpg", exif=_exif_orientation(6), quality=95)
    expected["rotated.jpg"] = "done"

    Image.new("RGB", (1, 1), (1, 2, 3)).save(folder / "tiny.png")
    expected["tiny.png"] = "done"

    Image.new("RGB", (200, 100)).save(folder / "huge.png")
    expected["huge.png"] = f"200x100 is 20000 pixels, over the limit of {PIXEL_LIMIT}"

    Image.new("RGB", (8, 8)).save(folder / "shape.png")
    Image.new("L", (4, 4), 255).save(folder / "shape_mask.png")
    expected["shape.png"] = "the mask is 4x4 but its image is 8x8"

    Image.new("RGB", (4, 4)).save(folder / "locked.png")
    os.chmod(folder / "locked.png", 0)
    expected["locked.png"] = "permission denied"
    return expected


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "in").mkdir()
    yield tmp_path
    os.chmod(tmp_path / "in" / "locked.png", 0o644)  # let pytest clean up


def _run_unprivileged(folder: Path):
    command = [sys.executable, "-m", "ldmtool", "_invert", "in", "--pair-masks", "-o", "out", "--json",
               "--max-pixels", str(PIXEL_LIMIT)]
    if os.geteuid() == 0:
        usable = os.access(SETPRIV, os.X_OK) and subprocess.run(NO_DAC_BYPASS + ["true"]).returncode == 0
        if not usable:
            pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE: no way to make a file unreadable")
        command = NO_DAC_BYPASS + command
    env = dict(os.environ, LDMTOOL_TEST_COMMANDS="1", LDMTOOL_CACHE=str(folder / "cache"), HOME=str(folder))
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, env=env, timeout=120)


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image)


def test_bad_input_corpus(corpus):
    expected = _build_corpus(corpus / "in")
    result = _run_unprivileged(corpus)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout

    events = {e["key"]: e for e in map(json.loads, result.stdout.splitlines()) if e["event"] not in ("summary", "plan")}
    assert set(events) == set(expected)
    failure_lines = [line for line in result.stderr.splitlines() if line.startswith("ldmtool: failed: ")]
    bad = {name: phrase for name, phrase in expected.items() if phrase != "done"}
    assert len(failure_lines) == len(bad)
    for name, phrase in expected.items():
        event = events[name]
        if phrase == "done":
            assert event["event"] == "done", event
            continue
        assert event["event"] == "failed" and f"in/{name}" in event["error"] and phrase in event["error"], event
        assert sum(f"in/{name}" in line and phrase in line for line in failure_lines) == 1

    out = corpus / "out"
    deep = _pixels(out / "deep16.png")  # 1 - v/65535, rounded to 8 bits
    expected_deep = [round((1 - 0x8000 / 65535) * 255), round((1 - 0x0101 / 65535) * 255), 0]
    assert deep.shape == (8, 8, 3) and deep[4, 4].tolist() == expected_deep

    cmyk = _pixels(out / "cmyk.png")
    np.testing.assert_allclose(cmyk[4, 4].astype(int), [55, 215, 165], atol=4)

    palette = _pixels(out / "palette.png")  # inverted colours, transparency kept as alpha
    assert palette.tolist() == [[[0, 255, 255, 255], [255, 255, 0, 0]]]

    rotated = _pixels(out / "rotated.png")
    assert rotated.shape == (40, 20, 3)
    assert rotated[3, 10].tolist()[0] < 40 and rotated[3, 10].tolist()[1] > 215  # red on top, inverted: cyan
    assert rotated[-3, 10].tolist()[0] > 215  # black at the bottom, inverted: white

    assert _pixels(out / "tiny.png").tolist() == [[[254, 253, 252]]]
    assert not (out / "huge.png").exists() and not (out / "locked.png").exists()
