"""What outputs keep for a photo pipeline (issue 16): the input's EXIF and ICC profile, its 16 bits, its
format (`--format keep`), TIFF with metadata, `--suffix`, and `-o` with an image extension always a file.

CLI cases run `ldmtool superres` with the shipped default model on tiny images; the writer's cases are unit
tests of `encode_image`.
"""
import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms

from clirun import run_cli
from ldmtool.errors import FatalError
from ldmtool.io.images import read_image
from ldmtool.io.metadata import ImageMetadata, read_metadata
from ldmtool.io.source import MAX_CARRIED_BYTES, SourceInfo, kept_exif
from ldmtool.io.writer import encode_image

MAKE, MODEL, ORIENTATION, DATE_ORIGINAL, EXIF_IFD = 0x010F, 0x0110, 0x0112, 0x9003, 0x8769
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
METADATA = ImageMetadata("a prompt\nSteps: 2, Version: ldmtool test", {"tool": "ldmtool", "seed": 7})


def _camera_exif(orientation=1):
    exif = Image.Exif()
    exif[MAKE], exif[MODEL], exif[ORIENTATION] = "Canon", "EOS 5D", orientation
    exif.get_ifd(EXIF_IFD)[DATE_ORIGINAL] = "2021:06:05 10:11:12"
    return exif


def _photo(path, size=(12, 8), mode="RGB", **save):
    array = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(array).convert(mode).save(path, **save)
    return path


def _superres(*args):
    return run_cli("superres", *args, "--steps", "1", "--seed", "1", "--quiet")


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


# ---------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_and_icc_survive_superres(tmp_path, suffix):
    source = _photo(tmp_path / f"photo{suffix}", exif=_camera_exif(orientation=6).tobytes(), icc_profile=SRGB)
    out = tmp_path / f"out{suffix}"
    _ok(_superres(source, "-o", out))
    with Image.open(out) as image:
        exif = image.getexif()
        assert image.size == (32, 48)  # orientation 6 applied on read: 8x12 upright, then x4
        assert exif.get(MAKE) == "Canon" and exif.get(MODEL) == "EOS 5D"
        assert exif.get_ifd(EXIF_IFD).get(DATE_ORIGINAL) == "2021:06:05 10:11:12"
        assert exif.get(ORIENTATION) in (None, 1)  # the pixels are upright already
        assert image.info.get("icc_profile") == SRGB
    metadata = read_metadata(out)  # ldmtool's own metadata is still there beside the camera's
    assert metadata is not None and metadata.recipe["command"] == "superres" and "Steps: 1" in metadata.parameters


def test_16bit_png_in_gives_16bit_png_out(tmp_path):
    deep = (np.random.default_rng(1).random((8, 12, 3)) * 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    _ok(_superres(tmp_path / "deep.png", "-o", tmp_path / "out.png"))
    written = cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_UNCHANGED)
    assert written.dtype == np.uint16 and written.shape == (32, 48, 3)
    assert np.any(written % 257), "real 16-bit values, not 8-bit ones scaled up"
    assert read_image(tmp_path / "out.png").bit_depth == 16
    assert read_metadata(tmp_path / "out.png").recipe["command"] == "superres"


def test_format_keep_keeps_each_inputs_format_and_grey(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(folder / "a.jpg")
    _photo(folder / "b.png")
    _photo(folder / "c.gif")  # ldmtool cannot write GIF: png, said once
    _photo(folder / "d.png", mode="L")
    result = _ok(run_cli("superres", folder, "-o", tmp_path / "out", "--format", "keep", "--steps", "1", "--seed", "1"))
    assert "cannot write .gif" in result.stderr
    names = sorted(path.name for path in (tmp_path / "out").iterdir() if path.suffix not in (".jsonl", ".html")
                   and path.name != ".thumbs")
    assert names == ["a.jpg", "b.png", "c.png", "d.png"]
    with Image.open(tmp_path / "out" / "a.jpg") as image:
        assert image.format == "JPEG"
    with Image.open(tmp_path / "out" / "d.png") as grey, Image.open(tmp_path / "out" / "b.png") as colour:
        assert grey.mode == "L" and colour.mode == "RGB"


def test_tiff_output_keeps_metadata_for_ldmtool_info(tmp_path):
    _ok(_superres(_photo(tmp_path / "in.png"), "-o", tmp_path / "out", "--format", "tiff"))
    out = tmp_path / "out" / "in.tiff"
    with Image.open(out) as image:
        assert image.format == "TIFF" and image.size == (48, 32)
    info = _ok(run_cli("info", out, "--json"))
    shown = json.loads(info.stdout)
    assert shown["recipe"]["command"] == "superres" and "Steps: 1" in shown["parameters"]


def test_suffix_is_added_to_the_stem(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(folder / "photo.png")
    _ok(_superres(folder, "-o", tmp_path / "out", "--suffix", "out"))
    assert (tmp_path / "out" / "photo_out.png").is_file()
    _ok(_superres(folder, "-o", tmp_path / "named", "--suffix", "x4", "--name", "{suffix}-{stem}.{ext}"))
    assert (tmp_path / "named" / "_x4-photo.png").is_file()


def test_suffix_does_not_change_the_jobs_identity(tmp_path):
    from ldmtool.runtime.identity import pixel_options

    assert "suffix" not in pixel_options({"suffix": "out", "fmt": "keep", "steps": 2})


@pytest.mark.parametrize("target", ["out.gif", "out.bmp", "sub/out.GIF"])
def test_o_with_an_image_extension_ldmtool_cannot_write_is_a_usage_error(tmp_path, target):
    result = _superres(_photo(tmp_path / "in.png"), "-o", tmp_path / target)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot write" in result.stderr
    assert not (tmp_path / target).exists() and not (tmp_path / "sub").exists()


@pytest.mark.parametrize("target", ["out.tiff", "out.tif"])
def test_o_tiff_is_a_file(tmp_path, target):
    _ok(_superres(_photo(tmp_path / "in.png"), "-o", tmp_path / target))
    assert (tmp_path / target).is_file()
    assert read_metadata(tmp_path / target).recipe["command"] == "superres"


# ---------------------------------------------------------------- the writer


def _source(**fields):
    return SourceInfo(exif=kept_exif(_camera_exif(orientation=8)).tobytes(), icc_profile=SRGB, **fields)


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp", "tiff"])
def test_writer_merges_carried_exif_and_icc_with_metadata(tmp_path, fmt):
    data = encode_image(np.full((4, 6, 3), 0.5, np.float32), fmt, metadata=METADATA, source=_source())
    (tmp_path / f"x.{fmt}").write_bytes(data)
    with Image.open(io.BytesIO(data)) as image:
        exif = image.getexif()
        assert exif.get(MAKE) == "Canon" and exif.get_ifd(EXIF_IFD).get(DATE_ORIGINAL) == "2021:06:05 10:11:12"
        assert exif.get(ORIENTATION) is None
        assert image.info.get("icc_profile") == SRGB
    assert read_metadata(tmp_path / f"x.{fmt}") == METADATA


def test_writer_16bit_png_tiff_and_grey(tmp_path):
    values = np.random.default_rng(2).random((5, 7, 3)).astype(np.float32)
    (tmp_path / "deep.png").write_bytes(encode_image(values, "png", metadata=METADATA, bit_depth=16))
    loaded = read_image(tmp_path / "deep.png")
    assert loaded.bit_depth == 16 and np.abs(loaded.rgb - values).max() <= 0.5 / 65535 + 1e-7
    assert read_metadata(tmp_path / "deep.png") == METADATA
    (tmp_path / "deep.tiff").write_bytes(encode_image(values, "tiff", metadata=METADATA, bit_depth=16,
                                                      alpha=values[:, :, 1], source=_source()))
    loaded = read_image(tmp_path / "deep.tiff")  # 16-bit colour TIFF: written by hand, Pillow cannot
    assert loaded.bit_depth == 16 and np.abs(loaded.rgb - values).max() <= 0.5 / 65535 + 1e-7
    assert loaded.alpha is not None and loaded.source.icc_profile == SRGB
    assert read_metadata(tmp_path / "deep.tiff") == METADATA
    with Image.open(tmp_path / "deep.tiff") as image:
        assert image.getexif().get(MAKE) == "Canon"
    grey = encode_image(values, "tiff", bit_depth=16, grey=True)
    with Image.open(io.BytesIO(grey)) as image:
        assert image.mode.startswith("I;16")
    with Image.open(io.BytesIO(encode_image(values, "png", grey=True))) as image:
        assert image.mode == "L"
    with Image.open(io.BytesIO(encode_image(values, "png", bit_depth=16, alpha=values[:, :, 0]))) as image:
        assert image.mode == "RGBA"  # alpha: never grey, and Pillow shows 16-bit RGBA as 8 bits


def test_writer_drops_what_does_not_fit(tmp_path):
    cmyk = bytearray(SRGB)
    cmyk[16:20] = b"CMYK"  # a CMYK input's profile: its pixels were converted to sRGB on read
    data = encode_image(np.zeros((4, 4, 3), np.uint8), "png", source=SourceInfo(icc_profile=bytes(cmyk)))
    with Image.open(io.BytesIO(data)) as image:
        assert "icc_profile" not in image.info
    huge = Image.Exif()
    huge.get_ifd(EXIF_IFD)[0x927C] = b"x" * 70_000  # a maker note over JPEG's 64 KiB EXIF limit
    source = SourceInfo(exif=huge.tobytes())
    data = encode_image(np.zeros((4, 4, 3), np.uint8), "jpg", metadata=METADATA, source=source)
    (tmp_path / "x.jpg").write_bytes(data)
    assert read_metadata(tmp_path / "x.jpg") == METADATA  # written, with ldmtool's metadata, without the blob


def test_reading_drops_large_or_broken_icc_and_exif(tmp_path):
    array = np.zeros((4, 4, 3), np.uint8)
    Image.fromarray(array).save(tmp_path / "big.jpg", icc_profile=SRGB + b"\0" * MAX_CARRIED_BYTES)
    Image.fromarray(array).save(tmp_path / "broken.png", icc_profile=b"not a profile", exif=b"Exif\0\0garbage")
    for name in ("big.jpg", "broken.png"):
        loaded = read_image(tmp_path / name)
        assert loaded.source is not None and loaded.source.icc_profile is None and loaded.source.exif is None


def test_replay_o_gif_is_a_usage_error_too(tmp_path):
    _ok(_superres(_photo(tmp_path / "in.png"), "-o", tmp_path / "out.png"))
    result = run_cli("replay", tmp_path / "out.png", "-o", tmp_path / "again.gif", "--quiet")
    assert result.exit_code == 2 and "cannot write" in result.stderr
    assert not (tmp_path / "again.gif").exists()


def test_replay_of_a_grey_keep_output_is_identical(tmp_path):
    _ok(_superres(_photo(tmp_path / "grey.png", mode="L"), "-o", tmp_path / "out", "--format", "keep"))
    result = _ok(run_cli("replay", tmp_path / "out" / "grey.png", "--verify", "--json"))
    assert json.loads(result.stdout.splitlines()[-1])["max_difference"] == 0


def test_write_image_encodes_straight_into_the_file(tmp_path, monkeypatch):
    """No encoded copy of the image is held in memory (40 MB for a 16 MP PNG): the bytes go to the temporary
    file as they are made, and they are what `encode_image` would give."""
    from ldmtool.io import writer

    pixels = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    expected = encode_image(pixels, "png", metadata=METADATA)
    monkeypatch.setattr(writer, "encode_image", lambda *a, **k: pytest.fail("write_image encoded into memory"))
    writer.write_image(tmp_path / "out.png", pixels, metadata=METADATA)
    assert (tmp_path / "out.png").read_bytes() == expected


@pytest.mark.parametrize("error, raised", [(OSError("encoder error -2"), OSError), (OSError(28, "No space"), FatalError)])
def test_a_failed_write_leaves_neither_output_nor_temporary_file(tmp_path, monkeypatch, error, raised):
    """An encoder's error (no errno) is the item's; the file system's is fatal. Either way nothing is left."""
    from ldmtool.io import writer

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise error

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(raised) as caught:
        writer.write_image(tmp_path / "out.png", np.zeros((4, 4, 3), np.uint8))
    assert isinstance(caught.value, FatalError) == (raised is FatalError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("first, second", [((), ("--format", "keep")), (("--format", "keep"), ())])
def test_format_keep_and_png_are_one_job_for_png_inputs(tmp_path, first, second):
    """`--format` chooses the file, not the pixels: a PNG written by a `--format keep` run is the PNG run's
    output and the other way round (same seed adopted, skipped); only a JPEG output counts --quality."""
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(folder / "a.png")
    _photo(folder / "b.jpg")
    out = tmp_path / "out"
    made = _ok(run_cli("superres", folder, "-o", out, "--steps", "1", "--json", *first))
    again = _ok(run_cli("superres", folder, "-o", out, "--steps", "1", "--json", *second))
    states = {json.loads(line)["key"]: json.loads(line)["event"] for line in again.stdout.splitlines() if '"key"' in line}
    assert states["a.png"] == "skipped", again.stdout
    seeds = {json.loads(line)["seed"] for line in made.stdout.splitlines() + again.stdout.splitlines()
             if '"summary"' in line}
    assert len(seeds) == 1
    lossy = run_cli("superres", folder, "-o", out, "--steps", "1", "--json", "--format", "keep", "--quality", "80")
    states = {json.loads(line)["key"]: json.loads(line) for line in lossy.stdout.splitlines() if '"key"' in line}
    assert states["a.png"]["event"] == "skipped"
    # the keep run wrote b.jpg at quality 95: 80 is another job
    assert states["b.jpg"]["event"] == "failed" and "--quality differs (95, this run 80)" in states["b.jpg"]["error"]
