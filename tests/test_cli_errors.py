"""One error style and one exit-code rule for the whole CLI (issue 16; README "Running from cron").

Every row is a wrong invocation: it must end with exactly one line on stderr (`ldmtool: error: ...`, or one
`ldmtool: failed: ...` per bad item), the documented exit code (2 usage error found before any work, 3 a
model that cannot load, 1 item failures), and never a traceback. With `--json`, the last stdout line is a
`summary` event carrying the exit code, however the run ended.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.clirun import run_cli


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wrong")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "img.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(folder / "mask.png")
    (folder / "text.ckpt").write_text("not a checkpoint")
    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    (folder / "prompts.txt").write_text("")
    return folder


# (arguments, exit code, text the one stderr line must contain)
WRONG = [
    (["superres", "img.png", "--bogus"], 2, "No such option: --bogus"),
    (["txt2img", "--prompt", "a", "--width", "abc"], 2, "'--width'"),
    (["superres", "img.png", "--steps", "-3"], 2, "'--steps'"),
    (["superres", "nosuch.png"], 2, "nosuch.png: no such file or folder"),
    (["txt2img", "--prompt", "a", "--lora-dir", "no/such/dir"], 2, "--lora-dir no/such/dir: not a folder"),
    (["txt2img", "--prompt", "a", "--embeddings-dir", "img.png"], 2, "--embeddings-dir img.png: not a folder"),
    (["superres", "img.png", "--model", "nosuch"], 2, "--model nosuch: not a file, a shipped model"),
    (["superres", "img.png", "--model", "nosuch.safetensors"], 2, "nosuch.safetensors: no such checkpoint file"),
    (["superres", "img.png", "--model", "broken.safetensors"], 3, "broken.safetensors"),
    (["superres", "img.png", "--model", "text.ckpt"], 3, "text.ckpt"),
    (["superres", "img.png", "--max-memory", "4XB"], 2, "--max-memory '4XB'"),
    (["superres", "img.png", "--max-memory", "0"], 2, "--max-memory"),
    (["superres", "img.png", "--scale", "inf"], 2, "--scale"),
    (["superres", "img.png", "--prompt", "a cat"], 2, "takes no prompt"),
    (["inpaint", "img.png", "mask.png", "--prompt", "hi"], 2, "takes no prompt"),
    (["inpaint", "img.png", "mask.png", "--cfg", "7"], 2, "classifier-free guidance cannot run"),
    (["superres", "img.png", "--cfg", "7"], 2, "classifier-free guidance cannot run"),
    (["sample", "--n", "1", "--cfg", "3"], 2, "classifier-free guidance cannot run"),
    (["sample", "--class", "5", "--n", "1"], 2, "--class"),
    (["sample", "--n", "1", "--sampler", "euler", "--eta", "0.5"], 2, "--eta"),
    (["txt2img", "--prompts", "prompts.txt"], 2, "prompts.txt"),
    (["txt2img"], 2, "--prompt"),
    (["info", "nosuch.png"], 1, "nosuch.png: no such file"),
    (["replay", "nosuch.png"], 1, "nosuch.png: no such file"),
    (["models", "inspect", "nosuch.safetensors"], 2, "nosuch.safetensors: no such checkpoint file"),
    (["models", "inspect", "text.ckpt"], 3, "text.ckpt"),
    (["models", "convert", "text.ckpt", "out.safetensors"], 3, "text.ckpt"),
    (["manifest", "merge", "missing/"], 2, "missing: not a folder"),
    (["train", "--help-me"], 2, "No such option: --help-me"),
    (["train", "autoencoder", "--data", ".", "--lr", "inf", "-o", "run"], 2, "'--lr': inf is not a finite number"),
    (["train", "diffusion", "--first-stage", "x", "--data", ".", "--scale-factor", "inf", "-o", "run"], 2,
     "'--scale-factor': inf is not a finite number"),
    (["train", "controlnet", "--hint", "tile", "--down", "inf", "-o", "run"], 2, "'--down': inf is not a finite"),
    (["train", "autoencoder", "--data", ".", "--scale-factor", "0.5", "-o", "run"], 2, "No such option: --scale-factor"),
    (["train", "export", "run", "--name", "x", "--default-cfg", "inf"], 2, "'--default-cfg': inf is not a finite"),
    (["train", "export", "run", "--name", "../x"], 2, "'--name': '../x' is not a plain file name"),
    (["train", "export", "run", "--name", "sub/x"], 2, "'--name': 'sub/x' is not a plain file name"),
    (["train", "export", "run", "--name", ".."], 2, "'--name': '..' is not a plain file name"),
    (["train", "export", "run", "--name", "x", "--first-stage-file", "../ae.safetensors"], 2,
     "'--first-stage-file': '../ae.safetensors' is not a plain file name"),
    (["nosuchcommand"], 2, "No such command"),
]


@pytest.mark.parametrize(("args", "code", "text"), WRONG, ids=[" ".join(row[0]) for row in WRONG])
def test_wrong_invocation_is_one_line_and_the_documented_code(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                               args: list[str], code: int, text: str) -> None:
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LDMTOOL_CACHE", str(workdir / "cache"))
    monkeypatch.delenv("LDMTOOL_DEBUG", raising=False)
    task = args[0] in ("superres", "txt2img", "inpaint", "sample")
    result = run_cli(*args, *(["-o", "out"] if task else []))
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.output
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("ldmtool: error: "), result.stderr
    assert text in lines[0], lines[0]
    if task:
        assert not (workdir / "out").exists(), "a run that wrote nothing leaves no output folder"


def test_an_item_limit_names_the_option_that_lifts_it(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    result = run_cli("superres", "img.png", "--max-pixels", "100", "-o", "limited", "--quiet")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "ldmtool: failed: img.png: 16x16 is 256 pixels, over the limit of 100 (raise it with --max-pixels or "
        "LDMTOOL_MAX_PIXELS if the file is trusted)"]


@pytest.mark.parametrize(("args", "code"), [
    (["superres", "img.png", "--bogus"], 2),
    (["superres", "img.png", "--model", "nosuch.safetensors"], 2),
    (["superres", "img.png", "--model", "broken.safetensors"], 3),
    (["superres", "img.png", "--max-pixels", "100"], 1),
    (["superres", "img.png"], 0),
])
def test_json_runs_always_end_with_a_summary_event(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                   args: list[str], code: int) -> None:
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LDMTOOL_CACHE", str(workdir / "cache"))
    result = run_cli(*args, "--json", "--steps", "2", "-o", os.fspath(workdir / f"json-{code}"))
    assert result.exit_code == code, result.output
    last = json.loads(result.stdout.splitlines()[-1])
    assert last["event"] == "summary" and last["exit_code"] == code
    assert ("error" in last) == (code in (2, 3))
    assert sum(json.loads(line)["event"] == "summary" for line in result.stdout.splitlines()) == 1


def test_an_interrupted_json_run_ends_with_a_summary_event(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ldmtool.runtime import execution

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(execution.JobRunner, "_run_batch", interrupt)
    result = run_cli("superres", "img.png", "--json", "-o", "stopped")
    assert result.exit_code == 130
    last = json.loads(result.stdout.splitlines()[-1])
    assert last["event"] == "summary" and last["exit_code"] == 130 and "interrupted" in last["error"]
