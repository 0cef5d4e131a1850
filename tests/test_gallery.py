"""The output folder's index.html gallery (issue 27, item 4): built from the whole manifest, escaped, atomic,
kept up to date by the runner, and drawn by a real browser."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmtool.errors import FatalError
from ldmtool.io import gallery as gallery_module
from ldmtool.io.gallery import GALLERY_NAME, GalleryUpdater, build_gallery
from ldmtool.io.manifest import MANIFEST_NAME, Manifest
from test_runner_cli import ldmtool

COLOURS = {"red.png": (230, 20, 20), "green.png": (20, 200, 40), "blue.png": (30, 40, 230)}


def done(folder: Path, name: str, *, colour=(90, 90, 90), prompt="a cat", run_id="run-a", manifest=MANIFEST_NAME,
         size=(64, 48)) -> None:
    """An output written and recorded as a run would: the image, then its done record."""
    Image.new("RGB", size, colour).save(folder / os.fsdecode(name) if isinstance(name, bytes) else folder / name)
    output = os.fsdecode(name) if isinstance(name, bytes) else name
    Manifest(folder / manifest).append({"status": "done", "key": output, "output": str(folder / output), "seed": 7,
                                        "params": {"prompt": prompt, "steps": 20}, "run_id": run_id,
                                        "command": "txt2img", "time": "2026-01-01T00:00:00+00:00"})


def test_every_done_item_is_listed_with_its_prompt_and_thumbnail(tmp_path):
    for name, colour in COLOURS.items():
        done(tmp_path, name, colour=colour, prompt=f"a {name[:-4]} square")
    Manifest(tmp_path / MANIFEST_NAME).append({"status": "failed", "key": "bad", "output": str(tmp_path / "bad.png"),
                                               "error": "bad: no"})
    page = build_gallery(tmp_path)
    assert page == tmp_path / GALLERY_NAME
    text = page.read_text()
    for name in COLOURS:
        assert f'href="{name}"' in text and f"a {name[:-4]} square" in text
    assert "bad.png" not in text
    thumbs = sorted((tmp_path / ".thumbs").iterdir())
    assert len(thumbs) == 3 and all(f'src=".thumbs/{t.name}"' in text for t in thumbs)
    assert 'id="filter"' in text and "http" not in text.replace("http-equiv", "")  # no external assets


def test_hostile_prompt_and_non_utf8_name_are_escaped(tmp_path):
    done(tmp_path, "x.png", prompt='<script>alert("x")</script><img src=x onerror=alert(1)> & "quotes"')
    done(tmp_path, b"caf\xe9 <b>.png")
    text = build_gallery(tmp_path).read_text()
    assert text.count("<script") == 1  # the page's own filter script only
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text and "<img src=x" not in text
    assert 'href="caf%E9%20%3Cb%3E.png"' in text and "caf\\xe9 &lt;b&gt;.png" in text


def test_a_16_bit_grey_output_keeps_its_tones_in_the_thumbnail(tmp_path):
    done(tmp_path, "grey16.png")
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")  # mode I;16: Pillow's convert alone clips it to white
    build_gallery(tmp_path)
    [thumb] = (tmp_path / ".thumbs").iterdir()
    with Image.open(thumb) as small:
        assert abs(np.asarray(small.convert("L")).mean() - 127.5) < 4


def test_two_runs_sharing_a_folder_both_appear_whoever_rebuilds_last(tmp_path):
    first = GalleryUpdater(tmp_path, note=print, interval=0)
    second = GalleryUpdater(tmp_path, note=print, interval=0)
    manifest_a, manifest_b = Manifest(tmp_path / MANIFEST_NAME), Manifest(tmp_path / MANIFEST_NAME)
    manifest_a.listeners.append(first.recorded)
    manifest_b.listeners.append(second.recorded)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    manifest_a.append({"status": "done", "output": str(tmp_path / "a.png"), "run_id": "a", "params": {}})
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    manifest_b.append({"status": "done", "output": str(tmp_path / "b.png"), "run_id": "b", "params": {}})
    first.finish()  # the run that knows only a.png rebuilds last: b.png stays
    text = (tmp_path / GALLERY_NAME).read_text()
    assert 'href="a.png"' in text and 'href="b.png"' in text
    done(tmp_path, "c.png", manifest="ldmtool-manifest.shard-2-of-2.jsonl")  # a shard's part counts too
    assert 'href="c.png"' in build_gallery(tmp_path).read_text()


def test_a_rebuild_that_fails_midway_leaves_the_old_page(tmp_path, monkeypatch):
    done(tmp_path, "a.png")
    before = build_gallery(tmp_path).read_bytes()
    done(tmp_path, "b.png")

    def broken(fd):  # the page's bytes are in the temporary file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ldmtool.io.writer.os.fsync", broken)
    with pytest.raises(FatalError):
        build_gallery(tmp_path)
    assert (tmp_path / GALLERY_NAME).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".ldmtool-tmp")]


def test_the_runner_rebuilds_at_most_every_few_seconds_and_at_the_end(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(gallery_module, "build_gallery", lambda folder, manifests: built.append(folder))
    updater = GalleryUpdater(tmp_path, note=print, interval=3600)
    for _ in range(5):
        updater.recorded({"status": "done"})
    updater.recorded({"status": "failed"})
    assert len(built) == 1
    updater.finish()
    assert len(built) == 2


def test_a_run_into_a_folder_writes_the_gallery_and_no_gallery_turns_it_off(tmp_path):
    (tmp_path / "in").mkdir()
    for name, colour in COLOURS.items():
        Image.new("RGB", (32, 32), colour).save(tmp_path / "in" / name)
    result = ldmtool("_invert", "in", "-o", "out", "--seed", 1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "out" / GALLERY_NAME).read_text()
    assert all(f'href="{name}"' in text for name in COLOURS)
    again = ldmtool("_invert", "in", "-o", "out", "--seed", 1, "--no-gallery", "--json", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count('"event": "skipped"') == 3, again.stdout  # same job: resumed
    result = ldmtool("_invert", "in", "-o", "quiet", "--seed", 1, "--no-gallery", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "quiet" / GALLERY_NAME).exists() and not (tmp_path / "quiet" / ".thumbs").exists()
    result = ldmtool("_invert", "in/red.png", "-o", "one/red.png", "--seed", 1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["red.png"]
    result = ldmtool("gallery", "quiet", cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "quiet" / GALLERY_NAME).exists(), result.stderr


def test_a_real_browser_draws_the_thumbnails(tmp_path):
    """Headless chromium screenshots the page; each thumbnail's colour is where its figure is. Fails (never
    skips) without chromium, unless LDMTOOL_SKIP_BROWSER=1: .ci/run installs it."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("LDMTOOL_SKIP_BROWSER") == "1":
            pytest.skip("no chromium and LDMTOOL_SKIP_BROWSER=1")
        pytest.fail("chromium is not installed (apt-get install chromium; .ci/run does); "
                    "set LDMTOOL_SKIP_BROWSER=1 to skip this test on a machine without it")
    folder = tmp_path / "gallery"
    folder.mkdir()
    for name, colour in COLOURS.items():
        done(folder, name, colour=colour, size=(120, 90))
    build_gallery(folder)
    shot = tmp_path / "shot.png"
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                             "--window-size=1000,800", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
                             (folder / GALLERY_NAME).as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (800, 1000)
    assert pixels.std() > 10, "the screenshot is blank"
    # newest first: the figures run blue, green, red from the left, each a 120x90 thumbnail
    centres = []
    for name in ["blue.png", "green.png", "red.png"]:
        mask = (np.abs(pixels - np.array(COLOURS[name])) <= 12).all(axis=2)
        ys, xs = np.nonzero(mask)
        assert mask.sum() >= 0.9 * 120 * 90, f"{name}'s thumbnail is not drawn ({mask.sum()} pixels)"
        assert np.ptp(xs) <= 121 and np.ptp(ys) <= 91, f"{name}'s colour is outside one thumbnail"
        centres.append((xs.mean(), ys.mean()))
    assert centres[0][0] < centres[1][0] < centres[2][0], "thumbnails out of order"
    assert all(abs(y - centres[0][1]) < 2 for _, y in centres) and centres[0][1] < 400, "not in one row at the top"


def test_a_huge_manifest_gives_a_page_of_the_newest_items(tmp_path):
    for index in range(5):
        done(tmp_path, f"{index}.png")
    records, dropped = gallery_module.done_records(tmp_path, limit=2)
    assert [name for name, _ in records] == ["3.png", "4.png"] and dropped
    done(tmp_path, "1.png")  # done again: newest now
    records, _ = gallery_module.done_records(tmp_path, [MANIFEST_NAME], limit=2)
    assert [name for name, _ in records] == ["4.png", "1.png"]


def test_a_page_the_disk_cannot_hold_is_one_note_with_the_reason(tmp_path, monkeypatch):
    """Named once, with the file system's reason; not the output writer's 'cannot write the output; stopping'
    (the run goes on without its gallery)."""
    done(tmp_path, "a.png")
    notes: list[str] = []

    def broken(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ldmtool.io.writer.os.fsync", broken)
    GalleryUpdater(tmp_path, note=notes.append, interval=0).finish()
    assert notes == [f"{tmp_path / GALLERY_NAME}: not written (the disk is full); the outputs are"]
