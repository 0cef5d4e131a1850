"""Run-wide settings are checked before any item runs (issue 26 item 5, issue 16's exit codes).

A setting that every item would fail on (a memory budget, a scale, an environment limit, a sampler option
the sampler does not take) is a usage error: exit 2, one line `ldmtool: error: ...` naming the option and
its value, no output folder left behind and no item attempted (no manifest, no 'failed' event). Before,
each of these failed every item (exit 1) and left an output folder with a manifest of failures.

superres with a model conditioned on the low-res image alone (the shipped default, LDM BSR) and `--prompt`,
`--negative` or `--cfg`: these changed nothing and were silently ignored (exit 0); they are now refused with
exit 2 and a line saying the model takes no prompt / has no unconditional input for guidance. The model must
be loaded to know this, so the check runs when the task opens: still before any item, and the output folder
the run made is removed again because it is empty.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clirun import run_cli
from ldmtool.errors import FatalError, Interrupted, UsageError
from ldmtool.io.discover import Item, generated_items
from ldmtool.runtime.jobs import BaseTask, Job, Output, RunOptions
from ldmtool.runtime.runner import run_task


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "in0.png"
    Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _assert_refused(result, out, *words):
    """Exit 2 with one error line naming `words`, no output folder, no item event on stdout."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldmtool: error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))  # no folder, so no manifest either
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert not [event for event in events if event.get("status") == "failed"], events


@pytest.mark.parametrize("args, words", [
    (["--max-memory", "0"], ["--max-memory", "'0'", "more than zero"]),
    (["--max-memory", "-5GB"], ["--max-memory", "'-5GB'", "4GB"]),
    (["--max-memory", "4XB"], ["--max-memory", "'4XB'", "4GB"]),
    (["--scale", "inf"], ["--scale inf", "finite number more than 1"]),
    (["--cfg", "nan"], ["--cfg nan", "finite"]),
    (["--sampler", "euler", "--eta", "0.5"], ["--eta 0.5", "euler", "ddim"]),
    # the default superres model (LDM BSR) takes neither a prompt nor guidance: refused, not ignored
    (["--prompt", "x"], ["--prompt 'x'", "takes no prompt"]),
    (["--negative", "blurry"], ["--negative 'blurry'", "takes no prompt"]),
    (["--cfg", "7"], ["--cfg 7.0", "classifier-free guidance"]),
])
def test_superres_settings_are_refused_before_any_item(tmp_path, photo, args, words):
    out = tmp_path / "o1"
    result = run_cli("superres", photo, "-o", out, "--steps", "1", "--json", *args)
    _assert_refused(result, out, *words)


@pytest.mark.parametrize("name, value, words", [
    ("LDMTOOL_MAX_PIXELS", "abc", ["LDMTOOL_MAX_PIXELS='abc'", "whole number"]),
    ("LDMTOOL_MAX_PIXELS", "0", ["LDMTOOL_MAX_PIXELS='0'", "at least 1"]),
    ("LDMTOOL_MAX_PIXELS", "-1", ["LDMTOOL_MAX_PIXELS='-1'", "at least 1"]),
    ("LDMTOOL_MAX_FILE_BYTES", "abc", ["LDMTOOL_MAX_FILE_BYTES='abc'", "whole number"]),
])
def test_input_limits_from_the_environment_are_checked_once(tmp_path, photo, monkeypatch, name, value, words):
    monkeypatch.setenv(name, value)
    out = tmp_path / "o1"
    result = run_cli("superres", photo, "-o", out, "--steps", "1", "--json")
    _assert_refused(result, out, *words)


@pytest.mark.parametrize("args, words", [
    (["--sampler", "euler", "--eta", "0.5"], ["--eta 0.5", "euler sampler", "ddim, euler_a"]),
    (["--eta", "inf"], ["--eta inf", "finite"]),
    (["--temperature", "inf"], ["--temperature inf", "finite"]),
    (["--max-memory", "0"], ["--max-memory '0'"]),
])
def test_sample_settings_are_refused_before_any_item(tmp_path, args, words):
    out = tmp_path / "o2"
    result = run_cli("sample", "--n", "2", "-o", out, "--steps", "1", "--json", *args)
    _assert_refused(result, out, *words)


def test_new_parent_folders_are_removed_too(tmp_path, photo):
    out = tmp_path / "new" / "deeper" / "o"
    result = run_cli("superres", photo, "-o", out, "--steps", "1", "--prompt", "x")  # refused when the model opens
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("args", [["--max-memory", "0"], ["--prompt", "x"]])
def test_an_existing_empty_output_folder_is_kept(tmp_path, photo, args):
    out = tmp_path / "existing"
    out.mkdir()
    result = run_cli("superres", photo, "-o", out, "--steps", "1", *args)
    assert result.exit_code == 2, result.output
    assert out.is_dir() and not list(out.iterdir())


# -- the runner's side of the contract, with a task that needs no model


class _Task(BaseTask):
    command = "probe"

    def __init__(self, *, bad: str = ""):
        super().__init__()
        self.bad = bad
        self.loaded = 0

    def validate(self) -> None:
        if self.bad == "validate":
            raise UsageError("--probe 0: must be at least 1")

    def open(self) -> None:
        if self.bad == "open":
            raise FatalError("the probe model cannot load")

    def load(self, job: Job) -> None:
        self.loaded += 1

    def run(self, jobs: list[Job]) -> list[Output]:
        if self.bad == "interrupt":
            raise KeyboardInterrupt
        return [Output(image=np.zeros((4, 4, 3), np.uint8)) for _ in jobs]


def _items() -> list[Item]:
    return generated_items(["a"], samples=2)


@pytest.mark.parametrize("bad, error", [("validate", UsageError), ("open", FatalError),
                                        ("interrupt", Interrupted)])
def test_a_run_that_writes_nothing_leaves_no_folder(tmp_path, bad, error):
    task = _Task(bad=bad)
    out = tmp_path / "made" / "out"
    with pytest.raises(error):
        run_task(task, _items(), RunOptions(output=out, seed=1, quiet=True))
    assert not (tmp_path / "made").exists()
    if bad == "validate":
        assert task.loaded == 0


def test_a_run_that_writes_keeps_its_folder(tmp_path):
    out = tmp_path / "out"
    summary = run_task(_Task(), _items(), RunOptions(output=out, seed=1, quiet=True))
    assert summary.exit_code == 0
    assert len(list(out.glob("*.png"))) == 2
