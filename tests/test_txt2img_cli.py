"""`ldmtool txt2img` end to end on tiny random checkpoints (original key layout + CompVis config) of every
text family: LDM-BERT (text2img256, txt2img-1p4B), SD 1.x, SD 2.x eps and v."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from clirun import run_cli
from ldmtool.checkpoints.tiny import save_tiny_checkpoint
from ldmtool.errors import UsageError
from ldmtool.pipelines.engine import Engine, ModelChoice, SamplingChoice
from ldmtool.pipelines.text import TextConditioner, read_prompts
from ldmtool.pipelines.txt2img import Txt2ImgTask, prompt_items
from ldmtool.runtime.runner import RunOptions, run_task

FAMILIES = {  # preset -> the smallest valid size (pixel multiple of the model)
    "ldm-text2img256": 32,
    "ldm-txt2img-1p4b": 64,
    "sd1": 64,
    "sd2": 64,
    "sd2-v": 64,
}



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for preset in FAMILIES:
        paths[preset] = folder / f"{preset}.safetensors"
        save_tiny_checkpoint(paths[preset], preset, seed=1, with_config=True)
    save_tiny_checkpoint(folder / "uncond.safetensors", "ldm-celebahq256", with_config=True)
    paths["uncond"] = folder / "uncond.safetensors"
    return paths



def _run(*args, steps=2):
    return run_cli("txt2img", *args, "--steps", steps, "--sampler", "euler", "--quiet")


def _recipe(path):
    with Image.open(path) as image:
        return json.loads(image.info["ldmtool"]), image.size


@pytest.mark.parametrize("preset", FAMILIES)
def test_every_text_family_writes_the_requested_size_with_metadata(tmp_path, models, preset):
    size = FAMILIES[preset]
    result = _run("--prompt", "a red fox", "--negative", "blurry", "--model", models[preset], "-W", 2 * size,
                  "-H", size, "-o", tmp_path, "--seed", 4, "--cfg", 3)
    assert result.exit_code == 0, result.output
    (out,) = tmp_path.glob("*.png")
    recipe, image_size = _recipe(out)
    assert image_size == (2 * size, size)
    assert recipe["command"] == "txt2img"
    params = recipe["parameters"]
    assert (params["prompt"], params["negative"], params["cfg"]) == ("a red fox", "blurry", 3.0)
    assert params["model_family"] == preset
    assert (params["width"], params["height"], params["steps"], params["sampler"]) == (2 * size, size, 2, "euler")


def test_beyond_native_size_goes_through_the_tiled_engine(tmp_path, models):
    # 192x64 pixels = a 24x8 latent; 8-latent tiles force several tiles per step
    result = _run("--prompt", "wide", "--model", models["sd1"], "-W", 192, "-H", 64, "--tile", 8,
                  "--tile-overlap", 2, "-o", tmp_path / "wide.png", "--seed", 1)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "wide.png") as image:
        assert image.size == (192, 64)
        assert np.asarray(image).std() > 0


def test_same_seed_same_files_and_batch_size_never_changes_results(tmp_path, models):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n# a comment\n\na blue bird\n")
    runs = {"b1": 1, "again": 1, "b3": 3}
    for name, batch in runs.items():
        result = _run("--prompts", prompts, "--n", 2, "--model", models["sd1"], "-W", 64, "-H", 64,
                      "-o", tmp_path / name, "--seed", 9, "--batch-size", batch)
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "b1").glob("*.png"))
    assert names == ["0000-0-a-red-fox.png", "0000-1-a-red-fox.png", "0001-0-a-blue-bird.png", "0001-1-a-blue-bird.png"]
    pixels = {}
    for name in names:
        first = (tmp_path / "b1" / name).read_bytes()
        assert first == (tmp_path / "again" / name).read_bytes()
        with Image.open(tmp_path / "b1" / name) as a, Image.open(tmp_path / "b3" / name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))  # argv differs in the metadata, not the pixels
            pixels[name] = np.asarray(a)
    assert not np.array_equal(pixels[names[0]], pixels[names[1]])  # samples of one prompt differ


def test_resume_skips_finished_items_and_json_events(tmp_path, models):
    args = ("--prompt", "fox", "--n", 2, "--model", models["ldm-text2img256"], "-W", 32, "-H", 32,
            "-o", tmp_path, "--seed", 2, "--json")
    assert _run(*args).exit_code == 0
    (tmp_path / "0000-1-fox.png").unlink()
    result = _run(*args)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events if e["event"] not in ("summary", "plan")] == ["skipped", "done"]


def test_json_lines_set_per_item_parameters(tmp_path, models):
    lines = [
        {"prompt": "a cat", "seed": 77, "width": 128, "height": 64},
        {"prompt": "a dog", "negative": "rain", "steps": 3, "cfg": 2.5, "sampler": "ddim"},
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    result = _run("--prompts", prompts, "--model", models["sd1"], "-W", 64, "-H", 64, "-o", tmp_path / "out",
                  "--seed", 1, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    cat, cat_size = _recipe(tmp_path / "out" / "0000-0-a-cat.png")
    dog, dog_size = _recipe(tmp_path / "out" / "0001-0-a-dog.png")
    assert cat_size == (128, 64) and dog_size == (64, 64)
    assert cat["seed"] == 77 and cat["parameters"]["prompt"] == "a cat"
    p = dog["parameters"]
    assert (p["negative"], p["steps"], p["cfg"], p["sampler"]) == ("rain", 3, 2.5, "ddim")
    # the JSON seed is the item's own: another base seed gives the same image for that line
    again = _run("--prompts", prompts, "--model", models["sd1"], "-W", 64, "-H", 64, "-o", tmp_path / "again",
                 "--seed", 5)
    assert again.exit_code == 0, again.output
    with Image.open(tmp_path / "out" / "0000-0-a-cat.png") as a, Image.open(tmp_path / "again" / "0000-0-a-cat.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_each_distinct_prompt_is_encoded_once(tmp_path, models):
    prompts = tmp_path / "p.txt"
    prompts.write_text("fox\nbird\nfox\n")
    specs = read_prompts(None, prompts)
    engine = Engine(ModelChoice(model=str(models["ldm-text2img256"])), SamplingChoice(sampler="euler", steps=1, cfg=2.0))
    task = Txt2ImgTask(engine, specs, width=32, height=32)
    summary = run_task(task, prompt_items(specs, 3), RunOptions(output=tmp_path / "out", seed=1, quiet=True,
                                                                batch_size=4))
    assert summary.done == 9
    assert task.texts.encoded == 3  # "fox", "bird" and the empty negative


def test_text_conditioner_caches_and_keeps_order():
    class Encoder:
        calls = []

        def encode(self, texts):
            self.calls.append(list(texts))
            import torch

            return torch.stack([torch.full((2, 3), float(len(t))) for t in texts])

    encoder = Encoder()
    texts = TextConditioner(encoder)
    out = texts(["ab", "", "ab", "abcd"])
    assert out[:, 0, 0].tolist() == [2.0, 0.0, 2.0, 4.0]
    texts(["", "abcd", "xyz"])
    assert encoder.calls == [["ab"], [""], ["abcd"], ["xyz"]]  # each distinct text once, alone (batch-invariant)
    small = TextConditioner(encoder, keep=2)
    small(["a", "b"]), small(["c"]), small(["b"]), small(["a"])  # "a" was the least recently used, dropped
    assert encoder.calls[4:] == [["a"], ["b"], ["c"], ["a"]]


@pytest.mark.parametrize("args, code, message", [
    (("-W", 100, "-H", 64), 2, "--width 100: this model needs a multiple of 64 pixels (e.g. 128)"),
    (("-W", 64, "-H", 32), 2, "--height 32: this model needs a multiple of 64 pixels (e.g. 64)"),
    (("--tile", 4), 2, "--tile 4 is too small; use 0 (off) or at least 8 latent pixels"),
    (("--tile", 16, "--tile-overlap", 16), 2, "--tile-overlap 16 must be smaller than the tile (16 latent pixels)"),
])
def test_sizes_that_are_not_multiples_are_rejected_in_one_line(tmp_path, models, args, code, message):
    result = _run("--prompt", "x", "--model", models["sd1"], *args, "-o", tmp_path)
    assert result.exit_code == code
    assert result.output.strip().splitlines() == [f"ldmtool: error: {message}"]


def test_steps_the_schedule_cannot_take_are_a_usage_error_before_any_item(tmp_path, models):
    result = _run("--prompt", "x", "--model", models["sd1"], "-o", tmp_path / "a.png", steps=5000)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "ldmtool: error: --steps 5000 is out of range: 'linspace' spacing allows 1 to 1000 steps"]


def test_model_without_text_encoder_is_a_usage_error_in_one_line(tmp_path, models):
    result = _run("--prompt", "x", "--model", models["uncond"], "-o", tmp_path)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "has no text encoder, so it cannot do txt2img" in lines[0]


def test_prompt_source_errors_are_usage_errors(tmp_path, models):
    assert "give either --prompt TEXT or --prompts FILE" in _run("--model", models["sd1"]).output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "x", "colour": 3}\n')
    result = _run("--prompts", bad, "--model", models["sd1"])
    assert result.exit_code == 2
    assert result.output.strip() == f"ldmtool: error: {bad}:2: unknown field 'colour' (known: prompt, negative, seed, steps, cfg, sampler, width, height, size)"
    bad.write_text('{"prompt": "x", "steps": "ten"}\n')
    assert f"{bad}:1: 'steps' must be a int" in _run("--prompts", bad, "--model", models["sd1"]).output


def test_a_json_seed_beyond_32_bits_is_refused_not_wrapped(tmp_path):
    """A line's seed of 2^32 ran as seed 0 (and 10^22 as some other seed), where --seed 4294967296 is refused."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "seed": 4294967295}\n{"prompt": "b", "seed": 4294967296}\n')
    with pytest.raises(UsageError, match=r"p.jsonl:2: 'seed' must be at most 4294967295"):
        read_prompts(None, prompts)
    prompts.write_text('{"prompt": "a", "seed": 4294967295}\n')
    assert read_prompts(None, prompts)[0].seed == 4294967295


def test_a_bad_json_line_fails_only_its_own_items(tmp_path, models):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": "odd", "width": 100}\n{"prompt": "s", "sampler": "nope"}\n')
    result = _run("--prompts", prompts, "--model", models["sd1"], "-W", 64, "-H", 64, "-o", tmp_path / "out",
                  "--seed", 1, "--json")
    assert result.exit_code == 1
    events = {e["key"]: e for e in map(json.loads, filter(lambda line: line.startswith("{"), result.output.splitlines()))
              if "key" in e}
    assert events["prompt-0000/0"]["event"] == "done"
    assert "--width 100" in events["prompt-0001/0"]["error"]
    assert "'nope' is not a sampler" in events["prompt-0002/0"]["error"]


def test_seamless_changes_the_image_and_is_recorded(tmp_path, models):
    for name, extra in (("plain", ()), ("wrap", ("--seamless", "x"))):
        result = _run("--prompt", "tiles", "--model", models["sd1"], "-W", 64, "-H", 64, "-o", tmp_path / f"{name}.png",
                      "--seed", 3, *extra)
        assert result.exit_code == 0, result.output
    recipe, _ = _recipe(tmp_path / "wrap.png")
    assert recipe["parameters"]["seamless"] == "x"
    with Image.open(tmp_path / "plain.png") as a, Image.open(tmp_path / "wrap.png") as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loads_keep_the_float32_schedule(models, dtype):
    """GPU runs load in fp16/bf16: the schedule must not go through that precision (bf16 rounds the small
    1 - alphas_cumprod to 0, which gave a DPM++ schedule of [14.6, 0, 0])."""
    from ldmtool import build_model, load_model

    reference = load_model(models["sd2-v"]).alphas_cumprod
    half = load_model(models["sd2-v"], dtype=dtype)
    assert half.alphas_cumprod.dtype == torch.float32 and torch.equal(half.alphas_cumprod, reference)
    built = build_model(half.config, dtype=dtype)
    assert torch.equal(built.alphas_cumprod, reference)
