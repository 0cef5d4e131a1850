"""`--engine ray`: a local Ray cluster gives the same bytes and an equivalent manifest as the local engine,
and a worker killed mid-run still ends with every item done or reported."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray is not installed here (pip install 'ldmtool[ray]'); CI installs it")


def _folder(path, n):
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    for i in range(n):
        Image.fromarray((rng.random((6, 5, 3)) * 255).astype(np.uint8)).save(path / f"p{i:02d}.png")
    return path


def _ldmtool(*args, env=None, **kwargs):
    environment = {**os.environ, "LDMTOOL_TEST_COMMANDS": "1", "LDMTOOL_RAY_WORKERS": "2", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "ldmtool", *map(str, args)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _records(folder):
    lines = (folder / "ldmtool-manifest.jsonl").read_text().splitlines()
    return sorted((r["key"], r["status"], r["seed"], os.path.basename(r["output"]), r["params"]["mask_mode"])
                  for r in map(json.loads, lines))


def test_ray_engine_matches_local_engine_byte_for_byte(tmp_path):
    inputs = _folder(tmp_path / "in", 8)
    runs = {}
    for name, extra in (("local", []), ("ray", ["--engine", "ray"])):
        (tmp_path / name).mkdir()  # same relative -o in each, so the recorded command lines are equal
        proc = _ldmtool("_invert", inputs, "-o", "out", "--seed", 3, "--json", *extra, cwd=tmp_path / name)
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr
        runs[name] = tmp_path / name / "out"
        events = [json.loads(line) for line in stdout.splitlines()]
        assert sum(e["event"] == "done" for e in events) == 8
    names = sorted(p.name for p in runs["local"].glob("*.png"))
    assert names == sorted(p.name for p in runs["ray"].glob("*.png")) and len(names) == 8
    for name in names:
        assert (runs["local"] / name).read_bytes() == (runs["ray"] / name).read_bytes()
    assert _records(runs["local"]) == _records(runs["ray"])


def _ray_workers() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("ray::") and "MapWorker" in cmdline:
            pids.append(int(entry))
    return pids


def test_killed_worker_still_ends_with_every_item_done_or_reported(tmp_path):
    inputs = _folder(tmp_path / "in", 12)
    out = tmp_path / "out"
    proc = _ldmtool("_invert", inputs, "-o", out, "--seed", 4, "--engine", "ray", "--json",
                    env={"LDMTOOL_TEST_SLEEP": "0.5"})
    deadline = time.monotonic() + 120
    killed = None
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        workers = _ray_workers()
        if workers and list(out.glob("p*.png")):  # a worker is busy mid-run
            killed = workers[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=300)
    assert killed is not None, "no Ray worker was seen running"
    events = [json.loads(line) for line in stdout.splitlines()]
    finished = {e["key"] for e in events if e["event"] in ("done", "failed")}
    # A worker killed after writing an output but before its batch came back: the retried batch finds that
    # output written, by this job, and reports it skipped for that reason.
    written = {e["key"] for e in events if e["event"] == "skipped"
               and e.get("reason") == "another run wrote it while this run was going"}
    assert finished | written == {f"p{i:02d}.png" for i in range(12)}, stdout + stderr
    assert all((out / key).is_file() for key in written)
    assert proc.returncode in (0, 1)
    for image in out.glob("*.png"):
        with Image.open(image) as handle:
            handle.load()
