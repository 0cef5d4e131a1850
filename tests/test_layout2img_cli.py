"""`ldmtool layout2img` on a tiny random layout2img-openimages256 checkpoint, and the box tokenization facts."""
import json

import pytest
from PIL import Image

from clirun import run_cli
from ldmtool.checkpoints.tiny import save_tiny_checkpoint
from ldmtool.errors import ItemError, UsageError
from ldmtool.pipelines.layout2img import Layout, find_layouts, read_layout
from ldmtool.pipelines.layout_tokens import BoxTokenizer, LayoutObject, category_number, openimages_classes

FAST = ["--steps", "2", "--sampler", "euler", "--quiet", "--width", "32", "--height", "32"]



@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "layout.safetensors"
    save_tiny_checkpoint(path, "ldm-layout2img-openimages256", seed=3, with_config=True)
    return path



def _run(*args):
    return run_cli("layout2img", *args, *FAST)


def _layout(path, objects, **extra):
    path.write_text(json.dumps({"objects": objects, **extra}))
    return path


# ---------------------------------------------------------------- reference facts


def test_class_numbers_follow_the_reference_ordering():
    """340 classes: the allow list minus the COCO-merged ids, sorted by MID, Suitcase (/m/01s55n) last."""
    classes = openimages_classes()
    assert len(classes) == 340 and [c.number for c in classes] == list(range(340))
    mids = [c.mid for c in classes]
    assert mids[:-1] == sorted(mids[:-1]) and mids[-1] == "/m/01s55n"
    merged = {"/m/03bt1vf", "/m/04yx4", "/m/05r655", "/m/01bl7v", "/m/0cnyhnx", "/m/01226z", "/m/05ctyq",
              "/m/058qzx", "/m/06pcq", "/m/03m3pdh", "/m/046dlr", "/m/0h8mzrc"}
    assert not merged & set(mids)
    assert category_number("Tortoise") == 0  # /m/011k07, the smallest MID
    assert category_number("Suitcase") == 339
    assert category_number("person") == category_number("Woman") == category_number("/m/01g317") == 37
    assert category_number("Wall clock") == category_number("Clock")


def test_box_tokens_match_the_reference_builder():
    """no_tokens 8192 → 90 sections; token = round(89 y) * 90 + round(89 x); triples padded with 8191;
    crop (0, 0, 1, 1) → tokens 0 and 8099; 30 * 3 + 2 = 92 = the cond stage's max_seq_len."""
    tok = BoxTokenizer.for_sequence(vocab_size=8192, max_seq_len=92)
    assert (tok.sections, tok.none, tok.max_objects, tok.length) == (90, 8191, 30, 92)
    person = LayoutObject(category=37, box=(0.25, 0.5, 0.75, 1.0))
    tokens = tok.tokens([person])
    # (0.25, 0.5): x 22.25 → 22, y 44.5 → 44 (round half to even, as Python's round in the reference)
    assert tokens[:3] == [37, 44 * 90 + 22, 89 * 90 + 67]
    assert tokens[3:90] == [8191] * 87 and tokens[90:] == [0, 8099] and len(tokens) == 92
    grouped = LayoutObject(category=37, box=person.box, group_of=True, occluded=True)
    assert tok.tokens([grouped])[0] == 37 + 340 * (1 | 2)
    with pytest.raises(UsageError, match="at most 30"):
        tok.tokens([person] * 31)


def test_pixel_and_relative_boxes_give_the_same_tokens(tmp_path):
    pixels = _layout(tmp_path / "p.json", [{"label": "Person", "box": [64, 128, 192, 256]}], size=[256, 256])
    relative = tmp_path / "r.yaml"
    relative.write_text("objects:\n  - label: person\n    box: [0.25, 0.5, 0.75, 1.0]\n")
    tok = BoxTokenizer()
    assert tok.tokens(read_layout(pixels, 32, 32)) == tok.tokens(read_layout(relative, 32, 32))
    # without "size", pixel boxes are measured in the output size
    plain = _layout(tmp_path / "q.json", [{"label": "Person", "box": [8, 16, 24, 32]}])
    assert read_layout(plain, 32, 32)[0].box == (0.25, 0.5, 0.75, 1.0)


def test_a_byte_order_mark_is_read_past(tmp_path):
    for name in ("bom.json", "bom.yaml"):
        text = ('{"objects": [{"label": "Tree", "box": [0.1, 0.2, 0.5, 0.6]}]}' if name.endswith("json")
                else "objects:\n  - label: Tree\n    box: [0.1, 0.2, 0.5, 0.6]\n")
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())  # as Notepad saves UTF-8
        assert read_layout(tmp_path / name, 32, 32)[0].box == (0.1, 0.2, 0.5, 0.6)

@pytest.mark.parametrize("name, text", [
    ("twice.json", '{"objects": [{"label": "Tree", "box": [0, 0, 1, 1]}], "objects": []}'),
    ("twice.yaml", "objects:\n  - {label: Tree, box: [0, 0, 1, 1]}\nobjects:\n  - {label: Building, box: [0, 0, 1, 1]}\n"),
    ("box.json", '{"objects": [{"label": "Tree", "box": [0, 0, 1, 1], "box": [0, 0, 0.5, 0.5]}]}'),
])
def test_a_key_given_twice_is_refused_not_silently_overridden(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(ItemError, match=f"{name}: not valid (JSON|YAML) \\(the key '(objects|box)' is given twice"):
        read_layout(tmp_path / name, 32, 32)


# ---------------------------------------------------------------- the command


def test_outputs_previews_metadata_and_same_seed(tmp_path, model):
    folder = tmp_path / "layouts"
    (folder / "sub").mkdir(parents=True)
    _layout(folder / "a.json", [{"label": "Person", "box": [0.1, 0.1, 0.5, 0.9]},
                                {"label": "Dog", "box": [0.5, 0.5, 1.0, 1.0]}])
    (folder / "sub" / "b.yaml").write_text("- {label: Car, box: [0, 0, 32, 20]}\n")
    (folder / "notes.txt").write_text("not a layout")
    for name in ("one", "two"):
        result = _run(folder, "-r", "--draw-boxes", "--model", model, "--seed", 7, "-o", tmp_path / name)
        assert result.exit_code == 0, result.output
    for rel in ("a.png", "sub/b.png", "a.boxes.png", "sub/b.boxes.png"):
        with Image.open(tmp_path / "one" / rel) as image:
            assert image.size == (32, 32)
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes()
    assert (tmp_path / "one" / "a.png").read_bytes() != (tmp_path / "one" / "a.boxes.png").read_bytes()
    with Image.open(tmp_path / "one" / "a.png") as image:
        recipe = json.loads(image.info["ldmtool"])
    assert recipe["command"] == "layout2img"
    objects = recipe["parameters"]["objects"]
    assert [o["label"] for o in objects] == ["Person", "Dog"] and objects[0]["box"] == [0.1, 0.1, 0.5, 0.9]


def test_draw_boxes_is_no_part_of_the_job_and_a_rerun_with_it_draws_the_missing_previews(tmp_path, model):
    """`-o d` then `-o d --draw-boxes` failed the item ('--draw-boxes differs', exit 1) though the preview
    leaves the image alone; and the preview had no metadata, so `ldmtool info` on it exited 1."""
    import subprocess
    import sys

    _layout(tmp_path / "a.json", [{"label": "Person", "box": [0.1, 0.1, 0.5, 0.9]}])
    args = (tmp_path / "a.json", "--model", model, "--seed", 7)
    assert _run(*args, "--draw-boxes", "-o", tmp_path / "with").exit_code == 0
    assert _run(*args, "-o", tmp_path / "later").exit_code == 0
    assert not (tmp_path / "later" / "a.boxes.png").exists()
    result = _run(*args, "--draw-boxes", "-o", tmp_path / "later", "--json")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["event"] for line in result.stdout.splitlines()][:1] == ["skipped"]
    assert (tmp_path / "later" / "a.boxes.png").read_bytes() == (tmp_path / "with" / "a.boxes.png").read_bytes()
    with Image.open(tmp_path / "later" / "a.png") as later, Image.open(tmp_path / "with" / "a.png") as first:
        assert later.tobytes() == first.tobytes()  # (its recipe holds the command line: not the bytes)
    assert _run(*args, "-o", tmp_path / "with").exit_code == 0  # and back without it: the same job
    info = subprocess.run([sys.executable, "-m", "ldmtool", "info", "--json", str(tmp_path / "with" / "a.boxes.png")],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["recipe"]["preview_of"] == "a.png"
    replay = subprocess.run([sys.executable, "-m", "ldmtool", "replay", str(tmp_path / "with" / "a.boxes.png")],
                            capture_output=True, text=True, timeout=60)  # it said "written by another tool"
    assert replay.returncode == 1
    assert replay.stderr.strip().endswith("a.boxes.png: a box preview of a.png, drawn from its layout; replay that image")


def test_identities_that_recorded_draw_boxes_stay_this_jobs():
    """Folders of earlier versions recorded draw_boxes in the job's identity and run id: their spellings
    are the same job's, so those folders resume and adopt their seeds."""
    from ldmtool.runtime import identity

    cli = {"draw_boxes": True, "steps": 2, "output": "o"}
    pixels = identity.pixel_options(cli)
    assert pixels == {"steps": 2}
    assert identity.recorded_otherwise(cli, [pixels]) == (
        {"steps": 2, "draw_boxes": False}, {"steps": 2, "draw_boxes": True})
    assert identity.recorded_otherwise({"steps": 2}, [pixels]) == ()


def test_width_and_height_need_no_multiple_as_a_layouts_own_size_does_not(tmp_path, model):
    tree = [{"label": "Tree", "box": [0.1, 0.1, 0.5, 0.5]}]
    given = ("given.png", _layout(tmp_path / "plain.json", tree), ["--width", "40", "--height", "24"])
    own = ("own.png", _layout(tmp_path / "sized.json", tree, size=[40, 24]), [])
    for name, layout, size in (given, own):  # both padded to the model's multiple of 32 and cropped back
        result = run_cli("layout2img", layout, "--model", model, "--steps", "1", "--quiet", "--seed", "1", *size,
                         "-o", tmp_path / name)
        assert result.exit_code == 0, result.output
        with Image.open(tmp_path / name) as image:
            assert image.size == (40, 24)


def test_the_layout_conditions_the_image(tmp_path, model):
    _layout(tmp_path / "x.json", [{"label": "Person", "box": [0.1, 0.1, 0.5, 0.9]}])
    _layout(tmp_path / "y.json", [{"label": "Person", "box": [0.5, 0.1, 0.9, 0.9]}])
    for name in ("x", "y"):
        assert _run(tmp_path / f"{name}.json", "--model", model, "--seed", 1, "--name", "o.{ext}",
                    "-o", tmp_path / name).exit_code == 0
    assert (tmp_path / "x" / "o.png").read_bytes() != (tmp_path / "y" / "o.png").read_bytes()


@pytest.mark.parametrize("objects, message", [
    ([{"label": "Persn", "box": [0, 0, 1, 1]}], "object 0: label 'Persn' is not one of the layout model's "
                                                 "OpenImages classes; did you mean 'person'"),
    ([{"label": "Car", "box": [8, 8, 40, 20]}],
     "object 0 (Car): box [8.0, 8.0, 40.0, 20.0] lies outside the 32x32 image"),
    ([{"label": "Car", "box": [0.5, 0.2, 0.4, 0.9]}], "object 0 (Car): box [0.5, 0.2, 0.4, 0.9] is empty"),
    ([{"label": "Car", "box": [0, 0, 1]}], "object 0 needs \"box\": [x0, y0, x1, y1]"),
    ([{"label": "Car", "box": [0.1, 0.1, 1.5, 0.5]}],  # one number above 1 reads the box in pixels
     "object 0 (Car): box [0.1, 0.1, 1.5, 0.5] is under one pixel; its numbers are read in pixels, as one is "
     "above 1: for fractions of the image keep every number within 0..1, or give \"units\""),
    ([{"label": "Car", "box": [0, 0, 1, 1]}] * 31, "31 objects: the layout model takes at most 30"),
])
def test_bad_layouts_fail_with_one_line_naming_the_file(tmp_path, model, objects, message):
    path = _layout(tmp_path / "bad.json", objects)
    result = _run(path, "--model", model, "-o", tmp_path / "out")
    assert result.exit_code == 1
    failed = [line for line in result.output.splitlines() if "failed:" in line]
    assert len(failed) == 1 and f"{path}: " in failed[0] and message in failed[0]


def test_model_without_box_tokens_is_a_usage_error(tmp_path):
    other = tmp_path / "celeba.safetensors"
    save_tiny_checkpoint(other, "ldm-celebahq256", with_config=True)
    _layout(tmp_path / "a.json", [{"label": "Person", "box": [0, 0, 1, 1]}])
    result = _run(tmp_path / "a.json", "--model", other, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "cannot do layout2img" in result.output


def test_context_is_the_cond_stage_on_the_reference_tokens(tmp_path, model):
    from pathlib import Path

    import torch

    from ldmtool.io.discover import Item
    from ldmtool.pipelines.engine import Engine, ModelChoice, SamplingChoice
    from ldmtool.pipelines.layout2img import Layout2ImgTask
    from ldmtool.runtime.runner import Job

    task = Layout2ImgTask(Engine(ModelChoice(model=str(model), device="cpu"), SamplingChoice()), width=32, height=32)
    task.open()
    path = _layout(tmp_path / "a.json", [{"label": "Person", "box": [0.25, 0.5, 0.75, 1.0]}])
    job = Job(item=Item(key="a.json", stem="a", path=path), index=0, seed=0, output=Path("a.png"))
    job.payload = task.load(job)
    cond, uncond = task.conditioning(task.engine, job, (8, 8))
    tokens = torch.tensor([[37, 3982, 8077] + [8191] * 87 + [0, 8099]])
    with torch.no_grad():
        expected = task.engine.bundle.cond_stage.encode(tokens)
    assert uncond is None and torch.equal(cond.crossattn, expected)


def test_layout_folders_and_samples_become_items(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for rel in ("a.json", "sub/b.yml", "sub/c.YAML", "skip.txt", ".hidden.json"):
        (tmp_path / "in" / rel).write_text("[]")
    flat = find_layouts([str(tmp_path / "in")])
    assert [i.key for i in flat] == ["a.json"]
    items = find_layouts([str(tmp_path / "in")], recursive=True, samples=2)
    assert [(i.key, i.stem, i.subdir) for i in items] == [
        ("a.json/0", "a-0", ""), ("a.json/1", "a-1", ""), ("sub/b.yml/0", "b-0", "sub"), ("sub/b.yml/1", "b-1", "sub"),
        ("sub/c.YAML/0", "c-0", "sub"), ("sub/c.YAML/1", "c-1", "sub")]
    with pytest.raises(UsageError, match="no such file or folder"):
        find_layouts([str(tmp_path / "missing.json")])


def test_many_samples_are_made_lazily_and_more_than_the_seeds_are_refused(tmp_path):
    """--n 10**11 built 10**11 items (memory without bound, no answer in a minute); now items are made when
    asked for, and more images than distinct seeds are refused as `sample` and `txt2img` refuse them."""
    for rel in ("a.json", "b.yaml"):
        (tmp_path / rel).write_text("[]")
    assert getattr(find_layouts([str(tmp_path)], samples=3), "lazy", False)  # (before, a list)
    items = find_layouts([str(tmp_path)], samples=10**8)
    assert len(items) == 2 * 10**8
    assert [(i.key, i.stem) for i in (items[0], items[10**8 - 1], items[10**8])] == [
        ("a.json/0", "a-0"), ("a.json/99999999", "a-99999999"), ("b.yaml/0", "b-0")]
    with pytest.raises(UsageError, match="more than the 4294967296 distinct seeds"):
        find_layouts([str(tmp_path)], samples=10**11)
    (tmp_path / "a.yaml").write_text("[]")  # a-0 twice: the eager plan names the collision
    assert isinstance(find_layouts([str(tmp_path)], samples=2), list)


def test_layouts_come_from_globs_lists_and_stdin_as_images_do(tmp_path):
    import io

    (tmp_path / "in" / "sub").mkdir(parents=True)
    for rel in ("a.json", "sub/b.yml", "skip.txt"):
        (tmp_path / "in" / rel).write_text("[]")
    (tmp_path / "in" / "list.txt").write_text("# layouts\na.json\nsub/b.yml\nmissing.json\n")
    assert [i.key for i in find_layouts([str(tmp_path / "in" / "**" / "*")])] == ["a.json", "sub/b.yml"]
    listed = find_layouts(["@" + str(tmp_path / "in" / "list.txt")])
    assert [i.path for i in listed] == [tmp_path / "in" / p for p in ("a.json", "sub/b.yml", "missing.json")]
    piped = find_layouts(["-"], stdin=io.StringIO(f"{tmp_path / 'in' / 'a.json'}\n"))
    assert [i.path for i in piped] == [tmp_path / "in" / "a.json"]
    with pytest.raises(UsageError, match="no layout files .* match this pattern"):
        find_layouts([str(tmp_path / "in" / "*.txt")])


def test_tiles_of_a_large_layout_get_their_crop_tokens(tmp_path, model):
    """Above the native size every tile's context ends with its own crop box, as the reference rewrites
    the last two tokens per patch; the objects keep their whole-image coordinates."""
    import torch

    from ldmtool.pipelines.engine import Engine, ModelChoice, SamplingChoice
    from ldmtool.pipelines.layout2img import Layout2ImgTask

    task = Layout2ImgTask(Engine(ModelChoice(model=str(model), device="cpu"), SamplingChoice(steps=2, sampler="euler")),
                          width=32, height=32)
    task.open()
    sequences = []
    encode = task.engine.bundle.cond_stage.encode
    task.engine.bundle.cond_stage.encode = lambda tokens: sequences.append(tokens[0].tolist()) or encode(tokens)
    tokenizer = task.tokenizer
    objects = [LayoutObject(category=3, box=(0.25, 0.5, 0.75, 1.0))]
    class _Job:
        payload = Layout(objects, (224, 160))

    cond, _ = task.conditioning(task.engine, _Job(), (40, 56))
    assert sequences == [tokenizer.tokens(objects)]  # the whole image: crop (0, 0, 1, 1)
    context = cond.tile_crossattn((8, 16, 32, 40), (40, 56))
    assert sequences[-1] == tokenizer.tokens(objects, (16 / 56, 8 / 40, 1.0, 1.0))
    assert sequences[-1][:-2] == sequences[0][:-2] and sequences[-1][-2:] != sequences[0][-2:]
    assert torch.equal(context, encode(torch.tensor([sequences[-1]])).to(context.dtype))
    cond.tile_crossattn((8, 16, 32, 40), (40, 56))
    assert len(sequences) == 2  # a tile's context is encoded once, then reused every step


def test_a_layout_larger_than_one_tile_runs_tiled(tmp_path, model):
    layout = _layout(tmp_path / "big.json", [{"label": "Person", "box": [0.1, 0.2, 0.5, 0.9]}])
    result = run_cli("layout2img", layout, "--model", model, "-o", tmp_path / "big.png", "--steps", "2", "--sampler", "euler",
                     "--quiet", "--width", "384", "--height", "256", "--tile", "16")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "big.png") as image:
        assert image.size == (384, 256)
