"""`ldmtool semantic2img` on a tiny random semantic_synthesis256 checkpoint in the original key layout."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import ldmtool.pipelines.semantic2img as semantic
from clirun import run_cli
from ldmtool.checkpoints.tiny import save_tiny_checkpoint, tiny_model
from ldmtool.errors import UsageError

FAST = ["--steps", "2", "--sampler", "euler", "--quiet"]



@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "sem.safetensors"
    save_tiny_checkpoint(path, "ldm-semantic-synthesis256", seed=2, with_config=True)
    return path



def _run(*args):
    return run_cli("semantic2img", *args, *FAST)


def _index_map(path, size=(40, 24), ids=(156, 123, 7)):
    labels = np.full((size[1], size[0]), ids[0], np.uint8)
    labels[size[1] // 2:] = ids[1]
    labels[-4:, 4:12] = ids[2]
    Image.fromarray(labels).save(path)
    return path


SKY, GRASS = (135, 206, 235), (34, 139, 34)


def _colour_map(path, size=(32, 32)):
    rgb = np.zeros((size[1], size[0], 3), np.uint8)
    rgb[: size[1] // 2], rgb[size[1] // 2:] = SKY, GRASS
    Image.fromarray(rgb).save(path)
    return path


def test_output_has_the_map_size_or_the_requested_size(tmp_path, model):
    folder = tmp_path / "maps"
    folder.mkdir()
    _index_map(folder / "odd.png", size=(40, 24))  # not a multiple of 32: padded, then cropped back
    result = _run(folder, "--model", model, "--seed", 1, "-o", tmp_path / "native")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "native" / "odd.png") as out:
        assert out.size == (40, 24)
        recipe = json.loads(out.info["ldmtool"])
    assert recipe["command"] == "semantic2img"
    assert recipe["parameters"]["label_map_size"] == [40, 24] and recipe["parameters"]["classes"] == 182
    result = _run(folder / "odd.png", "--model", model, "--seed", 1, "--width", 96, "--height", 64,
                  "--tile", 8, "--tile-overlap", 4, "-o", tmp_path / "big.png")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "big.png") as out:
        assert out.size == (96, 64)


def test_palette_maps_colours_and_same_seed_gives_same_file(tmp_path, model):
    _colour_map(tmp_path / "scene.png")
    palette = tmp_path / "palette.yaml"
    palette.write_text('palette:\n  156: "#87ceeb"\n  123: [34, 139, 34]\n')
    for name in ("a.png", "b.png"):
        result = _run(tmp_path / "scene.png", "--palette", palette, "--model", model, "--seed", 3,
                      "-o", tmp_path / name)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    labels = semantic.read_label_map(tmp_path / "scene.png", 182, semantic.load_palette(palette))
    assert (labels[:16] == 156).all() and (labels[16:] == 123).all()


def test_the_map_conditions_the_image(tmp_path, model):
    """Same seed, different maps: different images (the concat conditioning reaches the UNet)."""
    _index_map(tmp_path / "m1.png", size=(32, 32), ids=(156, 123, 7))
    _index_map(tmp_path / "m2.png", size=(32, 32), ids=(3, 100, 50))
    for name in ("m1", "m2"):
        assert _run(tmp_path / f"{name}.png", "--model", model, "--seed", 5, "--name", "x.{ext}",
                    "-o", tmp_path / name).exit_code == 0
    assert (tmp_path / "m1" / "x.png").read_bytes() != (tmp_path / "m2" / "x.png").read_bytes()


def test_bad_maps_fail_with_one_line_naming_file_and_value(tmp_path, model):
    bad = np.full((32, 32), 10, np.uint8)
    bad[5, 7] = 200
    Image.fromarray(bad).save(tmp_path / "bad_id.png")
    _colour_map(tmp_path / "colour.png")
    palette = tmp_path / "p.yaml"
    palette.write_text('156: "#87ceeb"\n')
    result = _run(tmp_path / "bad_id.png", "--model", model, "-o", tmp_path / "o1")
    assert result.exit_code == 1
    assert "bad_id.png: class id 200 at pixel (7, 5) is not one of the model's 182 classes (0-181)" in result.output
    result = _run(tmp_path / "colour.png", "--model", model, "-o", tmp_path / "o2")
    assert result.exit_code == 1 and "colour.png: a colour label map needs --palette" in result.output
    result = _run(tmp_path / "colour.png", "--palette", palette, "--model", model, "-o", tmp_path / "o3")
    assert result.exit_code == 1
    assert "colour.png: colour #228b22 at pixel (0, 16) is not in the palette" in result.output


def test_negative_ids_and_unreadable_maps_fail_with_a_reason_in_words(tmp_path, model):
    negative = np.full((32, 32), 10, np.int32)
    negative[3, 4] = -3
    Image.fromarray(negative, "I").save(tmp_path / "negative.tif")  # a 32-bit map holds signed values
    (tmp_path / "junk.png").write_bytes(b"not an image")
    result = _run(tmp_path / "negative.tif", tmp_path / "junk.png", "--model", model, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert "negative.tif: class id -3 at pixel (4, 3) is not one of the model's 182 classes" in result.output
    assert "junk.png: cannot read the label map (not an image file" in result.output
    assert "RuntimeError" not in result.output and "object at 0x" not in result.output


@pytest.mark.parametrize("text, message", [
    ('156: "#87ceeb"\n123: "#87ceeb"\n', "classes 156 and 123 have the same colour #87ceeb"),
    ('156: "blue"\n', 'class 156: colour \'blue\' must be "#rrggbb" or [r, g, b]'),
    ("sky: [1, 2, 3]\n", "'sky' is not a class id"),
    ("156: [1, 2\n", "not valid YAML"),
    ('156: "#87ceeb"\n156: "#000000"\n', "the key 156 is given twice"),  # the last one won silently
    ("300: [1, 2, 3]\n", "class 300 is not one of the model's 182 classes"),
])
def test_bad_palettes_are_usage_errors(tmp_path, model, text, message):
    palette = tmp_path / "p.yaml"
    palette.write_text(text)
    _colour_map(tmp_path / "m.png")
    result = _run(tmp_path / "m.png", "--palette", palette, "--model", model, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert f"{palette}: " in result.output and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_onehot_conditioning_matches_the_reference_convention(monkeypatch):
    """np.eye(182)[labels] with classes as channels through the SpatialRescaler; row strips change nothing."""
    stage = tiny_model("ldm-semantic-synthesis256", seed=4).cond_stage
    labels = np.random.default_rng(0).integers(0, 182, size=(32, 24))
    onehot = torch.from_numpy(np.eye(182, dtype=np.float32)[labels]).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = stage.encode(onehot)
    whole = semantic.semantic_concat(stage, labels, 182, (8, 6), device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(whole, expected, rtol=0, atol=1e-6)
    monkeypatch.setattr(semantic, "_STRIP_ELEMENTS", 182 * 24 * 4)  # strips of 4 rows
    strips = semantic.semantic_concat(stage, labels, 182, (8, 6), device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(strips, expected, rtol=0, atol=1e-6)


def test_nearest_resize_keeps_class_ids():
    labels = np.array([[1, 2], [3, 4]])
    assert semantic.resize_labels(labels, 4, 2).tolist() == [[1, 1, 2, 2], [3, 3, 4, 4]]
    assert set(np.unique(semantic.resize_labels(labels, 7, 5))) == {1, 2, 3, 4}


def test_palette_file_must_be_a_mapping(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="maps class ids to colours"):
        semantic.load_palette(path)


def test_model_without_label_maps_is_a_usage_error(tmp_path):
    other = tmp_path / "celeba.safetensors"
    save_tiny_checkpoint(other, "ldm-celebahq256", with_config=True)
    result = _run(_index_map(tmp_path / "m.png"), "--model", other, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "takes no label maps, so it cannot do semantic2img from maps" in result.output
