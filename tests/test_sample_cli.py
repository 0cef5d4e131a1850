"""`ldmtool sample` end to end on tiny random cin256-v2 and CelebA-HQ checkpoints in the original key layout."""
import json

import pytest
from PIL import Image

from clirun import run_cli
from ldmtool.checkpoints.tiny import save_tiny_checkpoint
from ldmtool.errors import UsageError
from ldmtool.pipelines.sample import class_id, imagenet_names

FAST = ["--steps", "2", "--sampler", "euler", "--quiet"]



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for name, preset in (("cin", "ldm-cin256-v2"), ("celeba", "ldm-celebahq256"), ("sem", "ldm-semantic-synthesis256")):
        paths[name] = folder / f"{name}.safetensors"
        save_tiny_checkpoint(paths[name], preset, seed=1, with_config=True)
    return paths



def _run(*args):
    return run_cli("sample", *args, *FAST)


def _recipe(path):
    with Image.open(path) as image:
        return json.loads(image.info["ldmtool"]), image.size


def test_class_samples_have_size_names_and_metadata(tmp_path, models):
    out = tmp_path / "out"
    result = _run("--model", models["cin"], "--class", "golden retriever", "--class", "3", "--n", "2",
                  "--width", 64, "--height", 32, "--seed", 4, "-o", out)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["0000-0-golden-retriever.png", "0000-1-golden-retriever.png", "0001-0-3.png", "0001-1-3.png"]
    recipe, size = _recipe(out / "0000-1-golden-retriever.png")
    assert size == (64, 32)
    params = recipe["parameters"]
    assert params["class"] == 207 and params["class_name"] == "golden_retriever"
    assert params["model_family"] == "ldm-cin256-v2" and params["cfg"] == 3.0  # the preset's guidance
    assert recipe["command"] == "sample"
    assert _recipe(out / "0001-0-3.png")[0]["parameters"]["class"] == 3


def test_same_seed_same_files_any_batch_size_and_resume(tmp_path, models):
    for name, batch in (("one", 1), ("two", 2)):  # --batch-size never changes results
        result = _run("--model", models["celeba"], "--n", "2", "--width", 32, "--height", 32, "--seed", 9,
                      "--batch-size", batch, "-o", tmp_path / name)
        assert result.exit_code == 0, result.output
    for stem in ("0000-0", "0000-1"):
        assert (tmp_path / "one" / f"{stem}.png").read_bytes() == (tmp_path / "two" / f"{stem}.png").read_bytes()
    assert (tmp_path / "one" / "0000-0.png").read_bytes() != (tmp_path / "one" / "0000-1.png").read_bytes()
    result = run_cli("sample", "--model", models["celeba"], "--n", 2, "--width", 32, "--height", 32,
                     "--seed", 9, "-o", tmp_path / "one", "--json", *FAST[:-1])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["skipped", "skipped", "summary"]


def test_guidance_uses_the_unconditional_class(tmp_path, models):
    """cfg 1 (no guidance) and cfg 5 differ; the metadata records what ran."""
    common = ["--model", models["cin"], "--class", "0", "--width", 32, "--height", 32, "--seed", 2]
    assert _run(*common, "--cfg", 1, "-o", tmp_path / "a.png").exit_code == 0
    assert _run(*common, "--cfg", 5, "-o", tmp_path / "b.png").exit_code == 0
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    assert _recipe(tmp_path / "b.png")[0]["parameters"]["cfg"] == 5.0


def test_class_names_resolve_to_imagenet_ids():
    assert len(imagenet_names()) == 1000
    assert class_id("tench", 1001) == 0
    assert class_id("Golden_Retriever", 1001) == 207
    assert class_id("giant panda", 1001) == 388
    assert class_id("1000", 1001) == 1000
    with pytest.raises(UsageError, match="several ImageNet classes"):
        class_id("crane", 1001)  # 134 the bird, 517 the machine


@pytest.mark.parametrize("args, message", [
    (["--class", "golden retreiver"], "not an ImageNet class name; did you mean 'golden retriever'"),
    (["--class", "1001"], "this model has classes 0 to 1000"),
    ([], "name classes with --class"),
    (["--class", "3", "--width", "40"], "--width 40: this model needs a multiple of 32"),
])
def test_bad_classes_and_sizes_are_one_line_usage_errors(tmp_path, models, args, message):
    result = _run("--model", models["cin"], *args, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_unconditional_model_refuses_classes_and_guidance(tmp_path, models):
    result = _run("--model", models["celeba"], "--class", "3", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "unconditional" in result.output
    result = _run("--model", models["celeba"], "--cfg", "4", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "classifier-free guidance" in result.output


def test_model_of_another_task_is_a_usage_error(tmp_path, models):
    result = _run("--model", models["sem"], "--class", "3", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "cannot do `sample`" in result.output


def test_conditioning_is_the_class_embedding_and_class_1000_for_guidance(models):
    from pathlib import Path

    import torch

    from ldmtool.pipelines.engine import Engine, ModelChoice, SamplingChoice
    from ldmtool.pipelines.sample import SampleTask, sample_items
    from ldmtool.runtime.runner import Job

    task = SampleTask(Engine(ModelChoice(model=str(models["cin"]), device="cpu"), SamplingChoice()),
                      classes=["golden retriever"])
    task.open()
    job = Job(item=sample_items(["golden retriever"], 1)[0], index=0, seed=0, output=Path("x.png"))
    cond, uncond = task.conditioning(task.engine, job, (8, 8))
    table = task.engine.bundle.cond_stage.embedding.weight
    assert cond.crossattn.shape == (1, 1, table.shape[1])
    assert torch.equal(cond.crossattn[0, 0], table[207]) and torch.equal(uncond.crossattn[0, 0], table[1000])


@pytest.mark.parametrize("command, extra", [("sample", []), ("tile-synth", ["--width", "64", "--height", "64"]),
                                            ("tile-synth", ["--prompt", "x", "--width", "64", "--height", "64"]),
                                            ("txt2img", ["--prompt", "x"])])
def test_more_images_than_distinct_seeds_is_a_usage_error(tmp_path, command, extra):
    # 10**20 images was an OverflowError traceback (exit 1): len() of the items past sys.maxsize
    for n in (10**20, 2**32 + 1):
        result = run_cli(command, "--n", str(n), *extra, *FAST, "-o", tmp_path / "out")
        assert result.exit_code == 2, result.output
        assert f"--n {n}: {n} images in one run is more than the 4294967296 distinct seeds" in result.output
        assert len(result.output.strip().splitlines()) == 1
