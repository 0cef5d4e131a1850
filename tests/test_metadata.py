"""Metadata written into images comes back identical through Pillow and through `ldmtool info`."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldmtool import __version__
from ldmtool.io.metadata import ImageMetadata, a1111_text, build_metadata, read_metadata
from ldmtool.io.writer import write_image

PARAMS = {"prompt": "a red fox, sitting: in snow 🦊", "negative": "blurry, \"low\" quality",
          "steps": 20, "sampler": "ddim", "cfg": 7.5, "strength": 0.6, "scale": 4}


def _metadata():
    return build_metadata(command="txt2img", params=PARAMS, seed=1234, base_seed=7, key="prompt-0000/s0",
                          argv=["ldmtool", "txt2img", "--prompt", PARAMS["prompt"]], size=(8, 6),
                          model="/models/tiny.safetensors", model_sha256="0123456789abcdef" * 4)


def _ldmtool(*args):
    return subprocess.run([sys.executable, "-m", "ldmtool", *args], capture_output=True, text=True, timeout=60)


def test_a1111_text_layout():
    expected = (
        "a red fox, sitting: in snow 🦊\n"
        "Negative prompt: blurry, \"low\" quality\n"
        "Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, Size: 8x6, Model hash: 0123456789, "
        f"Model: tiny.safetensors, Denoising strength: 0.6, Scale: 4, Version: ldmtool {__version__}"
    )
    assert _metadata().parameters == expected


def test_a1111_values_with_separators_are_quoted():
    text = a1111_text({"sampler": "a, b", "note": 'say "hi"'}, version="9")
    assert text == 'Sampler: "a, b", Note: "say \\"hi\\"", Version: ldmtool 9'  # no empty prompt line


def test_recipe_contents():
    recipe = _metadata().recipe
    assert recipe["tool"] == "ldmtool" and recipe["version"] == __version__
    assert recipe["command"] == "txt2img" and recipe["argv"][:2] == ["ldmtool", "txt2img"]
    assert recipe["seed"] == 1234 and recipe["base_seed"] == 7 and recipe["key"] == "prompt-0000/s0"
    assert recipe["model_sha256"] == "0123456789abcdef" * 4
    assert recipe["parameters"] == PARAMS


def _pillow_view(path):
    with Image.open(path) as image:
        if image.format == "PNG":
            return image.text["parameters"], json.loads(image.text["ldmtool"])
        exif = image.getexif()
        comment = exif.get_ifd(0x8769)[0x9286]
        assert comment.startswith(b"UNICODE\x00")
        description = exif[0x010E]
        return comment[8:].decode("utf-16-be"), json.loads(description.split(":", 1)[1])


@pytest.mark.parametrize("ext", ["png", "jpg", "webp"])
def test_round_trip_through_pillow(tmp_path, ext):
    metadata = _metadata()
    path = write_image(tmp_path / f"x.{ext}", np.zeros((6, 8, 3), np.float32), metadata=metadata)
    assert _pillow_view(path) == (metadata.parameters, metadata.recipe)
    assert read_metadata(path) == metadata


def test_round_trip_through_ldmtool_info(tmp_path):
    metadata = _metadata()
    paths = [write_image(tmp_path / f"x.{ext}", np.zeros((6, 8, 3), np.float32), metadata=metadata)
             for ext in ("png", "jpg", "webp")]
    result = _ldmtool("info", "--json", *map(str, paths))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(p) for p in paths]
    for line in lines:
        assert ImageMetadata(line["parameters"], line["recipe"]) == metadata

    text = _ldmtool("info", str(paths[0]))
    assert text.returncode == 0
    assert text.stdout.startswith(f"{paths[0]}\n{metadata.parameters}\nRecipe: ")
    assert json.loads(text.stdout.split("Recipe: ", 1)[1]) == metadata.recipe


def test_a_reader_that_closes_info_early_is_one_line_and_exit_3_as_for_a_run(tmp_path):
    """`ldmtool info out/*.png --json | head -1` ended with Click's silent exit 1 (EPIPE); batch runs stop
    with one line and exit 3 (Reporter._write), and so does every other command now."""
    path = write_image(tmp_path / "x.png", np.zeros((6, 8, 3), np.float32), metadata=_metadata())
    proc = subprocess.Popen([sys.executable, "-m", "ldmtool", "info", "--json", *[str(path)] * 400],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["file"] == str(path)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 3
    assert stderr.strip().splitlines() == [
        "ldmtool: error: stdout: cannot write the command's output (its reader closed it); stopping"]


def test_info_on_files_without_metadata(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "plain.png")
    (tmp_path / "text.png").write_text("not an image")
    result = _ldmtool("info", str(tmp_path / "plain.png"), str(tmp_path / "text.png"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in result.stderr
    assert "plain.png: no generation metadata" in lines[0]
    assert "text.png: not a readable image" in lines[1]


def test_camera_exif_is_not_generation_metadata(tmp_path):
    exif = Image.Exif()
    exif[0x010E] = "Holiday snap"
    Image.new("RGB", (4, 4)).save(tmp_path / "camera.jpg", exif=exif.tobytes())
    assert read_metadata(tmp_path / "camera.jpg") is None


def _long_metadata(prompt):
    params = {**PARAMS, "prompt": prompt, "negative": prompt}
    return build_metadata(command="txt2img", params=params, seed=1, argv=["ldmtool", "txt2img", "--prompt", prompt],
                          extra={"job": {"data": {"prompt": prompt}}, "cli": {"prompt": prompt}})


@pytest.mark.parametrize("prompt", ["红色的圆" * 600, "a red fox in the snow, " * 400])
def test_a_recipe_too_long_for_jpeg_exif_is_stored_compressed(tmp_path, prompt):
    """JPEG holds 64 KiB of EXIF; the recipe repeats the prompt (6 bytes a CJK character, ASCII-escaped), so a
    long prompt is written with the recipe compressed, and read back the same."""
    metadata = _long_metadata(prompt)
    path = write_image(tmp_path / "x.jpg", np.zeros((6, 8, 3), np.float32), metadata=metadata)
    with Image.open(path) as image:
        assert image.getexif()[0x010E].startswith("ldmtool-recipe-zlib:")
    assert read_metadata(path) == metadata
    webp = write_image(tmp_path / "x.webp", np.zeros((6, 8, 3), np.float32), metadata=metadata)
    assert _pillow_view(webp) == (metadata.parameters, metadata.recipe)  # WebP has room for the plain recipe


def test_metadata_too_long_even_compressed_fails_the_item_in_one_line(tmp_path):
    from ldmtool.errors import ItemError

    metadata = _long_metadata("".join(chr(0x4E00 + i % 20000) for i in range(40_000)))
    with pytest.raises(ItemError) as caught:
        write_image(tmp_path / "x.jpg", np.zeros((6, 8, 3), np.float32), metadata=metadata)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'x.jpg'}: the metadata is ") and "--format png or webp" in message
    assert "\n" not in message and list(tmp_path.iterdir()) == []


def test_a_damaged_compressed_recipe_is_one_line(tmp_path):
    from ldmtool.errors import ItemError

    exif = Image.Exif()
    exif[0x010E] = "ldmtool-recipe-zlib:bm90IHpsaWI="
    Image.new("RGB", (4, 4)).save(tmp_path / "bad.jpg", exif=exif.tobytes())
    with pytest.raises(ItemError, match="bad.jpg: the compressed ldmtool recipe in this image is damaged"):
        read_metadata(tmp_path / "bad.jpg")
