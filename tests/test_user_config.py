"""Defaults from a config file, overridden by the environment and the command line (issue 16)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from ldmtool.io.manifest import MANIFEST_NAME, read_manifest
from tests.clirun import ensure_test_commands, run_cli


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LDMTOOL_TEST_COMMANDS", "1")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("LDMTOOL_CONFIG", raising=False)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "a.png")
    return tmp_path


def _write(folder: Path, text: str, name: str = "config.yaml") -> Path:
    path = folder / "xdg" / "ldmtool" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _invert(*args: str):  # the test-only command goes through the real runner and options
    ensure_test_commands()
    return run_cli("_invert", *args)


def test_config_sets_defaults_and_the_command_line_wins(folder: Path) -> None:
    _write(folder, "defaults:\n  output: from-config\n  format: jpg\n")
    result = _invert("a.png", "--json")
    assert result.exit_code == 0, result.output
    assert (folder / "from-config" / "a.jpg").is_file()
    result = _invert("a.png", "-o", "from-cli", "--json")
    assert result.exit_code == 0 and (folder / "from-cli" / "a.jpg").is_file()
    assert not (folder / "from-cli" / "a.png").exists()


def test_environment_overrides_the_config_file(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(folder, "superres:\n  steps: 3\n  output: out\n")
    monkeypatch.setenv("LDMTOOL_CACHE", str(folder / "cache"))
    assert run_cli("superres", "a.png", "--quiet").exit_code == 0
    monkeypatch.setenv("LDMTOOL_SUPERRES_STEPS", "2")
    assert run_cli("superres", "a.png", "-o", "env", "--quiet").exit_code == 0
    steps = {record["output"].split("/")[0]: record["params"]["steps"]
             for out in ("out", "env") for record in read_manifest(folder / out / MANIFEST_NAME)}
    assert steps == {"out": 3, "env": 2}


def test_environment_variables_are_named_after_the_flags(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LDMTOOL_<COMMAND>_FORMAT and _JSON were ignored without a word: Click named them after the parameters
    (_FMT, _JSON_OUT); those names keep working."""
    monkeypatch.setenv("LDMTOOL__INVERT_FORMAT", "jpg")
    monkeypatch.setenv("LDMTOOL__INVERT_JSON", "1")
    result = _invert("a.png", "-o", "flags")
    assert result.exit_code == 0, result.output
    assert (folder / "flags" / "a.jpg").is_file()
    assert json.loads(result.stdout.splitlines()[-1])["event"] == "summary"
    monkeypatch.delenv("LDMTOOL__INVERT_FORMAT")
    monkeypatch.setenv("LDMTOOL__INVERT_FMT", "webp")
    assert _invert("a.png", "-o", "names").exit_code == 0
    assert (folder / "names" / "a.webp").is_file()


def test_a_bad_environment_value_is_an_error_naming_the_variable(folder: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The message named '--quality' alone, an option the command line did not have."""
    monkeypatch.setenv("LDMTOOL__INVERT_QUALITY", "500")
    result = _invert("a.png")
    assert result.exit_code == 2
    assert result.stderr.startswith("ldmtool: error: LDMTOOL__INVERT_QUALITY='500': Invalid value for '--quality'")
    assert len(result.stderr.strip().splitlines()) == 1
    result = _invert("a.png", "--quality", "500")
    assert result.exit_code == 2 and result.stderr.startswith("ldmtool: error: Invalid value for '--quality'")


@pytest.mark.parametrize("source", ["environment", "config"])
def test_json_from_the_environment_or_config_ends_a_usage_error_with_a_summary(
        folder: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    """Only a --json on the command line gave a run that stopped on a usage error its final summary event."""
    if source == "environment":
        monkeypatch.setenv("LDMTOOL__INVERT_JSON", "1")
    else:
        _write(folder, "_invert:\n  json: true\n")
    result = _invert("a.png", "--batch-size", "0")
    assert result.exit_code == 2
    (event,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert event["event"] == "summary" and event["exit_code"] == 2


@pytest.mark.parametrize(("text", "message"), [
    ("nosuch:\n  steps: 3\n", "[nosuch] is not an ldmtool command"),
    ("superres:\n  stepz: 3\n", "'stepz' in [superres] is not an option of superres"),
    ("superres:\n  steps: many\n", "--steps = 'many' for superres"),
    ("superres: [1, 2]\n", "the config file holds sections"),
    ("superres:\n  steps: [\n", "not valid YAML"),
    ("train:\n  steps: 3\n", "'steps' in [train] is not a command of train"),
    ("train:\n  autoencoder:\n    stepz: 3\n", "'stepz' in [train autoencoder] is not an option of train autoencoder"),
    ("train:\n  autoencoder:\n    lr: inf\n", "--lr = 'inf' for autoencoder"),
    ("superres:\n  steps: yes\n", "--steps = True for superres: a yes/no value"),  # it ran 1 step
    ("defaults:\n  batch-size: on\n", "--batch-size = True for"),
])
def test_a_bad_config_file_is_a_usage_error_naming_it(folder: Path, text: str, message: str) -> None:
    path = _write(folder, text)
    result = _invert("a.png")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [result.stderr.splitlines()[0]] and str(path) in result.stderr
    assert message in result.stderr


def test_config_show_lists_the_file_and_each_commands_defaults(folder: Path) -> None:
    path = _write(folder, "defaults:\n  device: cpu\nsuperres:\n  scale: 2\n")
    result = run_cli("config", "show", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["file"] == str(path)
    assert shown["defaults"]["superres"] == {"device": "cpu", "scale": 2}
    assert shown["defaults"]["txt2img"] == {"device": "cpu"}
    assert "replay" not in shown["defaults"] and "info" not in shown["defaults"]


def test_config_sections_for_subcommands_set_their_defaults(folder: Path) -> None:
    _write(folder, "train:\n  autoencoder:\n    steps: 3\nmodels:\n  list:\n    json: true\n")
    result = run_cli("models", "list")
    assert result.exit_code == 0, result.output
    assert "presets" in json.loads(result.stdout)
    shown = run_cli("config", "show")
    assert shown.exit_code == 0 and "train autoencoder:\n  steps: 3" in shown.stdout
    assert json.loads(run_cli("config", "show", "--json").stdout)["defaults"]["train"] == {"autoencoder": {"steps": 3}}


def test_config_file_named_by_the_environment(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (folder / "mine.yaml").write_text("defaults:\n  output: mine\n")
    monkeypatch.setenv("LDMTOOL_CONFIG", str(folder / "mine.yaml"))
    assert _invert("a.png").exit_code == 0 and (folder / "mine" / "a.png").is_file()
    monkeypatch.setenv("LDMTOOL_CONFIG", str(folder / "missing.yaml"))
    result = _invert("a.png")
    assert result.exit_code == 2 and "missing.yaml: no such config file" in result.stderr


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is in Python 3.11+")
def test_toml_config(folder: Path) -> None:
    _write(folder, '[defaults]\noutput = "toml-out"\n', name="config.toml")
    assert _invert("a.png").exit_code == 0 and (folder / "toml-out" / "a.png").is_file()
