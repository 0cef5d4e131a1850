"""`ldmtool grid`: contact sheets with axes from the recipes (issue 27, item 3)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clirun import run_cli
from ldmtool.io.contact_sheet import choose_axes, draw_grid, read_pictures, thumbnail
from ldmtool.io.metadata import build_metadata
from ldmtool.io.writer import write_image


def write_output(path: Path, *, seed: int = 1, colour=(200, 30, 30), size: int = 48, sweep=None, **params) -> None:
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:] = colour
    extra = {"sweep": sweep} if sweep else None
    metadata = build_metadata(command="txt2img", params={"prompt": "a cat", **params}, seed=seed, argv=["ldmtool"],
                              extra=extra)
    write_image(path, pixels, metadata=metadata)


def sweep_folder(folder: Path, *, z_values=(None,)) -> None:
    for sampler in z_values:
        for steps in (10, 20, 30):
            for cfg in (3.0, 7.5):
                extra = {"sampler": sampler} if sampler else {"sampler": "ddim"}
                write_output(folder / f"s{steps}_c{cfg}_{extra['sampler']}.png", steps=steps, cfg=cfg, **extra,
                             colour=(steps * 5, int(cfg * 20), 100))


def test_two_varying_params_make_a_labelled_grid(tmp_path):
    sweep_folder(tmp_path / "out")
    result = run_cli("grid", tmp_path / "out", "-o", tmp_path / "sheet.png", "--cell", 64)
    assert result.exit_code == 0, result.output
    assert "3x2 cells; steps x cfg" in result.stdout
    with Image.open(tmp_path / "sheet.png") as sheet:
        left, top = _margins(sheet)
        assert left > 0 and top > 0
        assert sheet.size == (left + 3 * 64, top + 2 * 64)
        pixels = np.asarray(sheet.convert("RGB"))
    column_labels = pixels[:top, left:]
    row_labels = pixels[top:, :left]
    assert (column_labels < 128).any() and (row_labels < 128).any(), "the label bands hold text"
    # the cell for steps 20, cfg 7.5 holds its image's colour
    assert tuple(pixels[top + 64 + 32, left + 64 + 32]) == (100, 150, 100)


def _margins(sheet: Image.Image) -> tuple[int, int]:
    """The label margins, found as the first column and row of the cell backgrounds/images."""
    pixels = np.asarray(sheet.convert("RGB")).astype(int)
    not_white = (pixels != 255).any(axis=2)
    h, w = not_white.shape
    # cells fill the bottom-right corner: walk up and left from it while the pixels are not background white
    left = w - 1
    while left > 0 and not_white[h - 1, left - 1]:
        left -= 1
    top = h - 1
    while top > 0 and not_white[top - 1, w - 1]:
        top -= 1
    return left, top


def test_axes_named_by_hand_and_the_sweep_record_come_first(tmp_path):
    sweep_folder(tmp_path)
    pictures, _ = read_pictures(tmp_path)
    assert choose_axes(pictures) == ["steps", "cfg"]
    assert choose_axes(pictures, ["cfg", "steps"]) == ["cfg", "steps"]
    swept = tmp_path / "swept"
    for index, (steps, cfg) in enumerate([(2, 3), (2, 5), (4, 3), (4, 5)]):
        write_output(swept / f"{index}.png", seed=index, steps=steps, cfg=cfg, sweep={"cfg": cfg, "steps": steps})
    pictures, _ = read_pictures(swept)
    assert choose_axes(pictures) == ["cfg", "steps"]  # the sweep's order, though the seed varies too
    bad = run_cli("grid", swept, "-o", tmp_path / "x.png", "--x", "nope")
    assert bad.exit_code == 2 and "no image records a parameter 'nope'" in bad.output


def test_a_third_axis_gives_separate_sheets(tmp_path):
    sweep_folder(tmp_path / "out", z_values=("ddim", "euler"))
    result = draw_grid(tmp_path / "out", tmp_path / "sheet.png", cell=32)
    assert result.axes == ["steps", "cfg", "sampler"]
    assert sorted(sheet.path.name for sheet in result.sheets) == ["sheet-ddim.png", "sheet-euler.png"]
    assert not (tmp_path / "sheet.png").exists()
    for sheet in result.sheets:
        with Image.open(sheet.path) as image:
            assert image.size == (sheet.left + 3 * 32, sheet.top + 2 * 32)
            title = np.asarray(image.convert("L"))[: sheet.top // 2]
            assert (title < 128).any(), "the sheet's title names its sampler"


def test_named_axes_keep_their_places_when_an_earlier_one_is_not_named(tmp_path):
    sweep_folder(tmp_path / "out", z_values=("ddim", "euler"))
    pictures, _ = read_pictures(tmp_path / "out")
    assert choose_axes(pictures, [None, "steps", None]) == [None, "steps"]
    assert choose_axes(pictures, ["cfg", None, "steps"]) == ["cfg", None, "steps"]
    down = draw_grid(tmp_path / "out", tmp_path / "down.png", y="steps", cell=32)
    assert [(sheet.columns, sheet.rows) for sheet in down.sheets] == [(1, 3)]
    result = run_cli("grid", tmp_path / "out", "-o", tmp_path / "z.png", "--x", "cfg", "--z", "sampler", "--cell", 32)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("(2x1 cells; cfg x - x sampler)") == 2


def test_z_values_that_make_the_same_file_name_get_sheets_of_their_own(tmp_path):
    prompts = ["a red circle!", "a red circle?", "A red circle!", "x" * 70 + "1", "x" * 70 + "2", "plain"]
    for index, prompt in enumerate(prompts):
        write_output(tmp_path / "out" / f"{index}.png", steps=10, prompt=prompt)
    result = draw_grid(tmp_path / "out", tmp_path / "sheet.png", x="steps", y="seed", z="prompt", cell=32)
    names = [sheet.path.name.casefold() for sheet in result.sheets]
    assert len(set(names)) == len(prompts), names
    assert all(sheet.path.is_file() for sheet in result.sheets)
    assert "sheet-plain.png" in names  # a name that clashes with none stays readable


@pytest.mark.parametrize(("name", "written", "kind"), [("sheet.jpg", "sheet.jpg", "JPEG"), ("s.WEBP", "s.WEBP", "WEBP"),
                                                      ("s.tif", "s.tif", "TIFF"), ("sheet", "sheet.png", "PNG")])
def test_the_sheet_is_encoded_as_its_extension_says(tmp_path, name, written, kind):
    sweep_folder(tmp_path / "out")
    result = run_cli("grid", tmp_path / "out", "-o", tmp_path / name, "--cell", 32)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / written) as sheet:
        assert sheet.format == kind
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["out", written])


def test_a_sheet_name_ldmtool_cannot_encode_is_a_one_line_usage_error(tmp_path):
    sweep_folder(tmp_path / "out")
    result = run_cli("grid", tmp_path / "out", "-o", tmp_path / "sheet.gif", "--cell", 32)
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "sheet.gif: ldmtool cannot write '.gif' images; use .png, .jpg, .webp or .tif" in result.output
    assert not (tmp_path / "sheet.gif").exists()


def test_images_without_recipes_and_crowded_cells_are_noted(tmp_path):
    write_output(tmp_path / "a.png", seed=1, steps=10)
    write_output(tmp_path / "b.png", seed=1, steps=20)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    result = draw_grid(tmp_path, tmp_path / "sheet.png", x="steps")
    assert any("without an ldmtool recipe" in note for note in result.notes)
    write_output(tmp_path / "c.png", seed=2, steps=20)
    result = draw_grid(tmp_path, tmp_path / "sheet2.png", x="steps")
    assert any("share a grid cell" in note for note in result.notes)


@pytest.mark.parametrize("name", ["grey16.png", "grey16.tif"])
def test_a_16_bit_grey_image_keeps_its_tones_in_its_cell(tmp_path, name):
    ramp = np.linspace(0.0, 1.0, 48 * 48, dtype=np.float32).reshape(48, 48)
    metadata = build_metadata(command="superres", params={"scale": 2}, seed=1, argv=["ldmtool"])
    write_image(tmp_path / name, ramp, metadata=metadata, bit_depth=16, grey=True)
    with Image.open(tmp_path / name) as written:
        assert written.mode.startswith("I")
    cell = thumbnail(tmp_path / name, 32)
    assert cell is not None and cell.mode == "RGB"
    assert abs(np.asarray(cell).mean() - 127.5) < 4  # not clipped to white


MEMORY = textwrap.dedent("""
    import json, resource, sys, tracemalloc
    from pathlib import Path
    from ldmtool.io.contact_sheet import draw_grid
    tracemalloc.start()
    draw_grid(Path(sys.argv[1]), Path(sys.argv[2]), cell=32)
    peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"peak": peak, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def test_memory_stays_bounded_with_many_large_images(tmp_path):
    """60 images of 1024x1024 (3 MiB each decoded, 180 MiB together): drawing them holds one at a time."""
    folder = tmp_path / "many"
    for index in range(60):
        write_output(folder / f"{index:03d}.png", seed=index, size=1024, steps=index % 10, cfg=index // 10,
                     colour=(index * 4, 0, 0))
    few = tmp_path / "few"
    for index in range(2):
        write_output(few / f"{index:03d}.png", seed=index, size=1024, steps=index, cfg=1, colour=(0, 0, 0))

    def measure(source: Path) -> dict:
        out = subprocess.run([sys.executable, "-c", MEMORY, str(source), str(tmp_path / f"{source.name}.png")],
                             capture_output=True, text=True, timeout=300, check=True)
        return json.loads(out.stdout.splitlines()[-1])

    many, two = measure(folder), measure(few)
    assert many["peak"] < 8 * 2**20, many  # Python-side: recipes only, no image bytes kept
    assert many["rss"] - two["rss"] < 40 * 2**10, (many, two)  # ru_maxrss in KiB: < 40 MiB for 58 more images


def test_a_sweep_on_the_shipped_default_is_drawn_with_its_axes(tmp_path):
    out = tmp_path / "sweep"
    result = run_cli("txt2img", "--prompt", "a red circle", "-W", 64, "-H", 64, "--seed", 4, "--quiet", "--sweep",
                     "steps=1,2", "--sweep", "cfg=1,3", "-o", out)
    assert result.exit_code == 0, result.output
    result = run_cli("grid", out, "-o", tmp_path / "sheet.png", "--cell", 64)
    assert result.exit_code == 0, result.output
    assert "2x2 cells; steps x cfg" in result.stdout
    with Image.open(tmp_path / "sheet.png") as sheet:
        left, top = _margins(sheet)
        assert sheet.size == (left + 2 * 64, top + 2 * 64)
        labels = np.asarray(sheet.convert("RGB"))[:top, left:]
    assert (labels < 128).any(), "the steps values are drawn above the columns"


@pytest.mark.parametrize(("name", "cell", "said"), [("sheet.png", 40000, "more than the 268.4 MP a sheet may have"),
                                                    ("sheet.webp", 6000, "webp images hold at most 16383 pixels")])
def test_a_sheet_too_large_to_draw_or_encode_is_refused_before_it_is_drawn(tmp_path, name, cell, said):
    """--cell 40000 over six images allocated a 120000x80000 sheet (MemoryError, or the OOM killer); a WebP
    sheet over 16383 pixels a side failed in the encoder with a traceback."""
    sweep_folder(tmp_path / "out")
    result = run_cli("grid", tmp_path / "out", "-o", tmp_path / name, "--cell", cell)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and said in result.output
    assert "--cell" in result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
