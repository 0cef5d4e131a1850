"""Training data sources: folders, the built-in corpus split, crops, degradations, masks, procedural sets."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmtool.errors import UsageError
from ldmtool.train import data, degrade, masks, procedural


def _write(path: Path, size=(40, 30), mode="RGB", colour=(10, 200, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(path)


def test_corpus_split_is_fixed_and_disjoint():
    train = {image.key for image in data.corpus_images("train")}
    held = {image.key for image in data.corpus_images("eval")}
    assert "skimage/astronaut.png" in train
    assert {"skimage/chelsea.png", "skimage/coffee.png", "skimage/rocket.jpg"} <= held
    assert not train & held
    assert held <= data.HELD_OUT
    assert train | held == {image.key for image in data.corpus_images("all")}


def test_resolve_corpus_excludes_held_out():
    names = {p.name for p in data.resolve_data("corpus")}
    assert "chelsea.png" not in names and "astronaut.png" in names


def test_folder_images_recursive_and_sorted(tmp_path):
    _write(tmp_path / "b.png")
    _write(tmp_path / "sub" / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in data.folder_images(tmp_path)] == ["b.png", "a.jpg"]
    assert [p.name for p in data.folder_images(tmp_path, recursive=False)] == ["b.png"]


def test_missing_or_empty_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not a folder"):
        data.resolve_data(str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="no image files"):
        data.resolve_data(str(tmp_path))


def test_load_rgb_converts_grey_and_composites_alpha(tmp_path):
    _write(tmp_path / "grey.png", mode="L", colour=(77,))
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: white after compositing
    rgba.save(tmp_path / "alpha.png")
    assert (data.load_rgb(tmp_path / "grey.png") == 77).all()
    assert (data.load_rgb(tmp_path / "alpha.png") == 255).all()


def test_crops_are_deterministic_and_small_images_are_enlarged(tmp_path):
    _write(tmp_path / "small.png", size=(20, 12))
    noise = np.random.default_rng(0).integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "big.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="unreadable"):
        crops = data.ImageCrops(data.folder_images(tmp_path), data.CropConfig(size=32, min_scale=0.5), seed=3)
    assert len(crops) == 2
    first = crops.batch(step=5, batch_size=3)
    assert first.shape == (3, 32, 32, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, crops.batch(step=5, batch_size=3))
    assert not np.array_equal(first, crops.batch(step=6, batch_size=3))


def test_tensor_roundtrip_is_exact():
    images = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    tensor = data.to_tensor(images)
    assert tensor.shape == (2, 3, 8, 8) and tensor.min() >= -1 and tensor.max() <= 1
    np.testing.assert_array_equal(data.to_uint8(tensor), images)


def test_degrade_shapes_and_clean_path_is_bicubic():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    low = degrade.degrade(image, degrade.DegradeConfig(scale=4), rng)
    assert low.shape == (16, 12, 3) and low.dtype == np.uint8
    clean = degrade.degrade(image, degrade.DegradeConfig(scale=4, clean_prob=1.0), rng)
    np.testing.assert_array_equal(clean, degrade.bicubic_downscale(image, 4))


def test_degrade_of_flat_image_stays_near_flat():
    image = np.full((64, 64, 3), 128, np.uint8)
    config = degrade.DegradeConfig(scale=4, clean_prob=0.0, noise_prob=0.0)
    low = degrade.degrade(image, config, np.random.default_rng(1))
    assert np.abs(low.astype(int) - 128).max() <= 2  # blur, resize and JPEG preserve a flat field


def test_masks_are_binary_nonempty_and_deterministic():
    for kind in (masks.box_mask, masks.freeform_mask, masks.random_mask):
        a = kind(40, 50, np.random.default_rng(7))
        b = kind(40, 50, np.random.default_rng(7))
        assert a.shape == (40, 50) and set(np.unique(a)) <= {0.0, 1.0}
        np.testing.assert_array_equal(a, b)
    for seed in range(20):
        assert masks.random_mask(16, 16, np.random.default_rng(seed)).any()


def test_semantic_sample_regions_have_class_colours():
    image, labels = procedural.semantic_sample(seed=5, size=64)
    assert image.shape == (64, 64, 3) and labels.shape == (64, 64)
    for index in np.unique(labels):
        region = image[labels == index].astype(float).mean(0)
        expected = np.array(procedural.CLASSES[index].colour, float)
        assert np.abs(region - expected).max() < 45, procedural.CLASS_NAMES[index]
    again, _ = procedural.semantic_sample(seed=5, size=64)
    np.testing.assert_array_equal(image, again)


def test_layout_boxes_show_their_class():
    image, boxes = procedural.layout_sample(seed=2, size=64)
    top = boxes[-1]  # drawn last, so fully visible
    region = image[round(top.y0 * 64) : round(top.y1 * 64), round(top.x0 * 64) : round(top.x1 * 64)]
    expected = np.array(procedural.CLASSES[top.cls].colour, float)
    assert np.abs(region.reshape(-1, 3).mean(0) - expected).max() < 45


def test_shape_scene_caption_matches_picture():
    image, caption = procedural.shape_scene(seed=11, size=96)
    words = caption.split()
    colour_a = procedural.COLOURS[words[1]]
    relation = "left of" if "left" in words else "right of" if "right" in words else words[3]
    distance = np.abs(image.astype(int) - np.array(colour_a)).sum(-1)
    ys, xs = np.nonzero(distance < 30)
    assert len(ys) > 20, caption
    cy, cx = ys.mean(), xs.mean()
    assert {"above": cy < 48, "below": cy > 48, "left of": cx < 48, "right of": cx > 48}[relation], caption


def test_light_degradation_is_mostly_plain_downscales_with_several_kernels():
    import cv2

    image = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    kernels = {mode: cv2.resize(image, (16, 16), interpolation=flag)
               for mode, flag in (("area", cv2.INTER_AREA), ("linear", cv2.INTER_LINEAR), ("cubic", cv2.INTER_CUBIC))}
    config = degrade.degradation("light", 4)
    seen = []
    for seed in range(200):
        low = degrade.degrade(image, config, np.random.default_rng(seed))
        seen.append(next((mode for mode, plain in kernels.items() if np.array_equal(low, plain)), "degraded"))
    share = {mode: seen.count(mode) / len(seen) for mode in (*kernels, "degraded")}
    assert 0.6 < 1 - share["degraded"] < 0.8 and all(share[mode] > 0.15 for mode in kernels), share
    assert degrade.degradation("realistic", 4) == degrade.DegradeConfig(scale=4)  # the original preset, unchanged
    with pytest.raises(UsageError, match="--degradation 'harsh'"):
        degrade.degradation("harsh", 4)


def test_large_sources_are_cropped_from_their_window(monkeypatch):
    """Above WINDOW_RESIZE_PIXELS a crop resizes only its source window: the same rng draws and nearly the same
    pixels as resizing the whole image first (which smaller images still do, bit for bit as before)."""
    import cv2

    rng = np.random.default_rng(3)
    smooth = cv2.resize(rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8), (600, 400), interpolation=cv2.INTER_CUBIC)
    config = data.CropConfig(size=32, min_scale=0.2)
    monkeypatch.setattr(data, "WINDOW_RESIZE_PIXELS", 1_000)
    windowed = [data.random_crop(smooth, config, np.random.default_rng(i)) for i in range(12)]
    monkeypatch.setattr(data, "WINDOW_RESIZE_PIXELS", 10**12)
    whole = [data.random_crop(smooth, config, np.random.default_rng(i)) for i in range(12)]
    for a, b in zip(windowed, whole):
        assert a.shape == b.shape == (32, 32, 3)
        mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
        assert mse < 255**2 / 10**3  # PSNR above 30 dB: the same region at the same scale
