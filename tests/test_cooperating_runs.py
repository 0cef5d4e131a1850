"""Two runs on one output folder split the work through claim files (issue 26; runtime/claims.py).

The runs are real `ldmtool _invert` processes. `LDMTOOL_TEST_RENDEZVOUS` makes each item wait until the
other process has started one too, so the runs are known to overlap whatever this machine's speed.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmtool.io.manifest import MANIFEST_NAME, read_manifest
from ldmtool.io.metadata import read_metadata
from ldmtool.runtime.claims import CLAIM_PREFIX, Claims, claim_path

ITEMS = 6


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    (tmp_path / "in").mkdir()
    for i in range(ITEMS):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{i}.png")
    return tmp_path


def _start(cwd: Path, **env: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "ldmtool", "_invert", "in", "-o", "out", "--json"]
    environment = dict(os.environ, LDMTOOL_TEST_COMMANDS="1", **env)
    return subprocess.Popen(args, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _events(proc: subprocess.Popen[str]) -> list[dict]:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def _check_folder(out: Path) -> list[dict]:
    """Every input has one output and one done record describing exactly that file; no claims are left."""
    done = [r for r in read_manifest(out / MANIFEST_NAME) if r["status"] == "done"]
    assert sorted(r["key"] for r in done) == [f"{i}.png" for i in range(ITEMS)], "one done record per item"
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i}.png" for i in range(ITEMS)]
    for record in done:
        recipe = read_metadata(out / Path(record["output"]).name).recipe
        assert recipe["seed"] == record["seed"] and recipe["base_seed"] == record["base_seed"]
    assert len({r["base_seed"] for r in done}) == 1, "both runs are one job: one seed"
    assert not list(out.glob(f"{CLAIM_PREFIX}*")), "claims must be released"
    assert not list(out.glob(".*.ldmtool-tmp"))
    return done


def test_two_overlapping_runs_split_the_items(inputs: Path) -> None:
    rendezvous = str(inputs / "rendezvous")
    first = _start(inputs, LDMTOOL_TEST_RENDEZVOUS=rendezvous, LDMTOOL_TEST_SLEEP="0.2")
    second = _start(inputs, LDMTOOL_TEST_RENDEZVOUS=rendezvous, LDMTOOL_TEST_SLEEP="0.2")
    runs = [_events(first), _events(second)]
    _check_folder(inputs / "out")
    done = [[e["key"] for e in events if e["event"] == "done"] for events in runs]
    assert all(done), "each run must have done part of the work (they overlapped)"
    assert sorted(done[0] + done[1]) == [f"{i}.png" for i in range(ITEMS)], "no item written twice"
    for events, mine in zip(runs, done):
        skipped = {e["key"] for e in events if e["event"] == "skipped"}
        assert skipped == {f"{i}.png" for i in range(ITEMS)} - set(mine)
        summary = events[-1]
        assert summary["event"] == "summary" and summary["failed"] == 0


def test_a_killed_runs_claims_are_taken_over(inputs: Path) -> None:
    out = inputs / "out"
    victim = _start(inputs, LDMTOOL_TEST_SLEEP="30")
    deadline = time.monotonic() + 60
    while len(list(out.glob(f"{CLAIM_PREFIX}*"))) < 2 and time.monotonic() < deadline:  # its seed and 0.png
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    claims = list(out.glob(f"{CLAIM_PREFIX}*"))
    assert len(claims) == 2, "the killed run held its seed claim and its first item's"
    events = _events(_start(inputs))
    assert [e["event"] for e in events if e.get("key") == "0.png"] == ["done"]
    _check_folder(out)


def _foreign_claim(out: Path, name: str, age: float) -> Path:
    out.mkdir(exist_ok=True)
    path = claim_path(out, name)
    path.write_text(json.dumps({"host": "another-host", "pid": 1, "run": "elsewhere", "claims": name}))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_a_live_claim_from_another_host_is_left_alone(inputs: Path) -> None:
    claim = _foreign_claim(inputs / "out", "2.png", age=0)
    events = _events(_start(inputs, LDMTOOL_CLAIM_TIMEOUT="600"))
    skipped = [e for e in events if e["event"] == "skipped"]
    assert [e["key"] for e in skipped] == ["2.png"]
    assert "another run is writing it (another-host, pid 1)" in skipped[0]["reason"]
    assert not (inputs / "out" / "2.png").exists() and claim.exists()
    assert events[-1]["done"] == ITEMS - 1


def test_a_claim_without_heartbeat_is_taken_over_whatever_its_host(inputs: Path) -> None:
    _foreign_claim(inputs / "out", "2.png", age=700)
    events = _events(_start(inputs, LDMTOOL_CLAIM_TIMEOUT="600"))
    assert events[-1]["done"] == ITEMS
    _check_folder(inputs / "out")


def test_the_heartbeat_keeps_a_claim_fresh(tmp_path: Path) -> None:
    claims = Claims(timeout=0.6)
    assert claims.acquire(tmp_path, "a.png") is None
    path = claim_path(tmp_path, "a.png")
    os.utime(path, (0, 0))
    deadline = time.monotonic() + 30
    while path.stat().st_mtime == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert path.stat().st_mtime > 0, "the heartbeat never refreshed the claim"
    claims.close()
    assert not path.exists()


def test_only_one_of_two_runs_takes_over_a_stale_claim(tmp_path: Path) -> None:
    stale = {"host": socket.gethostname(), "pid": 2**22 + 12345, "run": "dead"}  # no such process
    claim_path(tmp_path, "a.png").write_text(json.dumps(stale))
    first, second = Claims(timeout=600), Claims(timeout=600)
    assert first.acquire(tmp_path, "a.png") is None
    holder = second.acquire(tmp_path, "a.png")
    assert holder is not None and holder["run"] == first.token
    assert first.still_mine(tmp_path, "a.png") and not second.still_mine(tmp_path, "a.png")
    first.close()
    second.close()


def test_two_runs_without_seed_started_together_agree_on_one(tmp_path: Path) -> None:
    from ldmtool.io.outputs import OutputSpec
    from ldmtool.runtime.resume import Recipes

    recipes = Recipes("_invert", None, {}, {})
    spec = OutputSpec(tmp_path / "out")
    (tmp_path / "out").mkdir()
    first, second = Claims(timeout=600), Claims(timeout=600)
    seed = recipes.adopted_seed(spec, first)
    assert recipes.adopted_seed(spec, second) == seed
    first.close()
    assert list((tmp_path / "out").iterdir()) == [], "the seed claim goes with the run"
    second.close()


def test_a_claim_is_never_seen_without_its_record_and_leaves_no_private_file(tmp_path: Path, monkeypatch) -> None:
    """The record is written to a private file and linked into place: a run killed at any moment leaves either
    no claim or a whole one (an exclusive create then a write left an empty claim that looked held). Without
    hard links the claim is created in place."""
    from ldmtool.runtime import claims as claims_module

    seen = []
    real_link = os.link
    monkeypatch.setattr(claims_module.os, "link", lambda src, dst: seen.append(Path(src).read_text()) or real_link(src, dst))
    claims = Claims(timeout=600)
    assert claims.acquire(tmp_path, "a.png") is None
    record = json.loads(claim_path(tmp_path, "a.png").read_text())
    assert json.loads(seen[0]) == record and record["run"] == claims.token and record["pid"] == os.getpid()
    assert [p.name for p in tmp_path.iterdir()] == [claim_path(tmp_path, "a.png").name]

    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(claims_module.os, "link", no_links)
    assert claims.acquire(tmp_path, "b.png") is None
    assert json.loads(claim_path(tmp_path, "b.png").read_text())["claims"] == "b.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(claim_path(tmp_path, n).name for n in ("a.png", "b.png"))
    claims.close()


def test_a_claim_left_without_its_record_is_taken_over_after_a_grace(tmp_path: Path) -> None:
    from ldmtool.runtime.claims import _PARTIAL_GRACE

    path = claim_path(tmp_path, "a.png")
    path.write_bytes(b"")  # a run killed between creating the claim and writing it (older versions)
    claims = Claims(timeout=600)
    assert claims.acquire(tmp_path, "a.png") == {}  # a live run is still writing it: left alone
    os.utime(path, (time.time() - _PARTIAL_GRACE - 1,) * 2)
    assert claims.acquire(tmp_path, "a.png") is None
    claims.close()


@pytest.mark.parametrize("elsewhere", [{"pid_ns": 4026531836 + 7}, {"boot_id": "another-boot"}])
def test_a_claim_from_another_pid_namespace_under_this_host_name_waits_for_its_heartbeat(
        tmp_path: Path, elsewhere: dict) -> None:
    """Containers with host networking share the host name, not the PID namespace: their process ids mean
    nothing here, so their claims go stale by the heartbeat only (review B, bug 11: live runs were taken over)."""
    try:
        here = {"boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                "pid_ns": os.stat("/proc/self/ns/pid").st_ino}
    except OSError:
        pytest.skip("no /proc here: no namespace to tell apart")
    record = {"host": socket.gethostname(), "pid": 2**22 + 12345, "started": 1, **here, **elsewhere,
              "run": "container", "claims": "a.png"}  # no such pid here: gone, were it ours
    path = claim_path(tmp_path, "a.png")
    path.write_text(json.dumps(record))
    claims = Claims(timeout=600)
    holder = claims.acquire(tmp_path, "a.png")
    assert holder is not None and holder["run"] == "container", "a live claim was taken over"
    private = tmp_path / f"{path.name}.container.new"
    private.write_text(json.dumps(record))
    claims.remove_stale({tmp_path: [private.name]})
    assert private.exists(), "a record being made in another container is not removed before the grace"
    os.utime(path, (time.time() - 700,) * 2)
    assert claims.acquire(tmp_path, "a.png") is None  # no heartbeat: taken over
    assert {key: json.loads(path.read_text())[key] for key in here} == here  # ours records where it runs
    claims.close()


def test_a_dead_runs_process_id_given_to_another_process_does_not_keep_its_claim(tmp_path: Path) -> None:
    """Process ids are reused (32768 of them on many systems): the claim records its process's start time too."""
    from ldmtool.runtime.claims import process_start

    started = process_start(os.getpid())
    if started is None:
        pytest.skip("no /proc here: the process id alone decides")
    reused = {"host": socket.gethostname(), "pid": os.getpid(), "started": started - 1, "run": "dead", "claims": "a.png"}
    claim_path(tmp_path, "a.png").write_text(json.dumps(reused))
    alive = {**reused, "started": started, "run": "alive", "claims": "b.png"}
    claim_path(tmp_path, "b.png").write_text(json.dumps(alive))
    claims = Claims(timeout=600)
    assert claims.acquire(tmp_path, "a.png") is None
    assert claims.acquire(tmp_path, "b.png")["run"] == "alive"
    claims.close()


def test_private_files_of_killed_runs_are_removed_with_the_stale_claims(tmp_path: Path) -> None:
    from ldmtool.runtime.claims import _PARTIAL_GRACE

    old = [tmp_path / f"{claim_path(tmp_path, 'a.png').name}.run1.new", tmp_path / f"{claim_path(tmp_path, 'b.png').name}.run2.stale"]
    young = tmp_path / f"{claim_path(tmp_path, 'c.png').name}.run3.new"
    for path in [*old, young]:
        path.write_text("{}")
    for path in old:
        os.utime(path, (time.time() - _PARTIAL_GRACE - 1,) * 2)
    Claims(timeout=600).remove_stale({tmp_path: [p.name for p in tmp_path.iterdir()]})
    assert [p.name for p in tmp_path.iterdir()] == [young.name]


def test_a_private_claim_record_of_a_process_that_is_gone_is_removed_at_once(tmp_path: Path) -> None:
    """A run killed between writing its claim record and linking it leaves the record; the next run removes
    it without waiting out the grace period when the process it names is gone (seen in test_crash)."""
    from ldmtool.runtime.claims import process_start

    started = process_start(os.getpid())
    if started is None:
        pytest.skip("no /proc here: the process id alone decides")
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    records = {  # a process gone (this pid, another start time), one alive (this process), one on another host
        "gone": {**me, "started": started - 1, "run": "run1"},
        "alive": {**me, "started": started, "run": "run2"},
        "elsewhere": {**me, "host": me["host"] + "-other", "started": started - 1, "run": "run3"},
    }
    paths = {}
    for what, record in records.items():
        paths[what] = tmp_path / f"{claim_path(tmp_path, what).name}.{record['run']}.new"
        paths[what].write_text(json.dumps({**record, "claims": what}))
    Claims(timeout=600).remove_stale({tmp_path: [p.name for p in tmp_path.iterdir()]})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([paths["alive"].name, paths["elsewhere"].name])


def test_a_claim_of_a_process_that_exited_but_was_not_yet_reaped_is_taken_over(tmp_path: Path) -> None:
    """A killed Ray worker stays a zombie until its parent (the raylet) reaps it, while the task it ran is
    already retried on another worker: that worker must take the claim over, not skip the item as another
    run's (CI on a Xeon, 2026-12-07: one of twelve items ended 'skipped (by another run)')."""
    from ldmtool.io.files import process_alive
    from ldmtool.runtime.claims import process_start

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while _state(child.pid) != "Z" and time.monotonic() < deadline:  # exited; Popen has not waited on it
        time.sleep(0.01)
    try:
        if _state(child.pid) != "Z":
            pytest.skip("no /proc here to see a zombie")
        assert not process_alive(child.pid)
        record = {"host": socket.gethostname(), "pid": child.pid, "started": process_start(child.pid),
                  "run": "killed", "claims": "a.png"}
        claim_path(tmp_path, "a.png").write_text(json.dumps(record))
        claims = Claims(timeout=600)
        assert claims.acquire(tmp_path, "a.png") is None
        claims.close()
    finally:
        child.wait()


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return ""
    return stat[stat.rindex(b")") + 2:].split()[0].decode()
