"""SIGKILL part-way through a 30-item batch, at several moments: the output folder never holds a partial
or unreadable image, and a final rerun writes exactly the missing items and exits 0."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from ldmtool.io.gallery import GALLERY_NAME, THUMBS
from ldmtool.io.manifest import MANIFEST_NAME, read_manifest
from ldmtool.io.writer import TEMP_SUFFIX
from ldmtool.runtime.claims import CLAIM_PREFIX, is_claim_name

ITEMS = 30
SIZE = 192  # big enough that encoding and writing take a measurable slice of each item


def _command(tmp_path):
    env = dict(os.environ, LDMTOOL_TEST_COMMANDS="1", LDMTOOL_TEST_SLEEP="0.03")
    args = [sys.executable, "-m", "ldmtool", "_invert", "in", "-o", "out", "--seed", "11", "--json", "--quiet"]
    return args, env


def _make_inputs(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i in range(ITEMS):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{i:02d}.png")


def _images(out):
    return sorted(p.name for p in out.glob("*.png"))


def _check_thumbs(folder):
    for path in folder.iterdir():
        if path.suffix == ".jpg":
            with Image.open(path) as image:
                image.load()
        else:
            assert path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX), path


def _check_folder(out):
    """Every file is a complete image, the manifest, or a hidden temporary or claim file of the killed process."""
    for path in out.iterdir():
        if path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
                assert image.size == (SIZE, SIZE), path
        elif path.name == GALLERY_NAME:  # the gallery is replaced whole, never cut short
            assert path.read_text().endswith("</html>\n"), path
        elif path.name == THUMBS:
            _check_thumbs(path)
        else:
            # A claim, or the private record of one a run was making when it was killed (the rerun removes both).
            assert path.name == MANIFEST_NAME or (path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)) \
                or is_claim_name(path.name) or (path.name.startswith(CLAIM_PREFIX) and path.name.endswith(".new")), path


def _kill_after(tmp_path, outputs_before_kill, extra_delay):
    args, env = _command(tmp_path)
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "out"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and len(_images(out)) >= outputs_before_kill:
            break
        time.sleep(0.005)
    time.sleep(extra_delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_sigkill_never_leaves_a_broken_image_and_rerun_completes(tmp_path):
    _make_inputs(tmp_path)
    out = tmp_path / "out"
    rng = random.Random(1)
    for target in (0, 4, 11, 19, 26):
        _kill_after(tmp_path, target, rng.uniform(0.0, 0.04))
        _check_folder(out)
    written_before = set(_images(out))
    assert len(written_before) < ITEMS, "the kills came too late to test anything"

    args, env = _command(tmp_path)
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    done = {os.path.basename(e["output"]) for e in events if e["event"] == "done"}
    skipped = {os.path.basename(e["output"]) for e in events if e["event"] == "skipped"}
    assert skipped == written_before
    assert done == {f"{i:02d}.png" for i in range(ITEMS)} - written_before
    assert len(_images(out)) == ITEMS
    assert not list(out.glob(f".*{TEMP_SUFFIX}")), "stale temporary files were not cleaned up"
    assert not list(out.glob(f"{CLAIM_PREFIX}*")), "stale claims were not cleaned up"
    _check_folder(out)
    for i in range(ITEMS):  # every output is the full, correct image
        source = np.asarray(Image.open(tmp_path / "in" / f"{i:02d}.png"))
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{i:02d}.png")), 255 - source)
    records = list(read_manifest(out / MANIFEST_NAME))
    assert {r["key"] for r in records if r["status"] == "done"} >= {f"{i:02d}.png" for i in range(ITEMS)} - written_before
