"""Image and mask reading, and the atomic writer.

Oracles: the pixel values the test itself wrote (exact), closed-form EXIF orientation (the EXIF spec's
meaning of each tag value, written with numpy), and the errno/file-system state after simulated failures.
"""
import errno
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from ldmtool.errors import FatalError, ItemError, UsageError
from ldmtool.io import writer
from ldmtool.io.images import mask_from_alpha, read_image, read_mask, to_uint8
from ldmtool.io.writer import TEMP_SUFFIX, remove_stale_temps, write_image

# A small asymmetric picture: every pixel different, so any wrong flip/rotation shows.
UPRIGHT = (np.arange(3 * 5 * 3).reshape(3, 5, 3) * 5).astype(np.uint8)

# What the camera stores for each EXIF orientation, given the upright picture (EXIF 2.3, tag 0x0112):
# the stored array is the upright one transformed by the inverse of the display transform.
STORED_FOR_ORIENTATION = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, 1),  # row 0 is the visual right side, column 0 the visual top
    7: lambda a: np.rot90(a, 1)[:, ::-1],  # row 0 is the visual right side, column 0 the visual bottom
    8: lambda a: np.rot90(a, -1),  # row 0 is the visual left side, column 0 the visual bottom
}


def _exif_with_orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _insert_exif_chunk(png: bytes, exif: bytes) -> bytes:
    """Add an eXIf chunk right after IHDR (OpenCV cannot write one)."""
    ihdr_end = 8 + 4 + 4 + 13 + 4
    body = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif
    return png[:ihdr_end] + _png_chunk(b"eXIf", body) + png[ihdr_end:]


# ---------------------------------------------------------------- reading


def test_rgb_png_exact(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(UPRIGHT).save(path)
    loaded = read_image(path)
    assert loaded.rgb.dtype == np.float32 and loaded.rgb.shape == (3, 5, 3)
    assert loaded.alpha is None and loaded.size == (5, 3)
    np.testing.assert_array_equal(to_uint8(loaded.rgb), UPRIGHT)


def test_grayscale_becomes_equal_rgb(tmp_path):
    gray = np.array([[0, 128, 255]], dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    loaded = read_image(tmp_path / "g.png")
    for channel in range(3):
        np.testing.assert_allclose(loaded.rgb[:, :, channel], gray / 255.0, atol=1e-7)


def test_16bit_gray_keeps_precision(tmp_path):
    values = np.array([[0, 1, 257, 65534, 65535]], dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), values)
    loaded = read_image(tmp_path / "g16.png")
    assert loaded.bit_depth == 16
    np.testing.assert_allclose(loaded.rgb[:, :, 1], values / 65535.0, rtol=0, atol=1e-7)
    assert loaded.rgb[0, 1, 0] != loaded.rgb[0, 0, 0]  # 1/65535 survives, 8 bits would lose it


def test_16bit_rgb_keeps_precision_and_channel_order(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 1, 30000, 65535  # distinct per channel
    rgb[1, 2] = (65535, 2, 3)
    cv2.imwrite(str(tmp_path / "c16.png"), rgb[:, :, ::-1])  # OpenCV takes BGR
    loaded = read_image(tmp_path / "c16.png")
    assert loaded.bit_depth == 16
    np.testing.assert_allclose(loaded.rgb, rgb / 65535.0, atol=1e-7)


def test_16bit_rgba_alpha_separate(tmp_path):
    rgba = np.full((2, 2, 4), 40000, dtype=np.uint16)
    rgba[0, 0, 3] = 0
    cv2.imwrite(str(tmp_path / "a16.png"), rgba[:, :, [2, 1, 0, 3]])
    loaded = read_image(tmp_path / "a16.png")
    np.testing.assert_allclose(loaded.alpha, [[0.0, 40000 / 65535], [40000 / 65535, 40000 / 65535]], atol=1e-7)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png", transparency=1)
    loaded = read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(to_uint8(loaded.rgb)[0], [[255, 0, 0], [0, 0, 255]])
    np.testing.assert_array_equal(loaded.alpha, [[1.0, 0.0]])


def test_gray_alpha(tmp_path):
    Image.fromarray(np.array([[[10, 255], [20, 0]]], dtype=np.uint8), mode="LA").save(tmp_path / "la.png")
    loaded = read_image(tmp_path / "la.png")
    np.testing.assert_array_equal(to_uint8(loaded.rgb)[0, :, 0], [10, 20])
    np.testing.assert_array_equal(loaded.alpha, [[1.0, 0.0]])


def test_cmyk_jpeg_colours(tmp_path):
    colour = (200, 40, 90)
    Image.new("RGB", (16, 16), colour).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    loaded = read_image(tmp_path / "c.jpg")
    np.testing.assert_allclose(to_uint8(loaded.rgb)[8, 8].astype(int), colour, atol=4)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_8bit(tmp_path, orientation):
    stored = np.ascontiguousarray(STORED_FOR_ORIENTATION[orientation](UPRIGHT))
    path = tmp_path / "o.png"
    Image.fromarray(stored).save(path, exif=_exif_with_orientation(orientation))
    np.testing.assert_array_equal(to_uint8(read_image(path).rgb), UPRIGHT)


@pytest.mark.parametrize("orientation", [3, 5, 6, 7, 8])
def test_exif_orientation_16bit(tmp_path, orientation):
    upright = UPRIGHT.astype(np.uint16) * 257
    stored = np.ascontiguousarray(STORED_FOR_ORIENTATION[orientation](upright))
    ok, png = cv2.imencode(".png", stored[:, :, ::-1])
    path = tmp_path / "o16.png"
    path.write_bytes(_insert_exif_chunk(png.tobytes(), _exif_with_orientation(orientation)))
    np.testing.assert_allclose(read_image(path).rgb, upright / 65535.0, atol=1e-7)


def test_exif_rotated_jpeg_dimensions(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)  # stored left half red: with orientation 6 the top is red
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=_exif_with_orientation(6), quality=95)
    loaded = to_uint8(read_image(tmp_path / "r.jpg").rgb)
    assert loaded.shape == (40, 20, 3)
    assert loaded[2, 10, 0] > 200 and loaded[-3, 10, 0] < 50


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.png", b"", "empty"),
        ("text.png", b"hello, I am not a picture\n", "not an image"),
        ("folder.png", None, "folder"),
    ],
)
def test_bad_files_are_item_errors(tmp_path, name, content, reason):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ItemError) as err:
        read_image(path)
    message = str(err.value)
    assert str(path) in message and reason in message and "\n" not in message


def test_truncated_png(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "f.png")
    data = (tmp_path / "f.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ItemError, match="t.png: .*truncated"):
        read_image(tmp_path / "t.png")


def test_missing_file(tmp_path):
    with pytest.raises(ItemError, match="nope.png: no such file"):
        read_image(tmp_path / "nope.png")


def test_pixel_limit(tmp_path, monkeypatch):
    Image.new("RGB", (20, 10)).save(tmp_path / "big.png")
    with pytest.raises(ItemError, match=r"big.png: 20x10 is 200 pixels, over the limit of 199"):
        read_image(tmp_path / "big.png", max_pixels=199)
    assert read_image(tmp_path / "big.png", max_pixels=200).size == (20, 10)
    monkeypatch.setenv("LDMTOOL_MAX_PIXELS", "100")
    with pytest.raises(ItemError, match="over the limit of 100"):
        read_image(tmp_path / "big.png")
    monkeypatch.setenv("LDMTOOL_MAX_PIXELS", "lots")
    with pytest.raises(UsageError):
        read_image(tmp_path / "big.png")


# ---------------------------------------------------------------- masks


def test_mask_threshold_and_invert(tmp_path):
    values = np.array([[0, 127, 128, 255]], dtype=np.uint8)  # 127/255 < 0.5 <= 128/255
    Image.fromarray(values).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), [[0, 0, 1, 1]])
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", invert=True), [[1, 1, 0, 0]])


def test_colour_mask_uses_luminance(tmp_path):
    Image.fromarray(np.array([[[255, 255, 255], [255, 0, 0]]], dtype=np.uint8)).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), [[1, 0]])  # red luminance 0.299 < 0.5


def test_mask_size_must_match(tmp_path):
    Image.new("L", (4, 3), 255).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", size=(4, 3)).shape == (3, 4)
    with pytest.raises(ItemError, match=r"m.png: the mask is 4x3 but its image is 5x3"):
        read_mask(tmp_path / "m.png", size=(5, 3))


def test_mask_from_alpha():
    alpha = np.array([[0.0, 0.49, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(mask_from_alpha(alpha), [[1, 1, 0, 0]])
    np.testing.assert_array_equal(mask_from_alpha(alpha, invert=True), [[0, 0, 1, 1]])


# ---------------------------------------------------------------- writing


@pytest.mark.parametrize("ext", ["png", "jpg", "webp"])
def test_write_formats_by_extension(tmp_path, ext):
    image = np.full((8, 8, 3), 0.5, dtype=np.float32)
    path = write_image(tmp_path / f"x.{ext}", image)
    with Image.open(path) as written:
        assert written.format == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[ext]
        assert abs(int(np.asarray(written.convert("RGB"))[4, 4, 0]) - 128) <= 2


def test_png_write_is_exact_and_keeps_alpha(tmp_path):
    alpha = np.array([[0.0, 1.0]], dtype=np.float32)
    write_image(tmp_path / "x.png", UPRIGHT[:1, :2], alpha=alpha)
    with Image.open(tmp_path / "x.png") as written:
        np.testing.assert_array_equal(np.asarray(written), np.concatenate([UPRIGHT[:1, :2], [[[0], [255]]]], axis=2))


def test_quality_changes_jpeg_size(tmp_path):
    image = np.random.default_rng(1).random((64, 64, 3)).astype(np.float32)
    small = write_image(tmp_path / "q10.jpg", image, quality=10).stat().st_size
    large = write_image(tmp_path / "q95.jpg", image, quality=95).stat().st_size
    assert small < large


def test_unknown_extension_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"\.gif"):
        write_image(tmp_path / "x.gif", UPRIGHT)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_refused(tmp_path, bad):
    image = np.zeros((2, 2, 3), dtype=np.float32)
    image[1, 1, 1] = bad
    with pytest.raises(ItemError, match="non-finite"):
        write_image(tmp_path / "x.png", image)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_disk_errors_are_fatal_and_leave_nothing(tmp_path, monkeypatch, code):
    (tmp_path / "x.png").write_bytes(b"previous complete file")

    def failing_write(fd, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(writer.os, "write", failing_write)
    with pytest.raises(FatalError, match=r"x.png: cannot write the output"):
        write_image(tmp_path / "x.png", UPRIGHT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    assert (tmp_path / "x.png").read_bytes() == b"previous complete file"


@pytest.mark.parametrize("under", ["x.png", "sub/x.png"])
def test_an_output_under_a_file_says_the_file_is_in_the_way(tmp_path, under):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FatalError, match=r"cannot write the output \(.*afile is a file, not a folder\); stopping"):
        write_image(tmp_path / "afile" / under, UPRIGHT)


def test_ctrl_c_during_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def interrupted_fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        write_image(tmp_path / "x.png", UPRIGHT)
    assert list(tmp_path.iterdir()) == []


def test_stale_temps_of_dead_processes_are_removed(tmp_path):
    dead = tmp_path / f".a.png.999999999{TEMP_SUFFIX}"
    alive = tmp_path / f".b.png.{os.getppid()}{TEMP_SUFFIX}"
    dead.write_bytes(b"partial")
    alive.write_bytes(b"in progress elsewhere")
    assert remove_stale_temps([tmp_path / "a.png", tmp_path / "b.png"]) == 1
    assert not dead.exists() and alive.exists()
