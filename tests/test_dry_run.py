"""`--dry-run` on every task command: items, outputs, what would be skipped and why, the plan; no model
loaded, nothing written (issue 16)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.clirun import run_cli


@pytest.fixture
def photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LDMTOOL_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    return tmp_path


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from ldmtool.pipelines.engine import Engine

    def refuse(self: Engine) -> Engine:
        raise AssertionError("--dry-run loaded a model")

    monkeypatch.setattr(Engine, "open", refuse)


def test_dry_run_lists_items_and_writes_nothing(photos: Path, no_model: None) -> None:
    result = run_cli("superres", "a.png", "b.png", "-o", "out", "--dry-run", "--seed", "5")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("run  a.png -> out/a.png (seed ") and lines[1].startswith("run  b.png -> out/b.png")
    assert lines[2].startswith("plan: 2 items, largest output 64x64")
    assert lines[3] == "dry run: 2 to run, 0 skipped, 0 would fail (seed 5); nothing was loaded or written"
    assert not (photos / "out").exists()


def test_dry_run_says_what_would_be_skipped_and_why(photos: Path) -> None:
    assert run_cli("superres", "a.png", "-o", "out", "--seed", "5", "--steps", "2", "--quiet").exit_code == 0
    before = sorted(p.name for p in (photos / "out").iterdir())
    same = run_cli("superres", "a.png", "b.png", "-o", "out", "--seed", "5", "--steps", "2", "--dry-run", "--json")
    events = [json.loads(line) for line in same.stdout.splitlines()]
    actions = {e["key"]: (e["action"], e.get("reason")) for e in events if e["event"] == "dry-run"}
    assert actions == {"a.png": ("skip", "this job's output is there"), "b.png": ("run", None)}
    assert [e["event"] for e in events][-2:] == ["plan", "summary"]
    assert events[-1] == {"event": "summary", "dry_run": True, "to_run": 1, "skipped": 1, "failing": 0, "seed": 5,
                          "exit_code": 0}
    other = run_cli("superres", "a.png", "-o", "out", "--seed", "5", "--steps", "3", "--dry-run")
    assert other.stdout.splitlines()[0].startswith("fail a.png -> out/a.png")
    assert "--steps differs (2, this run 3)" in other.stdout
    assert sorted(p.name for p in (photos / "out").iterdir()) == before, "a dry run writes nothing"


def test_dry_run_adopts_the_jobs_seed_like_a_run(photos: Path) -> None:
    assert run_cli("superres", "a.png", "-o", "out", "--seed", "77", "--steps", "2", "--quiet").exit_code == 0
    result = run_cli("superres", "a.png", "-o", "out", "--steps", "2", "--dry-run")
    assert "(seed 77)" in result.stdout.splitlines()[-1] and result.stdout.startswith("skip a.png")


def test_dry_run_refuses_what_a_run_would_refuse(photos: Path, no_model: None) -> None:
    result = run_cli("tile-synth", "--width", "100000", "--height", "100000", "-o", "big", "--dry-run")
    assert result.exit_code == 2 and "--max-output-pixels" in result.stderr
    assert not (photos / "big").exists()


def test_dry_run_lists_an_input_too_large_as_fail_and_plans_the_rest(photos: Path, no_model: None) -> None:
    Image.new("RGB", (40, 30)).save(photos / "big.png")  # x4: 160x120 = 19200 pixels
    result = run_cli("superres", "big.png", "a.png", "--max-output-pixels", "4096", "-o", "out", "--dry-run",
                     "--seed", "5")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("run  a.png -> out/a.png")
    assert lines[1].startswith("fail big.png -> out/big.png (seed ")
    assert lines[1].endswith("): big.png: the output would be 160x120 = 19200 pixels, over --max-output-pixels "
                             "4096; make it smaller, or give --max-output-pixels 19200 (0 = no limit) if this "
                             "machine can hold it")
    assert lines[2].startswith("plan: 2 items (1 too large to run), largest output 64x64")
    assert lines[3] == "dry run: 1 to run, 0 skipped, 1 would fail (seed 5); nothing was loaded or written"
    assert not (photos / "out").exists()


@pytest.mark.parametrize("command", [["txt2img", "--prompt", "a red fox"], ["sample", "--n", "2"],
                                     ["img2img", "a.png", "--prompt", "a"], ["inpaint", "a.png", "b.png"],
                                     ["tile-synth", "--width", "64", "--height", "64"]])
def test_every_task_command_has_a_dry_run(photos: Path, no_model: None, command: list[str]) -> None:
    result = run_cli(*command, "-o", "out", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["dry_run"] is True and events[-1]["to_run"] >= 1
    assert not (photos / "out").exists()


def test_a_dry_run_sweep_ends_with_one_summary_event_for_every_cell(tmp_path: Path) -> None:
    """Each cell of `--sweep` sent a `summary` event of its own: a reader stopping at the first took a
    two-cell run for one of half its items."""
    result = run_cli("txt2img", "--prompt", "a red circle", "--sweep", "steps=1,2", "--sweep", "cfg=1,3", "--seed", "1",
                     "-o", tmp_path / "out", "--json", "--dry-run")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [event["event"] for event in events].count("summary") == 1
    assert events[-1] == {"event": "summary", "dry_run": True, "to_run": 4, "skipped": 0, "failing": 0, "seed": 1,
                          "exit_code": 0}
    assert len([event for event in events if event["event"] == "dry-run"]) == 4
