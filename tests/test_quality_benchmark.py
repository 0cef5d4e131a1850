"""benchmarks/quality.py (issue 7): its metric helpers give known answers, and every task runs end to end
on tiny random checkpoints (the five runs start together as subprocesses and overlap) and prints valid
records; a task without a model is reported as skipped."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from ldmtool.checkpoints.tiny import save_tiny_checkpoint
from ldmtool.train.procedural import CLASSES, Box, semantic_sample, shape_scene

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
quality = importlib.import_module("quality")


# -- metrics, against known answers ----------------------------------------------------------------------


def _noise(size=128, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_psnr_known_values():
    image = _noise()
    assert quality.psnr(image, image) == quality.PSNR_CAP
    shifted = image.astype(int)
    shifted[image < 255] += 1
    shifted[image == 255] -= 1
    assert quality.psnr(image, shifted.astype(np.uint8)) == pytest.approx(20 * np.log10(255), abs=1e-9)
    mask = np.zeros(image.shape[:2], bool)
    mask[:10] = True
    damaged = image.copy()
    damaged[20:] = 0  # outside the mask: does not count
    assert quality.psnr(image, damaged, mask) == quality.PSNR_CAP


def test_ssim_and_masked_mae():
    image = _noise()
    assert quality.ssim(image, image) == pytest.approx(1.0)
    mask = (image <= 245).all(axis=2)
    other = image.copy()
    other[mask] += 10
    other[~mask] = 0  # outside the mask: does not count
    assert quality.masked_mae(image, other, mask) == pytest.approx(10.0)


def test_high_frequency_ratio():
    sharp = _noise(128)
    assert quality.high_frequency_ratio(sharp, sharp) == pytest.approx(1.0)
    assert quality.high_frequency_energy(np.full((64, 64, 3), 90, np.uint8)) == pytest.approx(0.0, abs=1e-6)
    low = cv2.resize(sharp, (32, 32), interpolation=cv2.INTER_AREA)
    bicubic = cv2.resize(low, (128, 128), interpolation=cv2.INTER_CUBIC)
    assert quality.high_frequency_ratio(sharp, bicubic) < 0.2  # above the low-res Nyquist, bicubic has little


def test_telea_fills_a_constant_image():
    """Nearly exactly: OpenCV's Telea adds its gradient term, measured at up to 3 levels on a flat image."""
    image = np.full((64, 64, 3), (120, 60, 200), np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 10:50] = True
    damaged = image.copy()
    damaged[mask] = 0
    filled = quality.telea(damaged, mask)
    assert np.array_equal(filled[~mask], image[~mask])
    assert quality.masked_mae(image, filled, mask) < 1.5
    assert np.abs(filled.astype(int) - image).max() <= 3


def test_outside_band_leaves_the_feather_out():
    mask = np.zeros((40, 40), bool)
    mask[18:22, 18:22] = True
    outside = quality.outside_band(mask, band=4)
    assert not outside[13:27, 13:27].any()  # mask grown by 4 px (+1 for the blend edge)
    assert outside[:12].all() and outside[28:].all()


def test_region_agreement_oracle_and_swapped_colours():
    image, labels = semantic_sample(7, 96)
    regions = [(labels == c, int(c)) for c in np.unique(labels)]
    palette = quality.class_palette()
    right, scored = quality.region_hits(image, regions, palette)
    assert scored >= 2 and right == scored
    painted = np.zeros_like(image)
    for region, cls in regions:  # every region painted in the next class's colour: all wrong
        painted[region] = CLASSES[(cls + 1) % len(CLASSES)].colour
    assert quality.region_hits(painted, regions, palette) == (0, scored)


def test_visible_boxes_later_box_on_top():
    boxes = [Box(2, 0.0, 0.0, 0.5, 0.5), Box(4, 0.25, 0.25, 0.75, 0.75)]
    (first, cls0), (second, cls1) = quality.visible_boxes(boxes, 8)
    assert (cls0, cls1) == (2, 4)
    assert first.sum() == 16 - 4 and second.sum() == 16
    assert not (first & second).any()


def test_caption_scores_on_procedural_scenes():
    for seed in range(6):
        image, text = shape_scene(seed, 96)
        caption = quality.parse_caption(text)
        assert quality.caption_scores(image, caption) == (1.0, True, True)
        opposite = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
        flipped = quality.Caption(caption.colour_a, caption.colour_b, opposite[caption.relation])
        assert quality.caption_scores(image, flipped) == (1.0, False, True)  # right axis, wrong order
        turned = {"above": "left of", "below": "right of", "left of": "above", "right of": "below"}
        across = quality.Caption(caption.colour_a, caption.colour_b, turned[caption.relation])
        assert quality.caption_scores(image, across)[2] is False
    blank = np.full((96, 96, 3), 220, np.uint8)
    assert quality.caption_scores(blank, caption) == (0.0, False, False)
    with pytest.raises(ValueError):
        quality.parse_caption("a cat on a mat")


def test_crops_are_fixed_and_inside_the_image():
    assert quality.crop_origins(300, 451, 256, quick=True) == [("c", 22, 97)]
    full = quality.crop_origins(300, 451, 256, quick=False)
    assert len(full) == 5 and all(0 <= top <= 44 and 0 <= left <= 195 for _, top, left in full)
    first, second = quality.eval_crops(64, quick=True), quality.eval_crops(64, quick=True)
    assert first and all(a.name == b.name and np.array_equal(a.image, b.image) for a, b in zip(first, second))
    assert all(c.image.shape == (64, 64, 3) for c in first)


def test_eval_seeds_differ_from_training_seeds():
    from ldmtool.runtime.seeds import derive_seed

    training = {derive_seed(0, f"semantic/{i}") for i in range(1000)}
    assert not training & {quality.eval_seed(0, "semantic", i) for i in range(100)}


def test_markdown_rows():
    records = [{"task": "superres", "model": "m", "method": "bicubic", "items": 3, "psnr": 25.0, "ssim": 0.7,
                "hf_ratio": 0.2}, {"task": "inpaint", "skipped": "no shipped default-inpaint; pass --model"}]
    rows = quality.markdown_rows(records)
    assert rows[2] == "| superres | m | bicubic | 3 | PSNR 25.00 dB, SSIM 0.700, HF energy 0.20 |"
    assert rows[3] == "| inpaint | — | — | — | skipped: no shipped default-inpaint; pass --model |"


def test_resolve_model(monkeypatch):
    assert quality.resolve_model("inpaint", "my.safetensors") == "my.safetensors"
    from ldmtool.checkpoints import presets

    monkeypatch.setattr(presets, "shipped_model", lambda name: None)
    assert quality.resolve_model("superres", None) is None


def test_weights_sha256_names_the_measured_file(tmp_path):
    import hashlib

    from ldmtool.checkpoints.presets import shipped_model

    weights = tmp_path / "m.safetensors"
    weights.write_bytes(b"weights" * 1000)
    assert quality.weights_sha256(str(weights)) == hashlib.sha256(weights.read_bytes()).hexdigest()
    shipped = shipped_model("default-superres")
    assert shipped is not None
    assert quality.weights_sha256("default-superres") == hashlib.sha256(shipped.weights.read_bytes()).hexdigest()
    assert quality.weights_sha256(str(tmp_path / "missing.safetensors")) is None


# -- end to end on tiny checkpoints ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs started together: superres in full mode (raw, colour fix, consistency; five crops per image)
    with --markdown, superres on two sets with two --settings, and the other four tasks as one --dry-run (every ldmtool start imports torch: fewer
    processes keep this file quick on a shared machine)."""
    folder = tmp_path_factory.mktemp("quality")
    bsr = folder / "bsr.safetensors"
    save_tiny_checkpoint(bsr, "ldm-bsr-sr", seed=1, with_config=True)
    script = str(BENCHMARKS / "quality.py")
    sets = folder / "sets"
    sets.mkdir()
    cv2.imwrite(str(sets / "wide.png"), _noise(1100, 3)[:700])  # long side 1100: shrunk to 1024 first
    cv2.imwrite(str(sets / "tiny.png"), _noise(20, 4))  # too small for a crop
    argvs = {"sets": ["--task", "superres", "--model", str(bsr), "--size", "32", "--steps", "1", "--quick",
                      "--eval-data", "corpus", str(sets), "--settings", "; --temperature 0"],
             "superres": ["--task", "superres", "--model", str(bsr), "--size", "32", "--steps", "1", "--markdown",
                          "--eval-data", "corpus"],
             "others": ["--task", "inpaint", "semantic", "layout", "txt2img", "--dry-run", "--steps", "1"]}
    procs = {name: subprocess.Popen([sys.executable, script, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, argv in argvs.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        results[name] = (out, err)
    return {"superres": results["superres"], "sets": results["sets"],
            **{task: results["others"] for task in ("inpaint", "semantic", "layout", "txt2img")}}


def _records(text: str, task: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "nothing printed"
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert all(r["bench"] == "quality" for r in records)
    return [r for r in records if r.get("task") == task and "method" in r]


def test_superres_end_to_end(runs):
    markdown, stderr = runs["superres"]
    records = {r["method"]: r for r in _records(stderr, "superres")}
    assert set(records) == {"bicubic", "lanczos", "bicubic + back-projection", "ldmtool --no-colour-fix",
                            "ldmtool --colour-fix", "ldmtool --consistency"}
    crops = len(quality.eval_crops(32, quick=False))
    for record in records.values():
        assert record["items"] == crops and len(record["psnr_per_item"]) == crops
        assert 0 < record["psnr"] < quality.PSNR_CAP and -1 <= record["ssim"] <= 1 and record["hf_ratio"] >= 0
    assert records["bicubic"]["hf_ratio"] < 1
    # the random model's colours are wrong; the fix takes them from the input, so it must gain a lot
    assert records["ldmtool --colour-fix"]["psnr"] > records["ldmtool --no-colour-fix"]["psnr"] + 3
    assert records["ldmtool --consistency"]["psnr"] > records["ldmtool --no-colour-fix"]["psnr"] + 3  # likewise
    assert records["bicubic + back-projection"]["psnr"] > records["bicubic"]["psnr"]
    rows = markdown.strip().splitlines()
    assert rows[0].startswith("| task |") and len(rows) == 2 + 6
    assert any(row.startswith("| superres (corpus) | bsr.safetensors | bicubic |") for row in rows)


def test_superres_sets_and_settings_end_to_end(runs):
    out, _ = runs["sets"]
    records = _records(out, "superres")
    folder = next(r["set"] for r in records if r["set"] not in ("corpus", "all"))
    assert folder.endswith("sets")
    methods = {"bicubic", "lanczos", "bicubic + back-projection", "ldmtool (model defaults)", "ldmtool --temperature 0"}
    for method in methods:
        by_set = {r["set"]: r for r in records if r["method"] == method}
        assert set(by_set) == {"corpus", folder, "all"}
        assert by_set[folder]["items"] == 1  # wide.png's centre crop; tiny.png is too small
        assert by_set["all"]["items"] == by_set["corpus"]["items"] + 1
        together = by_set["corpus"]["psnr_per_item"] + by_set[folder]["psnr_per_item"]
        assert by_set["all"]["psnr"] == pytest.approx(np.mean(together), abs=2e-3)
    summaries = [json.loads(line) for line in out.splitlines() if '"summary"' in line]
    assert {r["set"] for r in summaries} == {"corpus", folder, "all"}


def test_large_photos_are_area_downscaled_before_cropping():
    photo = _noise(2048, 5)[:1280]  # 2048x1280: halved to 1024x640
    crops = quality.photo_crops("p", photo, 256, quick=False)
    assert [c.name for c in crops] == ["p_c", "p_tl", "p_tr", "p_bl", "p_br"]
    halved = photo.reshape(640, 2, 1024, 2, 3).astype(np.float64).mean(axis=(1, 3))  # 2x2 block means
    for crop, (_, top, left) in zip(crops, quality.crop_origins(640, 1024, 256, quick=False)):
        assert np.abs(crop.image - halved[top : top + 256, left : left + 256]).max() <= 0.5 + 1e-9
    small = _noise(300, 6)
    assert np.array_equal(quality.photo_crops("s", small, 256, quick=True)[0].image, small[22:278, 22:278])
    assert quality.photo_crops("t", _noise(200, 7), 256, quick=True) == []


def test_default_eval_sets_follow_the_installed_packages(tmp_path, monkeypatch):
    from ldmtool.train import debian

    monkeypatch.setattr(debian, "DPKG_INFO", tmp_path)
    assert quality.default_eval_sets() == ["corpus"]
    (tmp_path / "lomiri-wallpapers-16.04.list").write_text("/usr\n")
    (tmp_path / "plasma-workspace-wallpapers.list").write_text("/usr\n")
    assert quality.default_eval_sets() == ["corpus", "debian:lomiri-wallpapers-16.04",
                                           "debian-all:plasma-workspace-wallpapers"]


def test_a_debian_set_takes_each_wallpaper_once_by_its_largest_file(tmp_path, monkeypatch):
    from ldmtool.train import debian

    def image(key: str, side: int) -> debian.DebianImage:
        path = tmp_path / key.replace("/", "_")
        cv2.imwrite(str(path), _noise(side))
        return debian.DebianImage(key, path, "walls", "GPL-2+", "")

    images = [image("walls/Kite/contents/images/640x480.png", 48), image("walls/Kite/contents/images/2560x1600.png", 64),
              image("walls/sea.png", 40)]
    asked = []
    monkeypatch.setattr(debian, "debian_images", lambda spec, split: asked.append((spec, split)) or images)
    assert quality.eval_set_images("debian-all:walls") == [("walls_Kite", images[1].path), ("walls_sea", images[2].path)]
    quality.eval_set_images("debian:walls")
    assert asked == [("debian:walls", "all"), ("debian:walls", "eval")]


def test_inpaint_end_to_end(runs):
    records = {r["method"]: r for r in _records(runs["inpaint"][0], "inpaint")}
    assert set(records) == {"telea", "ldmtool"}
    for record in records.values():
        assert record["mae_in_mask"] > 0 and record["outside_max_abs_diff"] == 0  # kept outside the feather band


@pytest.mark.parametrize("task", ["semantic", "layout"])
def test_region_tasks_end_to_end(runs, task):
    records = {r["method"].split(" (")[-1]: r for r in _records(runs[task][0], task)}
    assert set(records) == {"ldmtool", "oracle)", "chance)"}
    assert records["oracle)"]["accuracy"] == 1.0
    assert all(r["regions"] > 0 and 0 <= r["accuracy"] <= 1 for r in records.values())


def test_txt2img_end_to_end(runs):
    records = {r["method"].split(" (")[-1]: r for r in _records(runs["txt2img"][0], "txt2img")}
    assert records["oracle)"]["colour_accuracy"] == 1.0 and records["oracle)"]["relation_accuracy"] == 1.0
    assert records["oracle)"]["axis_accuracy"] == 1.0
    assert 0 <= records["ldmtool"]["colour_accuracy"] <= 1


def test_task_without_a_model_is_skipped(monkeypatch, capsys):
    monkeypatch.setattr(quality, "resolve_model", lambda task, model: None)
    quality.main(["--task", "inpaint"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert any(r.get("task") == "inpaint" and "no shipped default-inpaint" in r.get("skipped", "") for r in records)
