"""What a run does to its output folder before the first item: stale temporary files are removed for the
run's own planned outputs only, and nothing on the way lists or stats the output folder's tree, so
`-o FILE` in a folder of 100 000 files starts as it does in an empty one."""
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

from clirun import ensure_test_commands, run_cli
from ldmtool.io import writer
from ldmtool.io.writer import TEMP_SUFFIX, remove_stale_temps

DEAD = 999_999_999  # above any kernel's pid_max: no such process


def _temp(folder: Path, name: str, pid: int = DEAD) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{name}.{pid}{TEMP_SUFFIX}"
    path.write_bytes(b"partial")
    return path


@pytest.fixture
def invert(monkeypatch):
    """The test-only `_invert` command (the real batch runner, no model)."""
    monkeypatch.setenv("LDMTOOL_TEST_COMMANDS", "1")
    ensure_test_commands()
    return lambda *args: run_cli("_invert", *args, "--seed", "1", "--quiet")


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "in" / "x.png"
    path.parent.mkdir()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path)
    return path


# ---------------------------------------------------------------- stale temporary files

def test_only_stale_temps_of_planned_outputs_in_their_own_folder_are_removed(tmp_path):
    out = tmp_path / "out"
    planned = _temp(out, "a.png")
    other_name = _temp(out, "b.png")
    live_owner = _temp(out, "a.png", os.getppid())
    in_subfolder = _temp(out / "sub", "a.png")
    in_parent = _temp(tmp_path, "a.png")
    assert remove_stale_temps([out / "a.png"]) == 1
    assert not planned.exists()
    assert other_name.exists() and live_owner.exists() and in_subfolder.exists() and in_parent.exists()


def test_each_output_folder_is_listed_once_and_never_descended(tmp_path, monkeypatch):
    listed = []
    real_scandir = os.scandir
    monkeypatch.setattr(writer.os, "scandir", lambda path: listed.append(Path(path)) or real_scandir(path))
    for name in ("a.png", "b.png"):
        _temp(tmp_path / "out", name)
    _temp(tmp_path / "out" / "sub", "c.png")
    outputs = [tmp_path / "out" / "a.png", tmp_path / "out" / "b.png", tmp_path / "out" / "sub" / "c.png"]
    assert remove_stale_temps(outputs) == 3
    assert sorted(listed) == [tmp_path / "out", tmp_path / "out" / "sub"]


def test_a_folder_that_is_missing_or_cannot_be_listed_is_skipped(tmp_path, monkeypatch):
    assert remove_stale_temps([tmp_path / "gone" / "a.png"]) == 0
    for error in (FileNotFoundError, PermissionError, NotADirectoryError):
        def refuse(path, error=error):
            raise error(2, "refused", str(path))

        monkeypatch.setattr(writer.os, "scandir", refuse)
        assert remove_stale_temps([tmp_path / "a.png"]) == 0


def test_a_folder_vanishing_during_the_listing_is_skipped(tmp_path, monkeypatch):
    class Vanishing:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __iter__(self):
            raise FileNotFoundError(2, "No such file or directory", str(tmp_path))

    monkeypatch.setattr(writer.os, "scandir", lambda path: Vanishing())
    assert remove_stale_temps([tmp_path / "a.png"]) == 0


def test_a_run_cleans_its_own_stale_temp_and_leaves_the_rest(invert, photo, tmp_path):
    out = tmp_path / "out"
    own = _temp(out, "x.png")
    kept = [_temp(out, "y.png"), _temp(out / "sub", "x.png"), _temp(tmp_path, "x.png")]
    result = invert(photo, "-o", out / "x.png")
    assert result.exit_code == 0, result.output
    assert not own.exists() and all(path.exists() for path in kept)
    assert (out / "x.png").is_file()


def test_an_unlistable_output_folder_gives_no_traceback(invert, photo, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_scandir = os.scandir

    def vanished(path="."):
        if Path(path) == out:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_scandir(path)

    monkeypatch.setattr(writer.os, "scandir", vanished)
    result = invert(photo, "-o", out / "x.png")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert (out / "x.png").is_file()


# ---------------------------------------------------------------- a crowded output folder

FILES, SUBFOLDERS = 100_000, 100


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """A folder holding 100 000 empty files in 100 subfolders, and an empty one. Built on tmpfs where there
    is one: creating 100 000 files takes about 3 s there, but up to a minute on a busy shared disk."""
    shm = Path("/dev/shm")
    on_tmpfs = shm.is_dir() and os.access(shm, os.W_OK)
    root = Path(tempfile.mkdtemp(dir=shm)) if on_tmpfs else tmp_path_factory.mktemp("crowded")
    try:
        for s in range(SUBFOLDERS):
            sub = root / "big" / f"s{s:03d}"
            sub.mkdir(parents=True)
            for f in range(FILES // SUBFOLDERS):
                os.close(os.open(sub / f"{f:04d}.png", os.O_CREAT | os.O_WRONLY, 0o644))
        (root / "empty").mkdir()
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


class FileSystemCalls:
    """Counts directory listings and stats of paths at or under `folder` (every walk, glob, iterdir,
    exists and resolve in the standard library goes through these)."""

    def __init__(self, monkeypatch, folder: Path):
        self.folder, self.listed, self.stats = folder, [], 0
        for name, record in (("scandir", self._list), ("listdir", self._list), ("stat", self._stat),
                             ("lstat", self._stat)):
            monkeypatch.setattr(os, name, record(getattr(os, name)))

    def _inside(self, path) -> bool:
        try:
            path = Path(os.fsdecode(path)).absolute()
        except TypeError:  # a file descriptor
            return False
        return path == self.folder or self.folder in path.parents

    def _list(self, real):
        def listing(path=".", *args, **kwargs):
            if self._inside(path):
                self.listed.append(Path(os.fsdecode(path)).absolute())
            return real(path, *args, **kwargs)
        return listing

    def _stat(self, real):
        def stat(path, *args, **kwargs):
            self.stats += self._inside(path)
            return real(path, *args, **kwargs)
        return stat


@pytest.mark.parametrize("file_output", [True, False], ids=["-o FILE", "-o FOLDER"])
def test_start_does_not_depend_on_what_the_output_folder_holds(invert, photo, crowded, monkeypatch, file_output):
    seen = {}
    for name in ("empty", "big"):
        folder = crowded / name
        target = folder / "x.png" if file_output else folder
        with monkeypatch.context() as patch:
            calls = FileSystemCalls(patch, folder)
            started = time.perf_counter()
            result = invert(photo, "-o", target, "--overwrite")
            seconds = time.perf_counter() - started
        assert result.exit_code == 0, result.output
        seen[name] = (calls.listed, calls.stats, seconds)
    big, empty = seen["big"], seen["empty"]
    assert big[0] == [crowded / "big"], "only the output folder itself may be listed, once, not its tree"
    assert empty[0] == [crowded / "empty"]
    assert big[1] == empty[1], "stats inside the output folder must not grow with what it holds"
    print(f"start into an empty folder {empty[2]:.3f} s, into 100 000 files {big[2]:.3f} s")
