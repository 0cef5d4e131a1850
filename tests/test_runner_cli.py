"""The batch runner, driven through the real CLI with the test-only `_invert` command.

Covers discovery (folder, glob, recursive, @list, stdin), mask pairing, output mapping and templates,
resume, `--json` events, the manifest, exit codes, Ctrl-C/SIGTERM; plus in-process checks of the Task
contract (batches, per-item failures, isolation of a bad item inside a batch).
"""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clirun import ensure_test_commands
from ldmtool.errors import ItemError, UsageError
from ldmtool.io.discover import Item, discover, sanitize_name
from ldmtool.io.gallery import GALLERY_NAME, THUMBS
from ldmtool.io.manifest import MANIFEST_NAME, read_manifest
from ldmtool.io.outputs import OutputSpec, plan_outputs
from ldmtool.runtime.report import Reporter
from ldmtool.runtime.runner import BaseTask, Output, RunOptions, run_task
from ldmtool.runtime.seeds import derive_seed


def _env(**extra):
    env = dict(os.environ, LDMTOOL_TEST_COMMANDS="1", **extra)
    env.pop("LDMTOOL_DEBUG", None)
    return env


def ldmtool(*args, cwd, stdin=None, **env):
    """Run the real CLI entry point in this process (cwd, argv, stdin, env as a subprocess would see them)."""
    from ldmtool.cli.app import main

    ensure_test_commands()
    args = [str(a) for a in args]
    saved = (os.getcwd(), sys.argv, sys.stdin, dict(os.environ))
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        os.chdir(cwd)
        sys.argv, sys.stdin = ["ldmtool", *args], io.StringIO(stdin or "")
        os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(args)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        os.chdir(saved[0])
        sys.argv, sys.stdin = saved[1], saved[2]
        os.environ.clear()
        os.environ.update(saved[3])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def ldmtool_process(*args, cwd, **env):
    return subprocess.run([sys.executable, "-m", "ldmtool", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=_env(**env), timeout=120)


def events(result):
    return [json.loads(line) for line in result.stdout.splitlines()]


def item_events(result):
    return [e for e in events(result) if e["event"] not in ("summary", "plan")]


def _save(path: Path, colour=(10, 100, 200), size=(6, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture
def tree(tmp_path):
    """in/a.png, in/b.jpg, in/sub/c.png, in/sub/deeper/d.png, in/notes.txt, in/.hidden.png"""
    root = tmp_path / "in"
    _save(root / "a.png", (10, 20, 30))
    Image.new("RGB", (6, 4), (200, 0, 0)).save(root / "b.jpg", quality=100)
    _save(root / "sub" / "c.png", (0, 255, 0))
    _save(root / "sub" / "deeper" / "d.png", (1, 2, 3))
    (root / "notes.txt").write_text("not an image")
    _save(root / ".hidden.png")
    return tmp_path


# ---------------------------------------------------------------- discovery


def test_folder_is_not_descended_without_recursive(tree):
    result = ldmtool("_invert", "in", "-o", "out", "--json", "--seed", 1, cwd=tree)
    assert result.returncode == 0, result.stderr
    assert sorted(e["key"] for e in item_events(result)) == ["a.png", "b.jpg"]
    assert result.stderr.count("skipped 1 non-image file(s): in/notes.txt") == 1
    np.testing.assert_array_equal(_pixels(tree / "out" / "a.png")[0, 0], [245, 235, 225])


def test_recursive_folder_mirrors_subfolders(tree):
    result = ldmtool("_invert", "in", "-r", "-o", "out", "--json", cwd=tree)
    assert result.returncode == 0, result.stderr
    outputs = sorted(e["output"] for e in item_events(result))
    assert outputs == ["out/a.png", "out/b.png", "out/sub/c.png", "out/sub/deeper/d.png"]
    np.testing.assert_array_equal(_pixels(tree / "out" / "sub" / "c.png")[0, 0], [255, 0, 255])
    assert not (tree / "out" / ".hidden.png").exists()


def test_glob_keys_are_relative_to_the_glob_root(tree):
    result = ldmtool("_invert", "in/**/*.png", "-o", "out", "--json", cwd=tree)
    assert result.returncode == 0, result.stderr
    assert sorted(e["key"] for e in item_events(result)) == ["a.png", "sub/c.png", "sub/deeper/d.png"]
    assert (tree / "out" / "sub" / "deeper" / "d.png").exists()


def test_glob_without_matches_is_a_usage_error(tree):
    result = ldmtool("_invert", "in/*.tiff", "-o", "out", cwd=tree)
    assert result.returncode == 2
    assert result.stderr.strip() == "ldmtool: error: in/*.tiff: no files match this pattern"


def test_list_file_entries_are_relative_to_the_list(tree):
    (tree / "in" / "list.txt").write_text("# my picks\na.png\n\nsub/c.png\nmissing.png\n")
    result = ldmtool("_invert", "@in/list.txt", "-o", "out", "--json", cwd=tree)
    assert result.returncode == 1
    by_key = {e["key"]: e for e in item_events(result)}
    assert by_key["a.png"]["event"] == "done" and by_key["c.png"]["event"] == "done"
    assert by_key["missing.png"]["event"] == "failed"
    assert "in/missing.png: no such file" in by_key["missing.png"]["error"]


def test_stdin_list(tree):
    result = ldmtool("_invert", "-", "-o", "out", "--json", cwd=tree, stdin="in/a.png\nin/sub\n")
    assert result.returncode == 0, result.stderr
    assert sorted(e["key"] for e in item_events(result)) == ["a.png", "c.png"]


def test_missing_command_line_path_is_a_usage_error(tree):
    result = ldmtool("_invert", "nope.png", cwd=tree)
    assert result.returncode == 2
    assert result.stderr.strip() == "ldmtool: error: nope.png: no such file or folder"


def test_same_name_from_two_folders_is_refused(tree):
    _save(tree / "other" / "a.png")
    result = ldmtool("_invert", "in/a.png", "other/a.png", cwd=tree)
    assert result.returncode == 2 and "same name" in result.stderr


def test_discovery_order_and_keys(tmp_path):
    for name in ["img10.png", "img2.png", "img1.png"]:
        _save(tmp_path / name)
    keys = [item.key for item in discover([str(tmp_path)]).items]
    assert keys == ["img1.png", "img2.png", "img10.png"]


def test_sanitize_name():
    assert sanitize_name("a cat / on ../ the mat!") == "a-cat-on-the-mat"
    assert sanitize_name("...") == "item"
    assert len(sanitize_name("x" * 500)) == 80


# ---------------------------------------------------------------- pairing


def _mask(path: Path, box, size=(6, 4)):
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)


def test_mask_beside_is_paired_and_not_an_item(tmp_path):
    _save(tmp_path / "in" / "x.png", (0, 0, 0))
    _mask(tmp_path / "in" / "x_mask.png", (0, 0, 3, 4))
    _save(tmp_path / "in" / "y_mask.png", (0, 0, 0))  # no y.png: an ordinary image, inverted whole
    result = ldmtool("_invert", "in", "--pair-masks", "-o", "out", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(e["key"] for e in item_events(result)) == ["x.png", "y_mask.png"]
    pixels = _pixels(tmp_path / "out" / "x.png")
    assert (pixels[:, :3] == 255).all() and (pixels[:, 3:] == 0).all()
    assert (_pixels(tmp_path / "out" / "y_mask.png") == 255).all()


def test_items_know_their_mask(tmp_path):
    _save(tmp_path / "x.png")
    _save(tmp_path / "y.png")
    _save(tmp_path / "x_mask.png")
    x, y = discover([str(tmp_path)], pair_masks=True).items
    assert x.require_mask() == tmp_path / "x_mask.png" and y.mask is None
    with pytest.raises(ItemError, match=r"y.png: no mask found \(expected y_mask.png beside it"):
        y.require_mask()


def test_masks_folder(tmp_path):
    _save(tmp_path / "in" / "sub" / "x.png", (0, 0, 0))
    _mask(tmp_path / "masks" / "sub" / "x.png", (0, 0, 6, 2))
    result = ldmtool("_invert", "in", "-r", "--masks", "masks", "--invert-mask", "-o", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pixels = _pixels(tmp_path / "out" / "sub" / "x.png")
    assert (pixels[:2] == 0).all() and (pixels[2:] == 255).all()


def test_explicit_image_mask_pair(tmp_path):
    _save(tmp_path / "photo.png", (0, 0, 0))
    _mask(tmp_path / "hole.png", (5, 3, 6, 4))
    result = ldmtool("_invert", "photo.png", "hole.png", "--pair-masks", "-o", "out", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [e["key"] for e in item_events(result)] == ["photo.png"]
    pixels = _pixels(tmp_path / "out" / "photo.png")
    assert pixels.sum() == 3 * 255 and (pixels[3, 5] == 255).all()


def test_wrong_size_mask_fails_the_item(tmp_path):
    _save(tmp_path / "in" / "x.png")
    _mask(tmp_path / "in" / "x_mask.png", (0, 0, 1, 1), size=(5, 4))
    result = ldmtool("_invert", "in", "--pair-masks", "-o", "out", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        "ldmtool: failed: in/x.png: in/x_mask.png: the mask is 5x4 but its image is 6x4; they must match")


# ---------------------------------------------------------------- outputs


def test_name_template_fields(tree):
    result = ldmtool("_invert", "in", "-o", "out", "--seed", 42, "--name", "{index:03d}-{stem}-{seed}",
                     "--format", "jpg", "--json", cwd=tree)
    assert result.returncode == 0, result.stderr
    expected = sorted(f"out/{i:03d}-{Path(k).stem}-{derive_seed(42, k)}.jpg" for i, k in enumerate(["a.png", "b.jpg"]))
    assert sorted(e["output"] for e in item_events(result)) == expected
    assert all(Image.open(tree / p).format == "JPEG" for p in expected)


def test_output_file_for_one_item(tree):
    result = ldmtool("_invert", "in/a.png", "-o", "result.webp", cwd=tree)
    assert result.returncode == 0, result.stderr
    assert Image.open(tree / "result.webp").format == "WEBP"
    assert not (tree / MANIFEST_NAME).exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["in", "-o", "one.png"], "-o one.png names one file but there are 2 items"),
        (["in", "--name", "../{stem}"], "would leave the output folder"),
        (["in", "--name", "{stem}-{colour}"], "unknown field {colour}"),
        (["in", "--name", "same"], "would both be written to out/same.png"),
        (["in", "--format", "gif"], "output format 'gif' is not supported"),
    ],
)
def test_output_usage_errors(tree, args, message):
    result = ldmtool("_invert", *args, cwd=tree)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tree / "out").exists() or not any((tree / "out").glob("*.png"))


def test_plan_outputs_default_folder_and_subdirs():
    items = [Item(key="sub/a.png", stem="a", subdir="sub"), Item.generated("prompt-0001/s0", stem="a red fox")]
    paths = plan_outputs(items, [1, 2], OutputSpec())
    assert paths == [Path("out/sub/a.png"), Path("out/a-red-fox.png")]


# ---------------------------------------------------------------- resume, events, manifest, exit codes


def test_resume_writes_only_missing_items(tree):
    first = ldmtool("_invert", "in", "-r", "-o", "out", "--seed", 5, "--json", cwd=tree)
    assert first.returncode == 0
    (tree / "out" / "sub" / "c.png").unlink()
    before = (tree / "out" / "a.png").stat().st_mtime_ns
    second = ldmtool("_invert", "in", "-r", "-o", "out", "--seed", 5, "--json", cwd=tree)
    assert second.returncode == 0
    status = {e["key"]: e["event"] for e in item_events(second)}
    assert status == {"a.png": "skipped", "b.jpg": "skipped", "sub/c.png": "done", "sub/deeper/d.png": "skipped"}
    assert (tree / "out" / "a.png").stat().st_mtime_ns == before
    third = ldmtool("_invert", "in", "-r", "-o", "out", "--overwrite", "--json", cwd=tree)
    assert {e["event"] for e in item_events(third)} == {"done"}


def test_json_events_and_manifest(tree):
    (tree / "in" / "broken.png").write_bytes(b"")
    result = ldmtool("_invert", "in", "-o", "out", "--seed", 9, "--json", "--quiet", cwd=tree)
    assert result.returncode == 1
    all_events = events(result)
    assert all_events[-1] == {"event": "summary", "done": 2, "skipped": 0, "failed": 1,
                              "seconds": all_events[-1]["seconds"], "seed": 9, "exit_code": 1}
    assert all_events[0]["event"] == "plan" and all_events[0]["items"] == 3  # before the items (runtime/plan.py)
    for event in all_events[1:-1]:
        assert set(event) >= {"event", "key", "input", "output", "seed", "seconds"}
        assert event["seed"] == derive_seed(9, event["key"])
    failed = [e for e in all_events if e["event"] == "failed"]
    assert failed[0]["error"] == "in/broken.png: the file is empty (0 bytes)"
    assert result.stderr == "ldmtool: failed: in/broken.png: the file is empty (0 bytes)\n"  # --quiet keeps failures

    records = list(read_manifest(tree / "out" / MANIFEST_NAME))
    assert sorted((r["key"], r["status"]) for r in records) == [("a.png", "done"), ("b.jpg", "done"), ("broken.png", "failed")]
    for record in records:
        assert record["base_seed"] == 9 and record["seed"] == derive_seed(9, record["key"])
        assert record["command"] == "_invert" and record["params"]["mask_mode"] == "none"
    assert next(r for r in records if r["status"] == "failed")["error"].startswith("in/broken.png:")


def test_recipe_in_output_matches_event(tree):
    result = ldmtool_process("_invert", "in/a.png", "-o", "out", "--seed", 3, "--json", cwd=tree)
    event = item_events(result)[0]
    info = ldmtool("info", "--json", "out/a.png", cwd=tree)
    recipe = json.loads(info.stdout)["recipe"]
    assert recipe["seed"] == event["seed"] and recipe["base_seed"] == 3 and recipe["key"] == "a.png"
    assert recipe["argv"][1:] == ["_invert", "in/a.png", "-o", "out", "--seed", "3", "--json"]


def test_seeds_follow_keys_not_positions(tree):
    first = {e["key"]: e["seed"] for e in item_events(ldmtool("_invert", "in", "-o", "o1", "--seed", 1, "--json", cwd=tree))}
    _save(tree / "in" / "0first.png")
    second = {e["key"]: e["seed"] for e in item_events(ldmtool("_invert", "in", "-o", "o2", "--seed", 1, "--json", cwd=tree))}
    assert all(second[key] == seed for key, seed in first.items())


def test_fail_fast_stops_at_first_failure(tmp_path):
    for name in ["a.png", "c.png"]:
        _save(tmp_path / "in" / name)
    (tmp_path / "in" / "b.png").write_text("text")
    result = ldmtool("_invert", "in", "-o", "out", "--fail-fast", "--json", cwd=tmp_path)
    assert result.returncode == 1
    assert [(e["key"], e["event"]) for e in item_events(result)] == [("a.png", "done"), ("b.png", "failed")]
    assert not (tmp_path / "out" / "c.png").exists()


def test_unwritable_output_is_fatal(tree):
    (tree / "blocker").write_text("a file, not a folder")
    result = ldmtool("_invert", "in", "-o", "blocker/out", cwd=tree)
    assert result.returncode == 3
    assert result.stderr.startswith("ldmtool: error: blocker/out: cannot create the output folder")
    assert "(blocker is a file, not a folder)" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_exits_130_without_partial_files(tmp_path, sig):
    # 40 items of 0.25 s: the run must still be going when the signal comes however late this process polls
    # (with 12 of 0.1 s a busy CI machine once let it finish first, exit 0)
    for i in range(40):
        _save(tmp_path / "in" / f"{i:02d}.png", size=(64, 64))
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # the child would inherit it (conftest restores)
    proc = subprocess.Popen([sys.executable, "-m", "ldmtool", "_invert", "in", "-o", "out"], cwd=tmp_path,
                            env=_env(LDMTOOL_TEST_SLEEP="0.25"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(list((tmp_path / "out").glob("*.png"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert stderr.strip().splitlines()[-1].startswith("ldmtool: error: interrupted after")
    assert "Traceback" not in stderr
    assert all(p.suffix == ".png" or p.name in (MANIFEST_NAME, GALLERY_NAME, THUMBS) for p in (tmp_path / "out").iterdir())
    for path in (tmp_path / "out").glob("*.png"):
        assert _pixels(path).shape == (64, 64, 3)


def test_stdout_that_cannot_be_written_stops_the_run_in_one_line(tmp_path):
    """`--json > /dev/full` (a full disk under the event log) ended in an OSError traceback, exit 1; with
    `--dry-run` too."""
    for i in range(3):
        _save(tmp_path / "in" / f"{i}.png")
    for extra in ([], ["--dry-run"]):
        with open("/dev/full", "w") as full:
            result = subprocess.run([sys.executable, "-m", "ldmtool", "_invert", "in", "-o", "out", "--json", "--seed", "1", *extra],
                                    cwd=tmp_path, env=_env(), stdout=full, stderr=subprocess.PIPE, text=True,
                                    timeout=120)
        assert result.returncode == 3, result.stderr
        assert result.stderr.strip().splitlines() == [
            "ldmtool: error: stdout: cannot write the run's output (no space left on device); stopping"]


def test_a_reader_that_closes_the_json_stream_stops_the_run_with_a_message(tmp_path):
    """`ldmtool ... --json | head -1` ended with exit 1 ('some items failed') and nothing on stderr."""
    for i in range(40):
        _save(tmp_path / "in" / f"{i:02d}.png")
    proc = subprocess.Popen([sys.executable, "-m", "ldmtool", "_invert", "in", "-o", "out", "--json"], cwd=tmp_path,
                            env=_env(LDMTOOL_TEST_SLEEP="0.1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["event"] == "plan"
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 3
    assert stderr.strip().splitlines() == [
        "ldmtool: error: stdout: cannot write the run's output (its reader closed it); stopping"]
    assert len(list((tmp_path / "out").glob("*.png"))) < 40
    assert not list((tmp_path / "out").glob(".*tmp"))


# ---------------------------------------------------------------- the Task contract, in process


class _Doubler(BaseTask):
    """Doubles pixel values; fails items whose stem starts with 'bad' in the configured way."""

    command = "double"

    def __init__(self, how="return"):
        super().__init__(params={"factor": 2})
        self.how = how
        self.batches = []

    def load(self, job):
        return np.full((2, 2, 3), 0.25, dtype=np.float32)

    def run(self, jobs):
        self.batches.append([job.item.key for job in jobs])
        if self.how == "raise" and any(job.item.stem.startswith("bad") for job in jobs):
            raise RuntimeError("exploded")
        return [ItemError("too bad") if job.item.stem.startswith("bad") else Output(job.payload * 2, params={"n": job.index})
                for job in jobs]


def _items(*stems):
    return [Item.generated(f"k-{stem}", stem=stem) for stem in stems]


def _run(task, tmp_path, **options):
    out = io.StringIO()
    reporter = Reporter(json_events=True, quiet=True, out=out, err=io.StringIO())
    summary = run_task(task, _items("a", "bad1", "c", "d", "e"), RunOptions(output=tmp_path / "o", seed=1, **options),
                       reporter=reporter)
    return summary, [json.loads(line) for line in out.getvalue().splitlines()]


def test_batches_and_per_item_errors(tmp_path):
    task = _Doubler()
    summary, evts = _run(task, tmp_path, batch_size=2)
    assert task.batches == [["k-a", "k-bad1"], ["k-c", "k-d"], ["k-e"]]
    assert (summary.done, summary.failed, summary.exit_code) == (4, 1, 1)
    assert next(e for e in evts if e["event"] == "failed")["error"] == "k-bad1: too bad"
    np.testing.assert_array_equal(_pixels(tmp_path / "o" / "c.png"), np.full((2, 2, 3), 128))


def test_a_crashing_batch_is_retried_item_by_item(tmp_path):
    task = _Doubler(how="raise")
    summary, evts = _run(task, tmp_path, batch_size=3)
    assert task.batches == [["k-a", "k-bad1", "k-c"], ["k-a"], ["k-bad1"], ["k-c"], ["k-d", "k-e"]]
    assert (summary.done, summary.failed) == (4, 1)
    assert next(e for e in evts if e["event"] == "failed")["error"] == "k-bad1: RuntimeError: exploded"


def test_empty_run_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError):
        run_task(_Doubler(), [], RunOptions(output=tmp_path))


def test_disk_full_mid_run_stops_with_fatal_error(tmp_path, monkeypatch):
    import errno

    from ldmtool.errors import FatalError
    from ldmtool.io import writer

    real_write, calls = writer.os.write, []

    def write_then_fill_up(fd, data):  # the second image fills the disk (claim files are written too)
        if bytes(data[:4]) == b"\x89PNG":
            calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(writer.os, "write", write_then_fill_up)
    out = io.StringIO()
    reporter = Reporter(json_events=True, quiet=True, out=out, err=io.StringIO())
    with pytest.raises(FatalError, match=r"b.png: cannot write the output \(the disk is full\); stopping"):
        run_task(_Doubler(), _items("a", "b", "c"), RunOptions(output=tmp_path / "o", seed=1), reporter=reporter)
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if p.name not in (GALLERY_NAME, THUMBS)) == ["a.png", MANIFEST_NAME]
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [event["event"] for event in events] == ["plan", "done", "failed", "summary"]
    assert events[-1]["exit_code"] == 3 and "the disk is full" in events[-1]["error"]


def test_a_task_that_cannot_start_is_fatal(tmp_path):
    from ldmtool.errors import FatalError

    class Broken(_Doubler):
        def open(self):
            raise RuntimeError("weights are\nmissing")

    with pytest.raises(FatalError, match=r"^double: cannot start \(RuntimeError: weights are missing\)"):
        run_task(Broken(), _items("a"), RunOptions(output=tmp_path / "o"), reporter=Reporter(quiet=True, out=io.StringIO()))


class _FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_and_steps(tmp_path):
    class Stepping(_Doubler):
        def run(self, jobs):
            for step in range(3):
                self.reporter.steps(step + 1, 3)
            return super().run(jobs)

    err = _FakeTerminal()
    summary = run_task(Stepping(), _items("a", "bad", "c"), RunOptions(output=tmp_path / "o", seed=4),
                       reporter=Reporter(out=io.StringIO(), err=err))
    assert summary.exit_code == 1
    text = err.getvalue()
    assert "ldmtool: failed: k-bad: too bad" in text
    assert "2 done, 0 skipped, 1 failed" in text and "(seed 4)" in text


def test_outputs_inside_the_input_tree_are_not_inputs_on_rerun(tmp_path):
    _save(tmp_path / "a.png")
    first = ldmtool("_invert", ".", "-r", "-o", "out", "--json", cwd=tmp_path)
    assert [e["key"] for e in item_events(first)] == ["a.png"]
    second = ldmtool("_invert", ".", "-r", "-o", "out", "--json", cwd=tmp_path)
    assert second.returncode == 0
    assert [(e["key"], e["event"]) for e in item_events(second)] == [("a.png", "skipped")]
    assert "ignored 1 input(s) inside the output folder out" in second.stderr


def test_an_output_folder_reached_through_a_symlink_never_replaces_the_inputs(tmp_path):
    _save(tmp_path / "in" / "a.png", (10, 20, 30))
    (tmp_path / "link").symlink_to(tmp_path / "in")
    before = (tmp_path / "in" / "a.png").read_bytes()
    for extra in ((), ("--overwrite",)):
        result = ldmtool("_invert", "in", "-o", "link", *extra, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "its output would replace the input itself" in result.stderr
    assert (tmp_path / "in" / "a.png").read_bytes() == before


@pytest.mark.parametrize("naming", [("--suffix", "x"), ("--format", "jpg")])
def test_a_rerun_into_the_input_folder_skips_its_own_outputs_instead_of_taking_them_as_inputs(tmp_path, naming):
    _save(tmp_path / "in" / "a.png")
    first = ldmtool("_invert", "in", "-o", "in", *naming, "--json", cwd=tmp_path)
    assert [e["event"] for e in item_events(first)] == ["done"], first.stderr
    before = sorted(p.name for p in (tmp_path / "in").iterdir())
    second = ldmtool("_invert", "in", "-o", "in", *naming, "--json", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert [(e["key"], e["event"]) for e in item_events(second)] == [("a.png", "skipped")]
    assert "ignored 1 input(s) that are this run's outputs of other inputs in in" in second.stderr
    assert "non-image" not in second.stderr  # its own gallery and manifest are not reported as skipped files
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == before


def test_an_output_never_replaces_another_input_that_ldmtool_did_not_write(tmp_path):
    _save(tmp_path / "in" / "a.png")
    _save(tmp_path / "in" / "a_x.png", (1, 2, 3))  # the user's own file, where a.png's output would go
    before = (tmp_path / "in" / "a_x.png").read_bytes()
    for extra in ((), ("--overwrite",)):
        result = ldmtool("_invert", "in", "-o", "in", "--suffix", "x", *extra, cwd=tmp_path)
        assert result.returncode == 2
        assert "its output in/a_x.png would replace the input in/a_x.png" in result.stderr
    assert (tmp_path / "in" / "a_x.png").read_bytes() == before


def test_symlink_loops_are_walked_once(tmp_path):
    _save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "loop").symlink_to(tmp_path / "in")
    assert [item.key for item in discover([str(tmp_path / "in")], recursive=True).items] == ["a.png"]


def test_generated_items_keys_and_names(tmp_path):
    from ldmtool.io.discover import generated_items

    items = generated_items(["a red fox", "", "a red fox"], samples=2, kind="prompt")
    assert [i.key for i in items] == ["prompt-0000/0", "prompt-0000/1", "prompt-0001/0", "prompt-0001/1",
                                      "prompt-0002/0", "prompt-0002/1"]
    assert [i.stem for i in items][:3] == ["0000-0-a-red-fox", "0000-1-a-red-fox", "0001-0"]
    assert items[5].data == {"label": "a red fox", "index": 2, "sample": 1}
    paths = plan_outputs(items, range(6), OutputSpec(target=tmp_path))
    assert len(set(paths)) == 6
