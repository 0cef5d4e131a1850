"""Speed cost of the reproducibility contract (issue 15): the shipped defaults end to end, as JSON lines.

Each case runs the real CLI in a child process and reports the items' own wall seconds from the `--json`
events (model load and start-up excluded) and the child's whole CPU time (user + sys, start-up included),
median over --rounds. With `--baseline TREE` (a checkout of the code before the change, e.g. a git
worktree at a00e578) every round runs both trees back to back, so both see the same machine load; at
`--threads 1` the CPU time is the measure that other processes on a shared machine disturb least.

    python benchmarks/repro_cost.py                                  # superres x3, inpaint x3, txt2img --n 6
    python benchmarks/repro_cost.py --baseline /tmp/before --threads 1 --steps 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _inputs(root: Path) -> None:
    (root / "inpaint").mkdir()
    for photo in sorted((ROOT / "examples" / "photos").glob("*.png")):
        Image.open(photo).convert("RGB").save(root / "inpaint" / photo.name)
        mask = np.zeros((80, 120), np.uint8)
        mask[20:60, 30:90] = 255
        Image.fromarray(mask).save(root / "inpaint" / f"{photo.stem}_mask.png")


def _cases(root: Path, steps: list[str]) -> dict[str, list[str]]:
    return {
        "superres x3 120x80->480x320": ["superres", str(ROOT / "examples" / "photos"), *steps],
        "inpaint x3 120x80 batch 3": ["inpaint", str(root / "inpaint"), "--batch-size", "3", *steps],
        "txt2img --n 6 64x64 batch 6": ["txt2img", "--prompt", "a red circle above a blue square", "--n", "6",
                                        "--batch-size", "6", *steps],
    }


def _run(tree: Path, argv: list[str], out: Path, threads: int) -> tuple[float, float]:
    """(items' wall seconds, the child's CPU seconds) of one run of the CLI from `tree`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "ldmtool", *argv, "-o", str(out), "--seed", "1", "--json",
                           "--overwrite"], env=env, capture_output=True, text=True, check=True, cwd=tree)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return sum(e["seconds"] for e in events if e.get("event") == "done"), cpu


def _revision(tree: Path) -> str:
    revision = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "ldmtool"], capture_output=True,
                           text=True).stdout.strip()
    return revision + ("+local-changes" if dirty else "")


def _record(name: str, tree: Path, runs: list[tuple[float, float]], args: argparse.Namespace) -> dict:
    walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
    return {"bench": "repro_cost", "case": name, "revision": _revision(tree),
            "items_seconds_median": round(statistics.median(walls), 2), "items_seconds_min": round(min(walls), 2),
            "cpu_seconds_median": round(statistics.median(cpus), 2), "cpu_seconds_min": round(min(cpus), 2),
            "rounds": args.rounds, "threads": args.threads, "load_average": round(os.getloadavg()[0], 2),
            "cpu": _cpu()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="default: each model's own")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout of the code before the change")
    args = parser.parse_args()
    trees = [ROOT] if args.baseline is None else [args.baseline.resolve(), ROOT]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _inputs(root)
        steps = [] if args.steps is None else ["--steps", str(args.steps)]
        for name, argv in _cases(root, steps).items():
            runs: dict[Path, list[tuple[float, float]]] = {tree: [] for tree in trees}
            for i in range(args.rounds):
                for tree in trees:  # back to back, so both trees see the same load
                    runs[tree].append(_run(tree, argv, root / f"out{i}", args.threads))
            records = [_record(name, tree, runs[tree], args) for tree in trees]
            for record in records:
                print(json.dumps(record), flush=True)
            if len(records) == 2:
                print(json.dumps({"bench": "repro_cost", "case": name, "summary": "after / before",
                                  "cpu_ratio": round(records[1]["cpu_seconds_median"] / records[0]["cpu_seconds_median"], 3),
                                  "items_wall_ratio": round(records[1]["items_seconds_median"]
                                                            / max(records[0]["items_seconds_median"], 1e-9), 3)}),
                      flush=True)


if __name__ == "__main__":
    main()
