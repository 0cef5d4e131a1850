"""Issue 15: seeds as users mean them, resume that knows what it resumes, and `ldmtool replay`.

Resume rules are driven through the model-free `_invert` command (fast) and through real models where the
identity must include the model and its options (a tiny SD 1.x checkpoint, and the shipped defaults on
small crops of the examples, as the README's commands run them).
"""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmtool.checkpoints.tiny import save_tiny_checkpoint
from ldmtool.io.manifest import MANIFEST_NAME, read_manifest
from ldmtool.runtime.seeds import derive_seed
from test_runner_cli import _save, events, item_events, ldmtool

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _recipe(path):
    with Image.open(path) as image:
        return json.loads(image.info["ldmtool"]), image.info["parameters"]


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "sd1.safetensors"
    save_tiny_checkpoint(path, "sd1", seed=1, with_config=True)
    return path


def _txt2img(cwd, *args):
    return ldmtool("txt2img", *args, "--steps", 2, "--sampler", "euler", "-W", 64, "-H", 64, "--json", cwd=cwd)


# ---------------------------------------------------------------- seeds


def test_seed_n_is_the_first_prompt_items_seed_and_later_ones_count_up(tmp_path, sd1):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\na blue bird\n")
    result = _txt2img(tmp_path, "--prompts", prompts, "--n", 2, "--model", sd1, "-o", "out", "--seed", 42)
    assert result.returncode == 0, result.stderr
    seeds = {Path(e["output"]).name: e["seed"] for e in item_events(result)}
    assert seeds == {"0000-0-a-red-fox.png": 42, "0000-1-a-red-fox.png": 43,
                     "0001-0-a-blue-bird.png": 44, "0001-1-a-blue-bird.png": 45}
    for name, seed in seeds.items():
        recipe, parameters = _recipe(tmp_path / "out" / name)
        assert recipe["seed"] == seed and f"Seed: {seed}," in parameters


def test_the_recorded_seed_reproduces_a_prompt_item_alone(tmp_path, sd1):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\na blue bird\n")
    assert _txt2img(tmp_path, "--prompts", prompts, "--model", sd1, "-o", "all", "--seed", 7).returncode == 0
    recorded = _recipe(tmp_path / "all" / "0001-0-a-blue-bird.png")[0]["seed"]
    assert recorded == 8
    alone = _txt2img(tmp_path, "--prompt", "a blue bird", "--model", sd1, "-o", "one.png", "--seed", recorded)
    assert alone.returncode == 0, alone.stderr
    assert np.array_equal(_pixels(tmp_path / "one.png"), _pixels(tmp_path / "all" / "0001-0-a-blue-bird.png"))


def test_a_json_lines_own_seed_names_its_file(tmp_path, sd1):
    """The `{seed}` in a name is the seed the image was made with, also for a JSON line's own seed."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a fox", "seed": 777}\n{"prompt": "a bird"}\n')
    result = _txt2img(tmp_path, "--prompts", prompts, "--n", 2, "--model", sd1, "-o", "out", "--seed", 5,
                      "--name", "{index}_{seed}.{ext}")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["0_777.png", "1_778.png", "2_7.png", "3_8.png"]
    assert _recipe(tmp_path / "out" / "1_778.png")[0]["seed"] == 778


def test_file_items_derive_their_seed_and_item_seed_reproduces_one(tree_and_more):
    cwd = tree_and_more
    result = ldmtool("_invert", "in", "-o", "out", "--seed", 3, "--json", cwd=cwd)
    seeds = {e["key"]: e["seed"] for e in item_events(result)}
    assert seeds == {key: derive_seed(3, key) for key in ("a.png", "b.png")}
    again = ldmtool("_invert", "in/b.png", "-o", "b.png", "--item-seed", seeds["b.png"], "--json", cwd=cwd)
    assert item_events(again)[0]["seed"] == seeds["b.png"]
    assert _recipe(cwd / "b.png")[0]["seed"] == _recipe(cwd / "out" / "b.png")[0]["seed"]


@pytest.fixture
def tree_and_more(tmp_path):
    _save(tmp_path / "in" / "a.png", (10, 20, 30))
    _save(tmp_path / "in" / "b.png", (200, 0, 0))
    return tmp_path


@pytest.mark.parametrize("seed_args", [(), ("--seed", "-1")])
def test_without_a_seed_a_rerun_adopts_the_same_jobs_seed_and_resumes(tree_and_more, seed_args):
    cwd = tree_and_more
    first = ldmtool("_invert", "in", "-o", "out", "--json", *seed_args, cwd=cwd)
    base = events(first)[-1]["seed"]
    (cwd / "out" / "a.png").unlink()
    second = ldmtool("_invert", "in", "-o", "out", "--json", *seed_args, cwd=cwd)
    assert second.returncode == 0, second.stderr
    assert events(second)[-1]["seed"] == base
    assert sorted(e["event"] for e in item_events(second)) == ["done", "skipped"]
    other_job = ldmtool("_invert", "in", "-o", "out", "--invert-mask", "--json", "--existing", "skip", cwd=cwd)
    assert events(other_job)[-1]["seed"] != base  # another job: its own random seed


def test_seed_out_of_range_is_a_usage_error(tmp_path):
    result = ldmtool("_invert", "in", "--seed", -2, cwd=tmp_path)
    assert result.returncode == 2


# ---------------------------------------------------------------- resume


def _outcomes(result):
    return {Path(e["output"]).name: e["event"] for e in item_events(result)}


def test_another_jobs_output_fails_the_item_with_the_difference_and_the_way_out(tree_and_more):
    cwd = tree_and_more
    assert ldmtool("_invert", "in", "-o", "out", "--seed", 1, cwd=cwd).returncode == 0
    before = _pixels(cwd / "out" / "a.png")
    result = ldmtool("_invert", "in", "-o", "out", "--seed", 1, "--invert-mask", "--json", cwd=cwd)
    assert result.returncode == 1
    assert _outcomes(result) == {"a.png": "failed", "b.png": "failed"}
    line = [e["error"] for e in item_events(result)][0]
    assert "out/a.png was written by another job: --invert-mask differs (false, this run true)" in line
    assert "--overwrite" in line and "--existing skip" in line
    assert np.array_equal(_pixels(cwd / "out" / "a.png"), before)  # nothing was replaced
    other_seed = ldmtool("_invert", "in", "-o", "out", "--seed", 2, "--json", cwd=cwd)
    assert "its seed differs" in item_events(other_seed)[0]["error"]


def test_an_option_given_as_the_models_default_is_the_same_job_both_ways(tmp_path):
    """`-W 64 -H 64 --sampler ddim --cfg 1` on the shipped txt2img model (whose defaults they are) compute the
    pixels of those options left out: a rerun spelled the other way skips the outputs and adopts the seed (a
    cron line that adds them); another value still fails its item naming the option."""
    base = ("txt2img", "--prompt", "a red circle", "--steps", 1, "--json")
    explicit = ("-W", 64, "-H", 64, "--sampler", "ddim", "--cfg", 1)
    seeds = {}
    for first, second, folder in (((), explicit, "left-out"), (explicit, (), "given")):
        done = ldmtool(*base, *first, "-o", folder, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        again = ldmtool(*base, *second, "-o", folder, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert _outcomes(again) == {"0000-0-a-red-circle.png": "skipped"}
        seeds[folder] = events(done)[-1]["seed"]
        assert events(again)[-1]["seed"] == seeds[folder]
    wider = ldmtool(*base, "-W", 128, "-o", "left-out", cwd=tmp_path)
    assert wider.returncode == 1
    assert "was written by another job: --width differs (64, this run 128)" in wider.stderr
    assert events(wider)[-1]["seed"] != seeds["left-out"]  # another job: not the folder's seed


def test_a_changed_input_file_is_another_job(tree_and_more):
    cwd = tree_and_more
    assert ldmtool("_invert", "in", "-o", "out", "--seed", 1, cwd=cwd).returncode == 0
    _save(cwd / "in" / "a.png", (99, 99, 99))
    result = ldmtool("_invert", "in", "-o", "out", "--seed", 1, "--json", cwd=cwd)
    assert _outcomes(result) == {"a.png": "failed", "b.png": "skipped"}
    assert "its input file differs" in item_events(result)[0]["error"]


def test_existing_policies_for_files_without_a_recipe(tree_and_more):
    cwd = tree_and_more
    _save(cwd / "out" / "a.png", (1, 1, 1))  # another tool's file
    check = ldmtool("_invert", "in", "-o", "out", "--seed", 1, "--json", cwd=cwd)
    assert check.returncode == 1 and _outcomes(check) == {"a.png": "failed", "b.png": "done"}
    assert "has no ldmtool recipe" in item_events(check)[0]["error"]
    skip = ldmtool("_invert", "in", "-o", "out", "--seed", 1, "--json", "--existing", "skip", cwd=cwd)
    assert skip.returncode == 0 and _outcomes(skip) == {"a.png": "skipped", "b.png": "skipped"}
    assert _pixels(cwd / "out" / "a.png")[0, 0].tolist() == [1, 1, 1]
    overwrite = ldmtool("_invert", "in", "-o", "out", "--seed", 1, "--json", "--existing", "overwrite", cwd=cwd)
    assert _outcomes(overwrite) == {"a.png": "done", "b.png": "done"}
    assert _pixels(cwd / "out" / "a.png")[0, 0].tolist() == [245, 235, 225]


def test_empty_and_cut_short_outputs_are_redone(tree_and_more):
    cwd = tree_and_more
    assert ldmtool("_invert", "in", "-o", "out", "--seed", 1, "--json", cwd=cwd).returncode == 0
    (cwd / "out" / "a.png").write_bytes(b"")
    whole = (cwd / "out" / "b.png").read_bytes()
    (cwd / "out" / "b.png").write_bytes(whole[: len(whole) // 2])
    result = ldmtool("_invert", "in", "-o", "out", "--seed", 1, "--json", cwd=cwd)
    assert result.returncode == 0 and _outcomes(result) == {"a.png": "done", "b.png": "done"}
    assert (cwd / "out" / "b.png").read_bytes() == whole


def test_a_jpeg_whose_recipe_was_compressed_is_still_this_jobs_output(tmp_path, sd1):
    """A long non-ASCII prompt's recipe does not fit JPEG's EXIF plainly and is stored compressed: the output
    is written, and a rerun (with or without the seed) recognises it and skips it."""
    prompt = "红色的圆, " * 1200
    first = _txt2img(tmp_path, "--prompt", prompt, "--model", sd1, "-o", "out", "--format", "jpg", "--seed", 5)
    assert first.returncode == 0, first.stderr
    output = Path(item_events(first)[0]["output"])
    with Image.open(tmp_path / output) as image:
        assert image.getexif()[0x010E].startswith("ldmtool-recipe-zlib:")
    for seed_args in (("--seed", 5), ()):
        again = _txt2img(tmp_path, "--prompt", prompt, "--model", sd1, "-o", "out", "--format", "jpg", *seed_args)
        assert again.returncode == 0 and [e["event"] for e in item_events(again)] == ["skipped"], again.stderr


def test_output_folder_equal_to_the_input_folder_is_a_usage_error(tree_and_more):
    result = ldmtool("_invert", "in", "-o", "in", cwd=tree_and_more)
    assert result.returncode == 2
    assert "its output would replace the input itself" in result.stderr


def test_overwrite_and_existing_contradicting_is_a_usage_error(tree_and_more):
    result = ldmtool("_invert", "in", "--overwrite", "--existing", "skip", cwd=tree_and_more)
    assert result.returncode == 2 and "contradict" in result.stderr


def test_manifest_records_name_the_run(tree_and_more):
    cwd = tree_and_more
    ldmtool("_invert", "in", "-o", "out", "--seed", 1, cwd=cwd)
    ids = {record["run_id"] for record in read_manifest(cwd / "out" / MANIFEST_NAME)}
    assert len(ids) == 1 and _recipe(cwd / "out" / "a.png")[0]["run_id"] in ids


def _photo_crop(path: Path, source: Path, box=(20, 10, 44, 34)) -> Path:
    with Image.open(source) as image:
        image.convert("RGB").crop(box).save(path)
    return path


def test_readme_superres_then_inpaint_into_one_folder_stops_with_a_clear_message(tmp_path):
    """The shipped defaults, as the README's sequence runs them (small crops, few steps)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo_crop(photos / "coffee.png", EXAMPLES / "photos" / "cups.png")  # the same name as the inpaint input
    pair = tmp_path / "inpaint"
    pair.mkdir()
    _photo_crop(pair / "coffee.png", EXAMPLES / "inpaint" / "coffee.png")
    _photo_crop(pair / "coffee_mask.png", EXAMPLES / "inpaint" / "coffee_mask.png")
    superres = ldmtool("superres", "photos", "--scale", 4, "-o", "out", "--steps", 1, "--json", cwd=tmp_path)
    assert superres.returncode == 0, superres.stderr
    inpaint = ldmtool("inpaint", "inpaint", "-o", "out", "--steps", 1, "--json", cwd=tmp_path)
    assert inpaint.returncode == 1
    assert "its command differs (superres, this run inpaint)" in item_events(inpaint)[0]["error"]
    more_steps = ldmtool("superres", "photos", "--scale", 4, "-o", "out", "--steps", 2, "--json", cwd=tmp_path)
    assert more_steps.returncode == 1
    assert "--steps differs (1, this run 2)" in item_events(more_steps)[0]["error"]
    same = ldmtool("superres", "photos", "--scale", 4, "-o", "out", "--steps", 1, "--json", cwd=tmp_path)
    assert same.returncode == 0 and _outcomes(same) == {"coffee.png": "skipped"}


# ---------------------------------------------------------------- replay


def test_replay_reproduces_outputs_bit_for_bit(tmp_path, sd1):
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo_crop(photos / "boats.png", EXAMPLES / "photos" / "boats.png")
    _photo_crop(tmp_path / "coffee.png", EXAMPLES / "inpaint" / "coffee.png")
    _photo_crop(tmp_path / "coffee_mask.png", EXAMPLES / "inpaint" / "coffee_mask.png")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a fox", "cfg": 3.0}\n')
    runs = [("superres", "photos", "--scale", 4, "--steps", 1, "-o", "out"),
            ("inpaint", "coffee.png", "--steps", 1, "-o", "out"),
            ("txt2img", "--prompts", prompts, "--model", sd1, "--steps", 2, "-W", 64, "-H", 64, "-o", "out")]
    for args in runs:
        assert ldmtool(*args, cwd=tmp_path).returncode == 0
    prompts.unlink()  # a prompt item carries its line: the file is not needed to replay it
    outputs = sorted((tmp_path / "out").glob("*.png"))
    assert len(outputs) == 3
    result = ldmtool("replay", *outputs, "--json", "--verify", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for event, original in zip(events(result), outputs):
        replayed = original.with_name(f"{original.stem}.replay.png")
        assert event == {"event": "replayed", "file": str(original), "output": str(replayed), "identical": True,
                         "max_difference": 0, "reasons": []}
        assert np.array_equal(_pixels(replayed), _pixels(original))
        assert _recipe(replayed)[0]["job"] == _recipe(original)[0]["job"]


def test_replay_says_when_pixels_differ_and_verify_fails(tmp_path, sd1):
    assert _txt2img(tmp_path, "--prompt", "a fox", "--model", sd1, "-o", "a.png", "--seed", 1).returncode == 0
    with Image.open(tmp_path / "a.png") as image:
        info = image.info
        pixels = np.asarray(image).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    from PIL.PngImagePlugin import PngInfo

    chunks = PngInfo()
    for key in ("parameters", "ldmtool"):
        chunks.add_text(key, info[key])
    Image.fromarray(pixels).save(tmp_path / "a.png", pnginfo=chunks)
    plain = ldmtool("replay", "a.png", "-o", "again", cwd=tmp_path)
    assert plain.returncode == 0
    assert "/255: nothing the recipes record differs" in plain.stderr
    assert (tmp_path / "again" / "a.png").is_file()
    assert ldmtool("replay", "a.png", "-o", "again", "--verify", cwd=tmp_path).returncode == 1


def _rewrite(path, recipe=None, flip_pixel=True):
    """Save `path` again with one pixel changed and, if given, another recipe (its text chunks kept)."""
    from PIL.PngImagePlugin import PngInfo

    with Image.open(path) as image:
        info, pixels = dict(image.info), np.asarray(image).copy()
    if flip_pixel:
        pixels[0, 0] = 255 - pixels[0, 0]
    chunks = PngInfo()
    chunks.add_text("parameters", info["parameters"])
    chunks.add_text("ldmtool", json.dumps(recipe) if recipe is not None else info["ldmtool"])
    Image.fromarray(pixels).save(path, pnginfo=chunks)


def test_replay_names_a_model_file_changed_in_place(tmp_path):
    model = tmp_path / "m.safetensors"
    save_tiny_checkpoint(model, "sd1", seed=1, with_config=True)
    assert _txt2img(tmp_path, "--prompt", "a fox", "--model", model, "-o", "a.png", "--seed", 1).returncode == 0
    recorded = _recipe(tmp_path / "a.png")[0]["model_sha256"]
    save_tiny_checkpoint(model, "sd1", seed=2, with_config=True)  # same name, other weights
    result = ldmtool("replay", "a.png", "-o", "again", "--json", cwd=tmp_path)
    (event,) = events(result)
    now = _recipe(tmp_path / "again" / "a.png")[0]["model_sha256"]
    assert event["max_difference"] > 0
    assert event["reasons"] == [f"its model file differs ({recorded[:10]}, this run {now[:10]})"]


def test_replay_names_the_machine_that_wrote_a_file_when_pixels_differ(tmp_path, sd1):
    assert _txt2img(tmp_path, "--prompt", "a fox", "--model", sd1, "-o", "a.png", "--seed", 1).returncode == 0
    recipe = _recipe(tmp_path / "a.png")[0]
    here = dict(recipe["machine"])
    assert here["torch"] and here["cpu"]  # what this machine is, recorded with every output
    elsewhere = "AVX512" if here["cpu"] != "AVX512" else "AVX2"  # another kernel set than this machine's
    recipe["machine"] = {**here, "torch": "2.0.0+cpu", "cpu": elsewhere}
    recipe["version"] = "0.0.9"
    _rewrite(tmp_path / "a.png", recipe)
    result = ldmtool("replay", "a.png", "-o", "again", cwd=tmp_path)
    assert result.returncode == 0
    version = _recipe(tmp_path / "again" / "a.png")[0]["version"]
    assert (f"/255: written by ldmtool 0.0.9, replayed by {version}; written on another machine "
            f"(cpu {elsewhere}, now {here['cpu']}; torch 2.0.0+cpu, now {here['torch']})") in result.stderr


def test_replay_of_a_file_without_a_recipe_is_one_line(tmp_path):
    _save(tmp_path / "x.png")
    result = ldmtool("replay", "x.png", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == ("ldmtool: error: x.png: no replayable ldmtool recipe in this image "
                                     "(written by another tool or an older ldmtool)")


@pytest.mark.parametrize("args, message", [
    (("out/a.png", "-o", "out"), "out/a.png: its replay would overwrite out/a.png, a file to replay"),
    (("out/a.png", "-o", "out/a.png"), "out/a.png: its replay would overwrite out/a.png, a file to replay"),
    (("out/a.png", "out/a.replay.png"), "out/a.png: its replay would overwrite out/a.replay.png, a file to replay"),
    (("out/a.png", "more/a.png", "-o", "again"),
     "more/a.png: its replay would overwrite the replay of out/a.png (again/a.png)"),
])
def test_a_replay_that_would_overwrite_a_source_or_another_replay_is_refused_first(tmp_path, args, message):
    """Else the original is lost and `--verify` compares the replay with itself."""
    for name in ("out/a.png", "out/a.replay.png", "more/a.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        _save(tmp_path / name)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*.png")}
    result = ldmtool("replay", *args, "--verify", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"ldmtool: error: {message}; " + (
        "replay them into different folders" if "the replay of" in message else "give -o another folder")
    assert {path: path.read_bytes() for path in tmp_path.rglob("*.png")} == before
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("damage, problem", [
    ({"seed": None}, "seed: missing or of the wrong type"),
    ({"seed": "abc"}, "seed: missing or of the wrong type"),
    ({"seed": True}, "seed: missing or of the wrong type"),
    ({"item": "x", "cli": []}, "item, cli: missing or of the wrong type"),
    ({"item": {"key": "a.png", "bytes": 3}}, "item: a field of the wrong type"),
    ({"item": {"key": "a.png", "input": 5}}, "item: a field of the wrong type"),
    ({"item": {"key": "a.png", "data": [1]}}, "item: a field of the wrong type"),
    ({"cli": {"batch_size": "abc"}}, "option batch_size: 'abc' is of the wrong type"),
])
def test_a_damaged_recipe_fails_its_file_in_one_line_and_the_others_replay(tree_and_more, damage, problem):
    cwd = tree_and_more
    assert ldmtool("_invert", "in", "-o", "out", "--seed", 3, cwd=cwd).returncode == 0
    from PIL.PngImagePlugin import PngInfo

    with Image.open(cwd / "out" / "a.png") as image:
        recipe = json.loads(image.info["ldmtool"])
        chunks = PngInfo()
        chunks.add_text("ldmtool", json.dumps({**recipe, **damage}))
        image.save(cwd / "bad.png", pnginfo=chunks)
    result = ldmtool("replay", "bad.png", "out/b.png", "-o", "again", cwd=cwd)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"ldmtool: error: bad.png: its ldmtool recipe is damaged ({problem})"
    assert lines[1:] == ["out/b.png -> again/b.png: identical pixels"]


def test_a_manifest_line_nested_too_deep_is_skipped_not_fatal(tree_and_more):
    """Seed adoption reads the output folder's manifest: a hostile line there must not stop a run."""
    cwd = tree_and_more
    first = ldmtool("_invert", "in", "-o", "out", "--json", cwd=cwd)
    with open(cwd / "out" / MANIFEST_NAME, "a") as manifest:
        manifest.write("[" * 100_000 + "\n")
    (cwd / "out" / "a.png").unlink()
    second = ldmtool("_invert", "in", "-o", "out", "--json", cwd=cwd)
    assert second.returncode == 0, second.stderr
    assert events(second)[-1]["seed"] == events(first)[-1]["seed"]
