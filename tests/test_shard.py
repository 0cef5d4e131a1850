"""`--shard K/N`: stable, disjoint, covering partitions; sharded runs + merge equal one unsharded run."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from clirun import ensure_test_commands
from ldmtool.cli.app import main
from ldmtool.errors import UsageError
from ldmtool.runtime.shard import Shard, parse_shard, shard_of, strip_scheduling


def test_partitions_are_disjoint_covering_and_stable_when_items_are_added():
    keys = [f"photos/img{i:03d}.png" for i in range(300)]
    for count in (1, 2, 3, 7):
        owners = {key: [k for k in range(1, count + 1) if Shard(k, count).owns(key)] for key in keys}
        assert all(len(v) == 1 for v in owners.values())  # each key in exactly one shard
        more = keys + [f"photos/new{i}.png" for i in range(100)]
        assert all(shard_of(key, count) == owners[key][0] for key in keys)  # adding items moves nothing
        assert {shard_of(k, count) for k in more} == set(range(1, count + 1))


def test_parse_shard_errors_are_one_line():
    assert parse_shard("2/3") == Shard(2, 3)
    for bad in ("0/3", "4/3", "3", "a/b", "1/0"):
        with pytest.raises(UsageError):
            parse_shard(bad)


def test_strip_scheduling_options():
    argv = ["ldmtool", "superres", "x", "--shard", "1/3", "--seed", "4", "--engine=ray"]
    assert strip_scheduling(argv) == ["ldmtool", "superres", "x", "--seed", "4"]


@pytest.fixture
def cli(monkeypatch, capsys):
    monkeypatch.setenv("LDMTOOL_TEST_COMMANDS", "1")
    ensure_test_commands()

    def run(*args):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exit:
            code = exit.code or 0
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _folder(path, n=12):
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = path / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((6, 5, 3)) * 255).astype(np.uint8)).save(sub / f"p{i}.png")
    return path


def _records(path):
    return sorted((r["key"], r["status"], r["seed"], os.path.relpath(r["output"], path))
                  for r in map(json.loads, (path / "ldmtool-manifest.jsonl").read_text().splitlines()))


def test_sharded_run_and_merge_equal_one_unsharded_run_byte_for_byte(tmp_path, cli, monkeypatch):
    monkeypatch.setattr("sys.argv", ["ldmtool"])
    inputs = _folder(tmp_path / "in")
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert cli("_invert", inputs, "-r", "-o", whole, "--seed", 9, "--quiet")[0] == 0
    for k in (1, 2, 3):
        monkeypatch.setattr("sys.argv", ["ldmtool", "--shard", f"{k}/3"])  # recorded argv differs per shard
        assert cli("_invert", inputs, "-r", "-o", sharded, "--seed", 9, "--shard", f"{k}/3", "--quiet")[0] == 0
    code, out, _ = cli("manifest", "merge", sharded, "--json")
    assert code == 0, out
    assert json.loads(out) == {"parts": 3, "shards": 3, "missing_shards": [], "missing_shard_count": 0, "done": 12,
                               "failed": [], "missing": [], "skipped": 0, "complete": True}
    images = sorted(p.relative_to(whole) for p in whole.rglob("*.png"))
    assert images == sorted(p.relative_to(sharded) for p in sharded.rglob("*.png"))
    for rel in images:
        assert (whole / rel).read_bytes() == (sharded / rel).read_bytes()
    assert _records(whole) == _records(sharded)


def test_merge_reports_missing_shard_and_resume_inside_a_shard(tmp_path, cli):
    inputs = _folder(tmp_path / "in", n=9)
    out = tmp_path / "out"
    assert cli("_invert", inputs, "-r", "-o", out, "--seed", 1, "--shard", "1/2", "--quiet")[0] == 0
    code, text, err = cli("manifest", "merge", out)
    assert code == 1 and "shard 2/2: never started" in err
    code, text, _ = cli("_invert", inputs, "-r", "-o", out, "--seed", 1, "--shard", "1/2", "--json")
    events = [json.loads(line) for line in text.splitlines()]
    assert {e["event"] for e in events if e["event"] not in ("summary", "plan")} == {"skipped"}


def test_shard_without_seed_is_a_usage_error(tmp_path, cli):
    inputs = _folder(tmp_path / "in", n=2)
    code, _, err = cli("_invert", inputs, "-r", "-o", tmp_path / "out", "--shard", "1/2")
    assert code == 2 and "--shard 1/2 needs --seed" in err


def _keys(path):
    return sorted(json.loads(line)["key"] for line in (path / "ldmtool-manifest.jsonl").read_text().splitlines())


def _gallery_names(path):
    text = (path / "index.html").read_text()
    return sorted(part.split("<", 1)[0] for part in text.split('class="name">')[1:])


def test_merge_keeps_what_the_main_manifest_held_and_the_gallery_shows_both(tmp_path, cli):
    before, after = _folder(tmp_path / "before", n=2), _folder(tmp_path / "after", n=4)
    out = tmp_path / "out"
    assert cli("_invert", before, "-r", "-o", out, "--seed", 1, "--quiet")[0] == 0  # unsharded: the main manifest
    for k in (1, 2):
        assert cli("_invert", after, "-r", "-o", out, "--name", "{stem}-s.{ext}", "--seed", 1, "--shard", f"{k}/2",
                   "--quiet")[0] == 0
    code, text, _ = cli("manifest", "merge", out, "--json")
    assert code == 0 and json.loads(text)["done"] == 6
    assert _keys(out) == ["a/p1.png", "a/p1.png", "a/p3.png", "b/p0.png", "b/p0.png", "b/p2.png"]
    assert cli("gallery", out)[0] == 0
    assert _gallery_names(out) == ["a/p1-s.png", "a/p1.png", "a/p3-s.png", "b/p0-s.png", "b/p0.png", "b/p2-s.png"]


def test_an_unsharded_run_after_sharded_ones_adopts_their_seed_and_its_gallery_keeps_their_items(tmp_path, cli):
    inputs = _folder(tmp_path / "in", n=4)
    out = tmp_path / "out"
    for k in (1, 2):
        assert cli("_invert", inputs, "-r", "-o", out, "--seed", 7, "--shard", f"{k}/2", "--quiet")[0] == 0
    code, text, _ = cli("_invert", inputs, "-r", "-o", out, "--json")  # no --seed: the shards' is this job's
    assert code == 0, text
    events = [json.loads(line) for line in text.splitlines()]
    assert {e["event"] for e in events if "key" in e} == {"skipped"}
    assert [e["seed"] for e in events if e["event"] == "summary"] == [7]
    extra = _folder(tmp_path / "more", n=1)
    (extra / "b" / "p0.png").rename(extra / "b" / "new.png")
    assert cli("_invert", extra, "-r", "-o", out, "--quiet")[0] == 0
    assert _gallery_names(out) == ["a/p1.png", "a/p3.png", "b/new.png", "b/p0.png", "b/p2.png"]


def test_merge_keeps_every_cell_of_a_sharded_sweep(tmp_path, cli):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(np.full((8, 8, 3), ord(name), np.uint8)).save(inputs / f"{name}.png")
    out = tmp_path / "out"
    for k in (1, 2):
        assert cli("superres", inputs, "-o", out, "--scale", 2, "--seed", 1, "--sweep", "steps=1,2", "--shard", f"{k}/2",
                   "--quiet")[0] == 0
    code, text, _ = cli("manifest", "merge", out, "--json")
    assert code == 0 and json.loads(text)["done"] == 6
    outputs = [os.path.basename(json.loads(line)["output"])
               for line in (out / "ldmtool-manifest.jsonl").read_text().splitlines()]
    assert outputs == [f"{name}-steps{steps}.png" for name in "abc" for steps in (1, 2)]


def test_membership_and_merge_write_through_temporary_files_of_their_own(tmp_path, cli):
    """Two runs of one shard, or two merges, at once: neither takes the other's temporary file (review B,
    bug 12: one fixed name shared by every process crashed the slower run with a traceback)."""
    inputs = _folder(tmp_path / "in", n=4)
    out = tmp_path / "out"
    (out / ".ldmtool-shard-1-of-2.json.tmp").mkdir(parents=True)  # the name every run used to write to
    others = out / ".ldmtool-manifest.jsonl.tmp"
    others.write_text("another merge's records\n")
    code, _, err = cli("_invert", inputs, "-r", "-o", out, "--seed", 1, "--shard", "1/2", "--quiet")
    assert code == 0, err
    assert json.loads((out / "ldmtool-shard-1-of-2.json").read_text())["shard"] == "1/2"
    cli("manifest", "merge", out)
    assert others.read_text() == "another merge's records\n" and (out / "ldmtool-manifest.jsonl").is_file()
    assert not list(out.glob("*.ldmtool-tmp"))


def test_a_membership_file_that_cannot_be_written_is_one_fatal_line(tmp_path, cli):
    inputs = _folder(tmp_path / "in", n=4)
    (tmp_path / "out" / "ldmtool-shard-1-of-2.json").mkdir(parents=True)
    code, _, err = cli("_invert", inputs, "-r", "-o", tmp_path / "out", "--seed", 1, "--shard", "1/2", "--quiet")
    assert code == 3 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "ldmtool-shard-1-of-2.json: cannot write" in err and "a folder with that name is in the way" in err
    assert not list((tmp_path / "out").glob(".*ldmtool-tmp"))


def test_a_merged_manifest_that_cannot_be_written_is_one_fatal_line(tmp_path, cli):
    inputs = _folder(tmp_path / "in", n=4)
    out = tmp_path / "out"
    for k in (1, 2):
        assert cli("_invert", inputs, "-r", "-o", out, "--seed", 1, "--shard", f"{k}/2", "--quiet")[0] == 0
    (out / "ldmtool-manifest.jsonl").mkdir()  # a folder where the merged manifest goes
    (out / "ldmtool-manifest.jsonl" / "x").write_text("keeps it from being replaced")
    code, _, err = cli("manifest", "merge", out)
    assert code == 3 and "Traceback" not in err and "cannot write the merged manifest" in err
    assert not list(out.glob(".*tmp"))
