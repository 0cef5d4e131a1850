"""A model or add-on file changed under a running job (runtime/watch.py): written in place, the job stops before
it writes an output computed from (or recorded as) the other file; replaced by a rename, it keeps the file it
mapped, whose hash its outputs record."""
import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from ldmtool.checkpoints.files import save_safetensors
from ldmtool.checkpoints.tiny import save_tiny_checkpoint
from ldmtool.runtime import execution
from ldmtool.runtime.cache import FileIdentity
from ldmtool.runtime.watch import FileWatch, ModelFileChanged, note_hashed, note_loaded
from test_runner_cli import events, item_events, ldmtool
from test_seeds_resume_replay import _recipe

PROMPTS = "a red fox\na blue bird\n"


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another tiny SD 1.x checkpoint's bytes, the same size as `model`'s (same shapes, other weights)."""
    path = tmp_path_factory.mktemp("other") / "sd1.safetensors"
    save_tiny_checkpoint(path, "sd1", seed=2)
    return path.read_bytes()


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.safetensors"
    save_tiny_checkpoint(path, "sd1", seed=1, with_config=True)
    return path


def _rewrite_in_place(path, content):
    """`cp other path` with its mtime put back: the same inode and size, other bytes; only the ctime tells."""
    before = path.stat()
    assert len(content) == before.st_size
    with open(path, "r+b") as handle:
        handle.write(content)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _run(tmp_path, model, *extra, prompts=PROMPTS):
    (tmp_path / "p.txt").write_text(prompts)
    return ldmtool("txt2img", "--prompts", "p.txt", "--model", model, "-o", "out", "--seed", 5, "--steps", 2,
                   "--sampler", "euler", "-W", 64, "-H", 64, "--json", *extra, cwd=tmp_path)


def _after_first_write(monkeypatch, change):
    """Call `change()` once the run's first output is written (an item boundary)."""
    real = execution.write_image

    def write_then_change(*args, **kwargs):
        real(*args, **kwargs)
        if not getattr(write_then_change, "done", False):
            write_then_change.done = True
            change()

    monkeypatch.setattr(execution, "write_image", write_then_change)


def _while_second_computes(monkeypatch, change):
    """Call `change()` after the second item has been computed, before it is written."""
    real, calls = execution.JobRunner._write, []

    def change_then_write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            change()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(execution.JobRunner, "_write", change_then_write)


@pytest.mark.parametrize("when", [_after_first_write, _while_second_computes])
def test_a_model_rewritten_in_place_mid_run_stops_it_before_the_next_output(tmp_path, model, other, monkeypatch, when):
    when(monkeypatch, lambda: _rewrite_in_place(model, other))
    result = _run(tmp_path, model)
    message = f"{model} changed while this run used it; its outputs would not match their recorded model; rerun"
    assert result.returncode == 3, result.stderr
    assert f"ldmtool: error: {message}" in result.stderr
    done, failed = item_events(result)
    assert (done["event"], failed["event"], failed["error"]) == ("done", "failed", f"{failed['key']}: {message}")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [os.path.basename(done["output"])]
    assert events(result)[-1]["exit_code"] == 3


def test_a_model_replaced_by_rename_mid_run_is_kept_and_recorded_as_the_file_it_was(tmp_path, model, other,
                                                                                   monkeypatch):
    loaded = hashlib.sha256(model.read_bytes()).hexdigest()
    new = tmp_path / "new.safetensors"
    new.write_bytes(other)
    _after_first_write(monkeypatch, lambda: os.replace(new, model))
    result = _run(tmp_path, model)
    assert result.returncode == 0, result.stderr
    outputs = sorted((tmp_path / "out").glob("*.png"))
    assert len(outputs) == 2 and {_recipe(p)[0]["model_sha256"] for p in outputs} == {loaded}


def _vae(folder, seed):
    from ldmtool.checkpoints.tiny import tiny_model

    path = folder / "vae.safetensors"
    state = tiny_model("sd1", seed).state_dict()
    save_safetensors({k.removeprefix("first_stage_model."): v for k, v in state.items()
                      if k.startswith("first_stage_model.")}, path)
    return path, ["--vae", path]


def _embedding(folder, seed):
    path = folder / "emb" / "fox-style.safetensors"
    path.parent.mkdir(exist_ok=True)
    save_safetensors({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(seed))}, path)
    return path, ["--embeddings-dir", path.parent]


@pytest.mark.parametrize("addon", [_vae, _embedding])
def test_an_addon_file_rewritten_in_place_mid_run_stops_it(tmp_path, model, monkeypatch, addon):
    (tmp_path / "other").mkdir()
    other, _ = addon(tmp_path / "other", 2)  # the same size, other weights
    path, args = addon(tmp_path, 1)
    _after_first_write(monkeypatch, lambda: _rewrite_in_place(path, other.read_bytes()))
    result = _run(tmp_path, model, *args, prompts="a fox-style fox\na fox-style bird\n")
    assert result.returncode == 3, result.stderr
    assert f"ldmtool: error: {path} changed while this run used it" in result.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def _identity(path):
    return FileIdentity.of(path)


def test_the_watch_tells_in_place_changes_from_renames_and_removals(tmp_path):
    a, b, c = (tmp_path / name for name in "abc")
    for path in (a, b, c):
        path.write_bytes(b"weights")
    watch = FileWatch()
    try:
        note_loaded(_identity(a), _identity(b), _identity(c), _identity(tmp_path))  # a folder is not watched
        watch.check()
        (tmp_path / "new").write_bytes(b"other weights")
        os.replace(tmp_path / "new", b)  # renamed over: the run keeps what it mapped
        c.unlink()
        watch.check()
        with open(a, "r+b") as handle:
            handle.write(b"W")
        with pytest.raises(ModelFileChanged, match=f"^{a} changed while this run used it"):
            watch.check()
    finally:
        watch.close()
    note_loaded(_identity(b))  # a closed watch notes nothing
    with pytest.raises(ModelFileChanged):
        watch.check()  # (it stays stopped)


@pytest.mark.parametrize("first", ["hashed", "loaded"])
def test_a_path_hashed_or_loaded_as_two_files_in_one_run_stops_it(tmp_path, first):
    """The identity hashed one file and the run loaded another under its name (or loaded it again after a rename)."""
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"first")
    watch = FileWatch()
    try:
        (note_hashed if first == "hashed" else note_loaded)(_identity(model))
        (tmp_path / "new").write_bytes(b"second")
        os.replace(tmp_path / "new", model)
        note_loaded(_identity(model))
        with pytest.raises(ModelFileChanged, match="m.safetensors changed while this run used it"):
            watch.check()
    finally:
        watch.close()


def test_a_file_only_hashed_is_not_watched(tmp_path):
    """A control hint or any other file hashed for the identity but read per item is an input, not weights."""
    hint = tmp_path / "hint.png"
    hint.write_bytes(b"one")
    watch = FileWatch()
    try:
        note_hashed(_identity(hint))
        hint.write_bytes(b"two")
        note_hashed(_identity(hint))
        watch.check()
    finally:
        watch.close()


CUT_SHORT = textwrap.dedent("""
    import mmap, os, sys
    from ldmtool.runtime.watch import report_crashes

    report_crashes()
    with open(sys.argv[1], "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    os.truncate(sys.argv[1], 0)  # `wget -O` starting over the file a run has mapped
    mapped[40000]
""")


def test_a_mapped_file_cut_short_is_a_bus_error_that_says_so(tmp_path):
    """SIGBUS cannot become a message naming the file (runtime/watch.py); the CLI at least says what it was."""
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"w" * 65536)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    result = subprocess.run([sys.executable, "-c", CUT_SHORT, str(path)], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == -signal.SIGBUS  # a shell reports 135
    assert result.stderr.startswith("Fatal Python error: Bus error"), result.stderr


def test_the_cli_reports_crashes(tmp_path, monkeypatch):
    from ldmtool.runtime import watch

    calls = []
    monkeypatch.setattr(watch, "report_crashes", lambda: calls.append(1))
    assert ldmtool("--version", cwd=tmp_path).returncode == 0 and calls == [1]
