"""`--sweep NAME=V1,V2,...`: the cross product of option values over the same items and seeds."""
from __future__ import annotations

import json

import pytest

from clirun import run_cli
from ldmtool.errors import UsageError
from ldmtool.io.metadata import read_metadata
from ldmtool.runtime.sweep import cell_template, cells, parse_sweeps

TINY = ("--prompt", "a fox", "--n", "2", "-W", "64", "-H", "64", "-q")


def _recipes(folder):
    return {p.name: read_metadata(p).recipe for p in sorted(folder.glob("*.png"))}


def test_two_options_give_the_cross_product_with_the_same_seeds(tmp_path):
    result = run_cli("txt2img", *TINY, "--seed", "5", "--sweep", "steps=1,2", "--sweep", "cfg=1,3", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    recipes = _recipes(tmp_path)
    assert len(recipes) == 8  # 2 samples x 4 cells
    cells_seen = {}
    for name, recipe in recipes.items():
        sweep = recipe["parameters"]["sweep"]
        assert name.endswith(f"-steps{sweep['steps']}-cfg{sweep['cfg']:g}.png")
        assert (recipe["parameters"]["steps"], recipe["parameters"]["cfg"]) == (sweep["steps"], sweep["cfg"])
        cells_seen.setdefault((sweep["steps"], sweep["cfg"]), {})[recipe["key"]] = recipe["seed"]
    assert sorted(cells_seen) == [(1, 1.0), (1, 3.0), (2, 1.0), (2, 3.0)]
    assert all(seeds == {"prompt-0000/0": 5, "prompt-0000/1": 6} for seeds in cells_seen.values())


def test_a_json_sweep_ends_with_one_summary_of_every_cell(tmp_path):
    result = run_cli("txt2img", *TINY, "--steps", "1", "--seed", "2", "--sweep", "cfg=1,2", "--json", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    summaries = [event for event in events if event["event"] == "summary"]
    assert summaries == [events[-1]] and events[-1]["done"] == 4 and events[-1]["exit_code"] == 0
    assert sum(event["event"] == "done" for event in events) == 4


def test_resume_and_the_run_seed_work_per_cell(tmp_path):
    args = ("txt2img", *TINY, "--steps", "1", "--sweep", "cfg=1,2", "--name", "{sweep}/{stem}.{ext}", "-o", tmp_path)
    assert run_cli(*args).exit_code == 0
    first = {p.relative_to(tmp_path).as_posix(): read_metadata(p).recipe["seed"] for p in tmp_path.rglob("*.png")}
    assert sorted({name.split("/")[0] for name in first}) == ["cfg1", "cfg2"]
    assert len(set(first.values())) == 2  # one run seed for every cell: samples N and N+1
    (tmp_path / sorted(first)[3]).unlink()
    again = run_cli(*args[:-2], "--json", "-o", tmp_path)
    assert again.exit_code == 0, again.output
    events = [json.loads(line)["event"] for line in again.stdout.splitlines()]
    assert events.count("done") == 1 and events.count("skipped") == 3
    assert {p.relative_to(tmp_path).as_posix(): read_metadata(p).recipe["seed"] for p in tmp_path.rglob("*.png")} == first


@pytest.mark.parametrize("sweep, message", [
    ("bogus=1,2", "'bogus' is not a sampling or model option"),
    ("steps", "write NAME=V1,V2"),
    ("steps=1,x", "'x' is not a valid steps"),
    ("steps=0,1", "out of range"),
    ("sampler=ddim,nope", "unknown sampler 'nope'"),
    ("cfg=1,,2", "an empty value"),
    # checked for every cell before the first runs (they were found only when their cell ran)
    ("model=default-txt2img,nosuch.safetensors", "nosuch.safetensors: no such checkpoint file"),
    ("precision=fp32,fp64", "precision 'fp64' is not one of auto, fp32, fp16, bf16"),
    ("prediction=eps,bogus", "prediction 'bogus' is not one of eps, v"),
    ("cfg=2,inf", "cfg inf: must be a finite number"),
    ("eta=0,nan", "eta nan: must be a finite number"),
    ("config=nosuch.yaml", "nosuch.yaml: no such file or folder"),
    ("spacing=leading,bogus", "--spacing 'bogus' is not a spacing"),
])
def test_bad_sweeps_are_one_line_usage_errors(tmp_path, sweep, message):
    result = run_cli("txt2img", *TINY, "--sweep", sweep, "-o", tmp_path / "out")
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cells_are_grouped_by_model_and_named():
    cli = {"model": "default", "steps": None, "sampler": None}
    axes = parse_sweeps(["steps=10,20", "model=a.safetensors,b"], cli)
    order = [cell.label() for cell in cells(axes)]
    assert order == ["steps10-modela", "steps20-modela", "steps10-modelb", "steps20-modelb"]
    first = cells(axes)[0]
    assert first.record() == {"steps": 10, "model": "a.safetensors"}
    assert cell_template("{stem}.{ext}", first) == "{stem}-steps10-modela.{ext}"
    assert cell_template("{sweep}_{seed}.{ext}", first) == "steps10-modela_{seed}.{ext}"


@pytest.mark.parametrize("spec, labels", [
    ("cfg=.5,5,1.5,-1,1", ["cfg0.5", "cfg5", "cfg1.5", "cfg-1", "cfg1"]),  # were cfg5, cfg5, cfg1-5, cfg1, cfg1
    ("model=a/m.safetensors,b/m.safetensors,c.ckpt", ["modelm-1", "modelm-2", "modelc"]),
    ("model=A,a", ["modelA-1", "modela-2"]),  # one file on a case-insensitive file system
])
def test_distinct_values_get_distinct_names(spec, labels):
    axes = parse_sweeps([spec], {"model": "default", "cfg": None})
    assert [cell.label() for cell in cells(axes)] == labels


def test_values_whose_names_would_still_collide_are_refused():
    with pytest.raises(UsageError, match="would both name their outputs 'modelm-2'"):
        parse_sweeps(["model=m-2,a/m.safetensors,b/m.safetensors"], {"model": "default"})


def test_a_sweep_of_point_five_and_five_writes_both_cells(tmp_path):
    result = run_cli("txt2img", *TINY, "--steps", "1", "--seed", "1", "--sweep", "cfg=.5,5", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    recipes = _recipes(tmp_path)
    assert sorted(recipes) == ["0000-0-a-fox-cfg0.5.png", "0000-0-a-fox-cfg5.png",
                               "0000-1-a-fox-cfg0.5.png", "0000-1-a-fox-cfg5.png"]
    assert {recipe["parameters"]["sweep"]["cfg"] for recipe in recipes.values()} == {0.5, 5.0}
