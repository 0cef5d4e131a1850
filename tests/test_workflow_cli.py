"""`ldmtool run WORKFLOW.yaml`: steps chained in one process over one model cache, resumable per step and item,
on tiny random checkpoints (LDM-BERT text2img256 for txt2img and img2img, LDM BSR for superres), small images."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clirun import run_cli
from ldmtool.checkpoints import api
from ldmtool.checkpoints.tiny import save_tiny_checkpoint
from ldmtool.pipelines.img2img import Img2ImgTask
from ldmtool.runtime.cache import model_cache
from ldmtool.runtime.resume import stored_recipe

FAST = {"steps": 2, "sampler": "euler"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    save_tiny_checkpoint(folder / "text.safetensors", "ldm-text2img256", seed=4, with_config=True)
    save_tiny_checkpoint(folder / "bsr.safetensors", "ldm-bsr-sr", seed=4, with_config=True)
    return folder


def _workflow(folder: Path, models: Path) -> Path:
    (folder / "prompts.txt").write_text("a red fox\na blue bird\n")
    steps = [
        {"txt2img": {"prompts": "prompts.txt", "model": str(models / "text.safetensors"), "width": 32, "height": 32,
                     "negative": "blurry", **FAST}},
        {"img2img": {"scale": 1.5, "strength": 0.5, "prompt": "a painting", "model": str(models / "text.safetensors"),
                     **FAST}},
        {"superres": {"scale": 1.5, "model": str(models / "bsr.safetensors"), **FAST}},
    ]
    path = folder / "chain.yaml"
    path.write_text(json.dumps({"steps": steps}))  # JSON is YAML
    return path


def _events(result):
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _counts(events, folder: Path):
    """(done, skipped) item events of the step that wrote into `folder`."""
    mine = [e for e in events if e.get("event") in ("done", "skipped") and Path(e["output"]).parent == folder]
    return sum(e["event"] == "done" for e in mine), sum(e["event"] == "skipped" for e in mine)


def _pixels(folder: Path):
    return {path.name: np.asarray(Image.open(path)) for path in sorted(folder.glob("*.png"))}


def test_three_steps_read_each_model_once_and_a_killed_run_finishes_the_rest(tmp_path, models, monkeypatch):
    workflow = _workflow(tmp_path, models)
    model_cache().clear()
    reads: dict[str, int] = {}
    real_read = api.read_state_dict

    def counted(path):
        reads[Path(path).name] = reads.get(Path(path).name, 0) + 1
        return real_read(path)

    monkeypatch.setattr(api, "read_state_dict", counted)
    whole = run_cli("run", workflow, "-o", tmp_path / "whole", "--seed", 5, "--json")
    assert whole.exit_code == 0, whole.output
    assert reads == {"text.safetensors": 1, "bsr.safetensors": 1}  # img2img took txt2img's model from the cache
    steps = [e for e in _events(whole) if e.get("event") == "workflow_step"]
    assert [(s["command"], [Path(p).name for p in s["models_loaded"]], s["cache_hits"]) for s in steps] == [
        ("txt2img", ["text.safetensors"], 0), ("img2img", [], 1), ("superres", ["bsr.safetensors"], 0)]
    final = _pixels(tmp_path / "whole")
    assert len(final) == 2 and all(image.shape == (72, 72, 3) for image in final.values())
    _check_chain_and_replay(tmp_path / "whole", tmp_path / "replayed.png")

    calls = {"n": 0}
    real_upscale = Img2ImgTask._upscale

    def killed_on_the_second_item(self, job):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_upscale(self, job)

    monkeypatch.setattr(Img2ImgTask, "_upscale", killed_on_the_second_item)
    killed = run_cli("run", workflow, "-o", tmp_path / "again", "--seed", 5, "--json")
    assert killed.exit_code == 130
    monkeypatch.setattr(Img2ImgTask, "_upscale", real_upscale)
    rerun = run_cli("run", workflow, "-o", tmp_path / "again", "--seed", 5, "--json")
    assert rerun.exit_code == 0, rerun.output
    events, step_folders = _events(rerun), tmp_path / "again" / "steps"
    assert _counts(events, step_folders / "01-txt2img") == (0, 2)  # finished before the kill
    assert _counts(events, step_folders / "02-img2img") == (1, 1)  # exactly the rest
    assert _counts(events, tmp_path / "again") == (2, 0)
    again = _pixels(tmp_path / "again")
    assert again.keys() == final.keys()
    assert all(np.array_equal(again[name], final[name]) for name in final)


def _check_chain_and_replay(folder: Path, target: Path) -> None:
    """Every final recipe holds the whole chain, with the first step's seed all the way down, and `replay`
    runs the last step again (from the kept intermediate) to the same pixels."""
    for output in sorted(folder.glob("*.png")):
        chain, recipe = [], stored_recipe(output)
        while recipe:
            chain.append((recipe["command"], recipe["seed"]))
            recipe = recipe.get("upstream")
        first_seed = chain[-1][1]
        assert chain == [("superres", first_seed), ("img2img", first_seed), ("txt2img", first_seed)]
    replay = run_cli("replay", sorted(folder.glob("*.png"))[0], "-o", target, "--verify")
    assert replay.exit_code == 0, replay.output


def test_a_folder_through_two_steps_remove_steps_and_replay_the_whole_chain(tmp_path, models):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(2):
        pixels = np.random.default_rng(index).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"p{index}.png")
    workflow = tmp_path / "two.yaml"
    workflow.write_text(f"- img2img: {{strength: 0.3, prompt: x, model: {models / 'text.safetensors'}, steps: 2}}\n"
                        f"- superres: {{scale: 2, model: {models / 'bsr.safetensors'}, steps: 2}}\n")
    result = run_cli("run", workflow, photos, "-o", tmp_path / "out", "--remove-steps", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["p0.png", "p1.png"]
    assert not (tmp_path / "out" / "steps").exists()
    replay = run_cli("replay", tmp_path / "out" / "p1.png", "-o", tmp_path / "replayed.png", "--verify")
    assert replay.exit_code == 0, replay.output  # the removed intermediate is made again from its recipe


@pytest.mark.parametrize("text, message", [
    ("- txt2img: {output: x}\n", "--output is set by the workflow itself"),
    ("- paint: {}\n", "'paint' is not a command a workflow can run"),
    ("steps: 3\n", "a workflow is a list of steps"),
    ("- [unclosed\n", "not valid YAML"),
])
def test_malformed_workflows_are_one_line_usage_errors(tmp_path, text, message):
    workflow = tmp_path / "bad.yaml"
    workflow.write_text(text)
    result = run_cli("run", workflow, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert message in result.output and str(workflow) in result.output and "Traceback" not in result.output


def test_example_workflows_parse_and_name_only_options_their_commands_take():
    import typer.main

    from ldmtool.cli.app import app, task_commands
    from ldmtool.runtime.workflow import read_workflow

    folder = Path(__file__).resolve().parent.parent / "examples" / "workflows"
    workflows = sorted(folder.glob("*.yaml"))
    assert len(workflows) >= 2
    group = typer.main.get_command(app)
    for path in workflows:
        for step in read_workflow(path, task_commands()):
            flags = {flag for param in group.commands[step.command].params for flag in getattr(param, "opts", [])}
            assert {f"--{name}" for name in step.options} <= flags, (path, step)
            for value in step.argv(path.parent, frozenset({"prompts"})):
                assert not value.startswith("../") or (path.parent / value).exists()


def test_a_workflow_killed_with_sigkill_mid_step_finishes_exactly_the_rest(tmp_path):
    """`kill -9` of a real `ldmtool run` process in its second step (no handler runs, claims stay behind):
    the rerun skips every finished item, does the rest, and ends with the pixels of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(6):
        pixels = np.random.default_rng(index).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"p{index}.png")
    workflow = tmp_path / "three.yaml"
    workflow.write_text("- _invert: {}\n- _invert: {}\n- _invert: {}\n")
    env = dict(os.environ, LDMTOOL_TEST_COMMANDS="1", LDMTOOL_TEST_SLEEP="0.3")
    env.pop("LDMTOOL_DEBUG", None)
    command = [sys.executable, "-m", "ldmtool", "run", str(workflow), str(photos), "-o", str(tmp_path / "out"), "--json"]
    step2 = tmp_path / "out" / "steps" / "02-_invert"
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(step2.glob("*.png"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    finished = {path.name for path in step2.glob("*.png")}
    assert 2 <= len(finished) < 6 and not list((tmp_path / "out").glob("*.png"))  # killed inside step 2
    # no output is half-written: every visible image is whole (a write cut short stays a hidden temp file)
    assert all(np.asarray(Image.open(path)).shape == (8, 8, 3) for path in step2.glob("*.png"))

    rerun = subprocess.run(command, env={**env, "LDMTOOL_TEST_SLEEP": "0"}, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    events = [json.loads(line) for line in rerun.stdout.splitlines() if line.startswith("{")]
    steps = tmp_path / "out" / "steps"
    assert _counts(events, steps / "01-_invert") == (0, 6)
    assert _counts(events, step2) == (6 - len(finished), len(finished))  # exactly the rest
    assert _counts(events, tmp_path / "out") == (6, 0)
    final = _pixels(tmp_path / "out")
    originals = _pixels(photos)
    assert final.keys() == originals.keys()
    assert all(np.array_equal(final[name], 255 - originals[name]) for name in final)  # inverted three times


@pytest.mark.parametrize("scale", [None, 1.5])
def test_a_chained_img2img_without_a_prompt_takes_each_inputs_recorded_prompt(tmp_path, models, scale, monkeypatch):
    """Per-item prompts flow through a chain: img2img given no prompt reworks each txt2img output towards the
    prompt (and negative) it was made from, exactly as img2img run on that file with those options."""
    from ldmtool.pipelines.text import TextConditioner

    encoded: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    real_conds = TextConditioner.conds

    def recorded(self, engine, prompts, negatives, *args, **kwargs):
        encoded.append((tuple(prompts), tuple(negatives)))
        return real_conds(self, engine, prompts, negatives, *args, **kwargs)

    monkeypatch.setattr(TextConditioner, "conds", recorded)
    (tmp_path / "prompts.txt").write_text("a red fox\na blue bird\n")
    model = str(models / "text.safetensors")
    rework = {"strength": 0.5, "model": model, **FAST, **({"scale": scale} if scale else {})}
    steps = [{"txt2img": {"prompts": "prompts.txt", "model": model, "width": 32, "height": 32, "negative": "blurry",
                          **FAST}},
             {"img2img": rework}]
    workflow = tmp_path / "two.yaml"
    workflow.write_text(json.dumps(steps))
    result = run_cli("run", workflow, "-o", tmp_path / "out", "--seed", 5, "--quiet")
    assert result.exit_code == 0, result.output
    finals = sorted((tmp_path / "out").glob("*.png"))
    assert len(finals) == 2
    rework_calls = encoded[-2:]  # after the txt2img step's; one call per image (their prompts differ)
    assert sorted(rework_calls) == [(("a blue bird",), ("blurry",)), (("a red fox",), ("blurry",))]
    prompts = set()
    for number, final in enumerate(finals):
        recipe = stored_recipe(final)
        source, upstream = Path(recipe["item"]["input"]), recipe["upstream"]
        prompt = upstream["parameters"]["prompt"]
        assert (recipe["parameters"]["prompt"], recipe["parameters"]["negative"]) == (prompt, "blurry")
        prompts.add(prompt)
        if number:
            continue  # one image run alone is enough to compare pixels
        options = [f"--{name}={value}" for name, value in rework.items()]
        alone = run_cli("img2img", source, "-o", tmp_path / f"alone-{final.name}", "--prompt", prompt,
                        "--negative", "blurry", "--item-seed", recipe["seed"], *options, "--quiet")
        assert alone.exit_code == 0, alone.output
        assert np.array_equal(_pixels(tmp_path)[f"alone-{final.name}"], np.asarray(Image.open(final)))
    assert prompts == {"a red fox", "a blue bird"}
    replay = run_cli("replay", finals[0], "-o", tmp_path / "replayed.png", "--verify")
    assert replay.exit_code == 0, replay.output  # the replay takes the input's recorded prompt again
    assert stored_recipe(tmp_path / "replayed.png")["parameters"]["negative"] == "blurry"


def _text_step(models: Path, **options) -> dict:
    return {"txt2img": {"prompt": "a red fox", "model": str(models / "text.safetensors"), "width": 32, "height": 32,
                        **FAST, **options}}


@pytest.mark.parametrize("later, message", [
    ({"img2img": {"strenght": 0.2}}, "step 3 (img2img): No such option: --strenght"),
    ({"img2img": {"strength": "lots"}}, "step 3 (img2img): Invalid value for '--strength'"),
    ({"superres": {"scale": 2, "steps": 0}}, "step 3 (superres): Invalid value for '--steps'"),
])
def test_every_steps_options_are_checked_before_the_first_step_runs(tmp_path, models, later, message):
    workflow = tmp_path / "typo.yaml"
    workflow.write_text(json.dumps([_text_step(models), {"img2img": {"strength": 0.2}}, later]))
    result = run_cli("run", workflow, "-o", tmp_path / "out", "--seed", 1)
    assert result.exit_code == 2
    assert f"ldmtool: error: {workflow}: {message}" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # nothing ran


def test_a_bad_environment_default_for_a_later_step_is_refused_before_the_first_step(tmp_path, models, monkeypatch):
    """LDMTOOL_IMG2IMG_STRENGTH=lots failed step 2 only after step 1 had run: the check parsed without it."""
    monkeypatch.setenv("LDMTOOL_IMG2IMG_STRENGTH", "lots")
    workflow = tmp_path / "wf.yaml"
    workflow.write_text(json.dumps([_text_step(models), {"img2img": {"steps": 1}}]))
    result = run_cli("run", workflow, "-o", tmp_path / "out", "--seed", 1)
    assert result.exit_code == 2
    assert f"{workflow}: step 2 (img2img): Invalid value for '--strength'" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.mark.parametrize("steps", [1, 2])
def test_an_output_named_like_an_image_is_a_usage_error(tmp_path, models, steps):
    workflow = tmp_path / "wf.yaml"
    workflow.write_text(json.dumps([_text_step(models), {"img2img": {"strength": 0.2}}][:steps]))
    result = run_cli("run", workflow, "-o", tmp_path / "out.png", "--seed", 1)
    assert result.exit_code == 2
    assert f"-o {tmp_path / 'out.png'}: a workflow writes a folder" in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_an_output_folder_that_cannot_be_made_is_one_line_and_exit_3(tmp_path, models):
    workflow = tmp_path / "wf.yaml"
    workflow.write_text(json.dumps([_text_step(models)]))
    (tmp_path / "afile").write_text("x")
    result = run_cli("run", workflow, "-o", tmp_path / "afile" / "out", "--seed", 1, "--quiet")
    assert result.exit_code == 3
    assert result.stderr.count("ldmtool: error:") == 1 and "cannot create the output folder" in result.stderr


def test_a_step_that_fails_every_item_stops_the_chain_with_exit_1(tmp_path, models):
    photos = tmp_path / "photos"
    photos.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "whole.png")
    (photos / "broken.png").write_bytes((tmp_path / "whole.png").read_bytes()[:300])  # cut short
    workflow = tmp_path / "wf.yaml"
    workflow.write_text(json.dumps([{"superres": {"scale": 2, "model": str(models / "bsr.safetensors"), **FAST}},
                                    {"img2img": {"strength": 0.5, "model": str(models / "text.safetensors"), **FAST}}]))
    result = run_cli("run", workflow, photos, "-o", tmp_path / "out", "--seed", 1, "--quiet")
    assert result.exit_code == 1, result.output
    assert f"ldmtool: error: {workflow}: step 1 (superres) failed every item" in result.stderr
    assert "no input images" not in result.stderr


def test_a_finished_workflow_run_again_without_seed_and_steps_only_skips(tmp_path, models):
    workflow = tmp_path / "wf.yaml"
    workflow.write_text(json.dumps([_text_step(models, n=2), {"img2img": {"strength": 0.5, **FAST}}]))
    runs = [run_cli("run", workflow, "-o", tmp_path / "out", "--remove-steps", "--json") for _ in range(2)]
    assert [run.exit_code for run in runs] == [0, 0], runs[1].output
    assert _counts(_events(runs[1]), tmp_path / "out") == (0, 2)  # the rerun took the first run's seed
    assert not (tmp_path / "out" / "steps").exists()
    records = [json.loads(line) for line in (tmp_path / "out" / "workflow.jsonl").read_text().splitlines()]
    assert len({record["seed"] for record in records}) == 1


def test_every_option_that_names_a_file_is_found_beside_the_workflow(tmp_path):
    from ldmtool.cli.workflow import path_options
    from ldmtool.runtime.workflow import Step

    assert {"palette", "model", "config"} <= path_options("semantic2img") and "prompts" in path_options("txt2img")
    assert {"control-image", "controlnet", "adapter", "vae", "lora", "lora-dir", "embeddings-dir", "refiner",
            "text-encoder", "tokenizer", "wildcards", "masks"} - path_options("txt2img") - path_options("inpaint") \
        - path_options("img2img") == set()
    assert not {"prompt", "negative", "steps", "sampler", "name"} & path_options("txt2img")
    for name in ("a.png", "b.png", "style.safetensors", "palette.yaml"):
        (tmp_path / name).write_text("x")
    step = Step("txt2img", {"control-image": ["a.png", "b.png", "elsewhere.png"], "lora": "style.safetensors:0.5",
                            "palette": "palette.yaml", "prompt": "a.png"})
    assert step.argv(tmp_path, frozenset({"control-image", "lora", "palette"})) == [
        "--control-image", str(tmp_path / "a.png"), "--control-image", str(tmp_path / "b.png"),
        "--control-image", "elsewhere.png", "--lora", f"{tmp_path / 'style.safetensors'}:0.5",
        "--palette", str(tmp_path / "palette.yaml"), "--prompt", "a.png"]
