"""Speed cost of the reproducibility contract (issue 15): the shipped defaults end to end, as JSON lines.

Each case runs the real CLI in a child process (2 threads unless --threads) and reports the items' own
seconds from the `--json` events (model load and start-up excluded), median over --rounds. Run it on two
checkouts (before/after) on the same machine and compare; the line records the git revision and CPU.

    python benchmarks/repro_cost.py                 # superres x3, inpaint x3, txt2img --n 6, default steps
    python benchmarks/repro_cost.py --rounds 1 --steps 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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


def _item_seconds(argv: list[str], out: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ldmtool", *argv, "-o", str(out), "--seed", "1", "--json",
                           "--overwrite"], env=env, capture_output=True, text=True, check=True)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    return sum(e["seconds"] for e in events if e.get("event") == "done")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="default: each model's own")
    args = parser.parse_args()
    revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "ldmtool"], capture_output=True,
                           text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _inputs(root)
        steps = [] if args.steps is None else ["--steps", str(args.steps)]
        for name, argv in _cases(root, steps).items():
            times = [_item_seconds(argv, root / f"out{i}", args.threads) for i in range(args.rounds)]
            print(json.dumps({"bench": "repro_cost", "case": name, "items_seconds_median": round(statistics.median(times), 2),
                              "items_seconds_min": round(min(times), 2), "rounds": args.rounds, "threads": args.threads,
                              "revision": revision + ("+local-changes" if dirty else ""), "cpu": _cpu()}), flush=True)


if __name__ == "__main__":
    main()
