"""No example photo is a training image: checked against stored hashes only (the shipped models'
`*.sources.json` and tests/data/corpus_sha256.txt), so it holds where no corpus or package is installed."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
from importlib import metadata
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODELS = ROOT / "ldmtool" / "assets" / "models"
CORPUS_HASHES = Path(__file__).resolve().parent / "data" / "corpus_sha256.txt"


def _load_make_photos():
    spec = importlib.util.spec_from_file_location("make_photos", EXAMPLES / "make_photos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_photos"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


make_photos = _load_make_photos()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifests() -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(MODELS.glob("*.sources.json"))]


def _corpus_rows() -> list[list[str]]:
    return [line.split() for line in CORPUS_HASHES.read_text().splitlines() if line and not line.startswith("#")]


def _trained_hashes() -> set[str]:
    shipped = {row["sha256"] for manifest in _manifests() for row in manifest["images"] if row["split"] == "train"}
    return shipped | {row[0] for row in _corpus_rows()}  # every corpus image, held-out ones too


def _photos_section() -> str:
    text = (EXAMPLES / "SOURCES.md").read_text()
    return text[text.index("# Example photos"): text.index("\n# ", text.index("# Example photos") + 1)]


def test_the_stored_hashes_are_there_to_check_against():
    manifests = _manifests()
    assert any("debian:" in manifest["data"] for manifest in manifests)  # e.g. corpus+debian:PKG
    assert all(re.fullmatch(r"[0-9a-f]{64}", row["sha256"]) for manifest in manifests for row in manifest["images"])
    assert len(_corpus_rows()) >= 20 and all(re.fullmatch(r"[0-9a-f]{64}", row[0]) for row in _corpus_rows())


def test_no_example_photo_or_its_source_is_a_training_image():
    trained = _trained_hashes()
    photos = sorted((EXAMPLES / "photos").iterdir())
    assert [path.name for path in photos] == sorted(photo.name for photo in make_photos.PHOTOS)
    for path in photos:
        assert _sha256(path) not in trained, f"{path.name} is a training image"
    listed = re.findall(r"\b[0-9a-f]{64}\b", _photos_section())
    assert sorted(listed) == sorted(photo.sha256 for photo in make_photos.PHOTOS), "SOURCES.md and make_photos.py"
    assert not set(listed) & trained, "an example photo's source was trained on"


def test_the_examples_package_trains_no_shipped_model():
    trained_packages = {row["package"] for manifest in _manifests() for row in manifest["images"]
                        if row["split"] == "train"}
    assert make_photos.PACKAGE in _photos_section()
    assert make_photos.PACKAGE not in trained_packages
    assert not any(make_photos.PACKAGE in manifest["data"] for manifest in _manifests())


def test_the_shipped_default_beats_bicubic_on_the_example_photos():
    """The main job's model on photos it never saw: each example, area-downscaled 4x once more, comes back closer
    to itself than OpenCV's bicubic upscale (measured +0.4 to +3.3 dB, mean +1.4; a UNet that predicts nothing
    leaves bicubic plus back-projection: +0.27 to +0.37, mean 0.32). benchmarks/quality.py measures the
    held-out sets."""
    import ldmtool

    gains = {}
    for path in sorted((EXAMPLES / "photos").glob("*.png")):
        truth = np.asarray(Image.open(path).convert("RGB"))
        height, width = truth.shape[:2]
        low = cv2.resize(truth, (width // 4, height // 4), interpolation=cv2.INTER_AREA)
        upscaled = np.asarray(ldmtool.superres(low, scale=4, seed=0, precision="fp32"))
        bicubic = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
        gains[path.name] = cv2.PSNR(upscaled, truth) - cv2.PSNR(bicubic, truth)
    assert min(gains.values()) > 0.3 and sum(gains.values()) / len(gains) > 0.8, gains


def test_area_downscale_is_opencvs_area_average_for_whole_factors():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    expected = cv2.resize(pixels, (18, 12), interpolation=cv2.INTER_AREA)
    assert np.abs(make_photos.area_downscale(pixels, 5).astype(int) - expected).max() <= 1


@pytest.mark.skipif(not Path("/usr/share/wallpapers/ColorfulCups").is_dir(),
                    reason="plasma-workspace-wallpapers is not installed")
def test_make_photos_remakes_the_examples(tmp_path):
    make_photos.main(["--out", str(tmp_path)])
    for photo in make_photos.PHOTOS:
        remade = np.asarray(Image.open(tmp_path / photo.name))
        assert remade.shape == (80, 120, 3)
        np.testing.assert_array_equal(remade, np.asarray(Image.open(EXAMPLES / "photos" / photo.name)))


def _installed_scikit_image() -> str:
    try:
        return metadata.version("scikit-image")
    except metadata.PackageNotFoundError:
        return ""


@pytest.mark.skipif(not any(row[4] == _installed_scikit_image() for row in _corpus_rows()),
                    reason="another scikit-image version than the stored hashes were made from")
def test_stored_corpus_hashes_are_the_installed_corpus():
    from ldmtool.train.data import corpus_images

    stored = {row[2]: (row[0], row[1]) for row in _corpus_rows() if row[3] == "scikit-image"}
    installed = {image.key: image for image in corpus_images("all") if image.key.startswith("skimage/")}
    assert set(stored) == set(installed), "rerun tests/data/make_corpus_sha256.py"
    train = {image.key for image in corpus_images("train")}
    for key, image in installed.items():
        assert stored[key] == (_sha256(image.path), "train" if key in train else "eval"), key
