"""Throughput of `--engine ray` against the local engine: the same superres command over one folder.

Usage: python benchmarks/ray_throughput.py [--images 24] [--size 32] [--steps 4] [--model PATH]
Prints one JSON line per engine (seconds, images per second) and the ratio. Without --model it uses a tiny
random checkpoint of the LDM BSR architecture, so the numbers measure the engines, not a model. On a
single small machine Ray is expected to be slower (cluster start, actor start, serialisation); its point is
that the same command scales out to many machines.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_inputs(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / f"img{i:03d}.png")


def timed_run(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ldmtool", *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model
        if model is None:
            from ldmtool.checkpoints.tiny import save_tiny_checkpoint

            model = root / "bsr.safetensors"
            save_tiny_checkpoint(model, "ldm-bsr-sr", with_config=True)
        make_inputs(root / "in", args.images, args.size)
        common = ["superres", str(root / "in"), "--model", str(model), "--steps", str(args.steps),
                  "--sampler", "euler", "--seed", "1", "--quiet"]
        results = {}
        for engine in ("local", "ray"):
            extra = ["--engine", "ray"] if engine == "ray" else []
            seconds = timed_run([*common, "-o", str(root / engine), *extra], root)
            results[engine] = seconds
            print(json.dumps({"bench": "ray_throughput", "engine": engine, "images": args.images,
                              "seconds": round(seconds, 2), "images_per_s": round(args.images / seconds, 3),
                              "cpus": os.cpu_count()}), flush=True)
        print(json.dumps({"bench": "ray_throughput", "ray_over_local_time": round(results["ray"] / results["local"], 2)}))


if __name__ == "__main__":
    main()
