"""Surprises of issue 16 (item 4): each behaviour a user would not expect, pinned down."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clirun import run_cli
from ldmtool.checkpoints.tiny import save_tiny_checkpoint
from ldmtool.errors import UsageError
from ldmtool.io.discover import Item, discover
from ldmtool.io.outputs import OutputSpec, plan_outputs
from ldmtool.pipelines.layout2img import layout_output_size
from ldmtool.pipelines.text import read_prompts


def _png(path: Path, size=(8, 8), colour=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, colour).save(path)
    return path


# ---------------------------------------------------------------- 1. the named mask wins


def test_explicit_mask_wins_over_the_mask_beside_the_image(tmp_path):
    image = _png(tmp_path / "img.png")
    _png(tmp_path / "img_mask.png", colour=255)
    left = _png(tmp_path / "left.png", colour=255)
    (item,) = discover([str(image), str(left)], pair_masks=True).items
    assert item.path == image and item.mask == left


def test_two_images_with_their_own_masks_stay_two_items(tmp_path):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    _png(tmp_path / "a_mask.png"), _png(tmp_path / "b_mask.png")
    items = discover([str(a), str(b)], pair_masks=True).items
    assert [(i.path, i.mask) for i in items] == [(a, tmp_path / "a_mask.png"), (b, tmp_path / "b_mask.png")]


# ---------------------------------------------------------------- 2. collisions recommend a stable field


def test_name_collision_recommends_a_stable_field(tmp_path):
    a, b = _png(tmp_path / "photo.png"), _png(tmp_path / "sub" / "photo.png")
    items = [Item(key="photo.png", stem="photo", path=a), Item(key="sub/photo.png", stem="photo", path=b)]
    with pytest.raises(UsageError) as caught:
        plan_outputs(items, [1, 2], OutputSpec(tmp_path / "out", template="x.{ext}"))
    message = str(caught.value)
    assert "add {seed} to --name" in message and "add {index}" not in message
    assert "{index} is the position in the run and renumbers" in message
    assert plan_outputs(items, [1, 2], OutputSpec(tmp_path / "out", template="{stem}-{seed}"))[0].name == "photo-1.png"


# ---------------------------------------------------------------- 3. prompt-file fields as documented


@pytest.mark.parametrize("size", ['"96x64"', "[96, 64]", '" 96 X 64 "'])
def test_a_prompt_line_takes_size(tmp_path, size):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(f'{{"prompt": "a fox", "size": {size}}}\n')
    (spec,) = read_prompts(None, prompts)
    assert (spec.width, spec.height) == (96, 64) and spec.overrides() == {"width": 96, "height": 64}


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "size": "big"}', "'size' must be \"WxH\" or [width, height], not 'big'"),
    ('{"prompt": "x", "size": [0, 64]}', "'width' must be at least 1"),
    ('{"prompt": "x", "size": "64x64", "width": 64}', "give either 'size' or 'width'/'height', not both"),
])
def test_a_bad_size_names_its_line(tmp_path, line, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(line + "\n")
    with pytest.raises(UsageError, match=re.escape(f"{prompts}:1: {message}")):
        read_prompts(None, prompts)


def test_a_json_line_in_a_plain_prompt_file_is_refused(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text('a red fox\n# a comment\n{"prompt": "a blue fox", "seed": 3}\n{red|blue} car\n')
    with pytest.raises(UsageError) as caught:
        read_prompts(None, prompts)
    assert str(caught.value) == (f"{prompts}:3: a JSON line in a plain prompt file (line 1 is plain text); "
                                 "write every line as JSON, or name the file .jsonl")
    prompts.write_text("a red fox\n{red|blue} car\n")
    assert [spec.prompt for spec in read_prompts(None, prompts)] == ["a red fox", "{red|blue} car"]


# ---------------------------------------------------------------- 4. a layout's size is the output size


@pytest.fixture(scope="module")
def layout_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "layout.safetensors"
    save_tiny_checkpoint(path, "ldm-layout2img-openimages256", seed=3, with_config=True)
    return path


def test_the_layout_size_is_the_output_size(tmp_path, layout_model):
    layout = tmp_path / "wide.json"
    layout.write_text(json.dumps({"size": [96, 48], "objects": [{"label": "Car", "box": [8, 8, 40, 40]}]}))
    for name, extra in (("own", ()), ("given", ("--width", "64", "--height", "64")), ("wide", ("--width", "64",))):
        result = run_cli("layout2img", layout, "--model", layout_model, "--steps", "1", "--quiet", "--seed", "1",
                         "-o", tmp_path / f"{name}.png", *extra)
        assert result.exit_code == 0, result.output
    sizes = {name: Image.open(tmp_path / f"{name}.png").size for name in ("own", "given", "wide")}
    assert sizes == {"own": (96, 48), "given": (64, 64), "wide": (64, 32)}
    from ldmtool.pipelines.engine import Engine, ModelChoice, SamplingChoice
    from ldmtool.pipelines.layout2img import Layout2ImgTask, find_layouts

    task = Layout2ImgTask(Engine(ModelChoice(model=str(layout_model), device="cpu"), SamplingChoice(steps=1)))
    task.open()
    assert [task.planned_size(item) for item in find_layouts([str(layout)])] == [(96, 48)]


def test_layout_output_size_rules():
    assert layout_output_size((96.0, 48.0), None, None, (64, 64)) == (96, 48)
    assert layout_output_size((96.0, 48.0), None, 32, (64, 64)) == (64, 32)
    assert layout_output_size(None, 128, None, (64, 64)) == (128, 64)
    assert layout_output_size(None, None, None, (64, 64)) == (64, 64)


# ---------------------------------------------------------------- 5. models list: shipped apart from presets


def test_models_list_groups_shipped_models_apart_from_presets():
    result = run_cli("models", "list")
    assert result.exit_code == 0, result.output
    shipped_part, presets_part = result.stdout.split("Presets (architecture only")
    assert shipped_part.startswith("Shipped models (trained, with weights")
    shipped = [line.split()[0] for line in shipped_part.splitlines()[1:]]
    presets = [line.split()[0] for line in presets_part.splitlines()[1:]]
    assert "default-superres" in shipped and "default-superres" not in presets
    assert "ldm-bsr-sr" in presets and not set(shipped) & set(presets)
    assert next(line for line in shipped_part.splitlines() if line.split()[0] == "default-superres").split()[1] == "superres"
    data = json.loads(run_cli("models", "list", "--json").stdout)
    assert {p["name"] for p in data["presets"] if p["shipped"]} == {m["name"] for m in data["shipped"]}
    assert all(m["task"] and m["description"] for m in data["shipped"])


# ---------------------------------------------------------------- 6. detection reads ldmtool's own recipe first


def test_detection_reads_ldmtools_recipe_before_key_shapes(tmp_path):
    converted = tmp_path / "sr.safetensors"
    assert run_cli("models", "convert", "default-superres", converted).exit_code == 0
    for source in ("default-superres", converted):
        result = run_cli("models", "inspect", source, "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["detected_family"] == "default-superres" and report["detected_alternatives"] == []


# ---------------------------------------------------------------- 8. superres alpha without Lanczos ringing


def test_superres_alpha_stays_transparent_where_the_input_is(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 128
    rgba[8:, :, 3] = 255  # top half fully transparent, bottom half opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    result = run_cli("superres", tmp_path / "half.png", "--steps", "1", "--quiet", "-o", tmp_path / "big.png")
    assert result.exit_code == 0, result.output
    alpha = np.asarray(Image.open(tmp_path / "big.png"))[..., 3]
    assert alpha.shape == (64, 64)
    assert (alpha[:28] == 0).all() and (alpha[36:] == 255).all()  # Lanczos rang to 10 in rows 22-25 and 249 below


# ---------------------------------------------------------------- 9. shipped models warn once past what they know


def _warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("ldmtool: warning:")]


def test_a_prompt_word_outside_the_vocabulary_warns_once_per_run(tmp_path):
    run = ("txt2img", "--steps", "1", "--n", "2", "--seed", "1", "--overwrite")
    result = run_cli(*run, "--prompt", "a red dragon above a blue square", "-o", tmp_path / "dragon")
    assert result.exit_code == 0, result.output
    assert _warnings(result) == [
        "ldmtool: warning: default-txt2img knows only the words of its training captions (a above below blue "
        "circle green left of orange purple red right square triangle yellow); dragon will have little effect"]
    known = run_cli(*run, "--prompt", "a red circle left of a blue square", "-o", tmp_path / "known")
    assert known.exit_code == 0 and _warnings(known) == []


def test_the_vocabulary_warning_stays_short_for_a_prompt_without_spaces(tmp_path):
    prompt = "红色的圆" * 200  # one "word" of 800 characters
    result = run_cli("txt2img", "--steps", "1", "--seed", "1", "--prompt", prompt, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    (warning,) = _warnings(result)
    assert len(warning) < 250 and warning.endswith("; " + "红色的圆" * 7 + "红… will have little effect")


def test_a_size_past_twice_the_trained_one_warns_once_per_run(tmp_path):
    run = ("sample", "--steps", "1", "--n", "2", "--seed", "1", "--height", "64")
    result = run_cli(*run, "--width", "192", "-o", tmp_path / "wide")
    assert result.exit_code == 0, result.output
    assert _warnings(result) == ["ldmtool: warning: 192x64 is more than twice the 64x64 that default-sample was "
                                 "trained at; expect repeated or broken structure"]
    assert _warnings(run_cli(*run, "--width", "128", "-o", tmp_path / "fine")) == []
