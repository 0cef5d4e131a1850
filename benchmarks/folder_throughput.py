"""Folder throughput (issue 8): one `ldmtool superres FOLDER` process for N small images versus N separate
`ldmtool superres FILE` invocations (each one starts Python, imports torch, loads and hashes the model), as
JSON lines.

Target: the one-process run takes <= 0.2x the time of the separate invocations, at N = 100.

With `--quick` fewer images are run and both totals are extrapolated to `--count` linearly: the one-process
total as its fixed part (start, model load, hashing: the measured total minus the items' own seconds from
the `--json` events) plus `--count` times the mean item time after the first; the separate total as
`--count` times the mean invocation time. Measured and extrapolated values are both printed.

    python benchmarks/folder_throughput.py                 # 100 images both ways (long on 2 cores)
    python benchmarks/folder_throughput.py --quick         # 10 in one process, 3 separate, extrapolated
    python benchmarks/folder_throughput.py --dry-run       # 2 and 1: checks the script

Without --model a tiny random checkpoint of the LDM BSR x4 architecture is used, on 32x32 inputs, one step.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ChildRun, emit, machine, python_env, run_child  # noqa: E402

TARGET = 0.2


def ldmtool_argv() -> list[str]:
    """How a user starts the tool: the installed console script, else `python -m ldmtool`."""
    script = shutil.which("ldmtool") or str(Path(sys.executable).with_name("ldmtool"))
    return [script] if os.path.exists(script) else [sys.executable, "-m", "ldmtool"]


def write_inputs(folder: Path, count: int, side: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"img{index:03d}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def superres(inputs: list[str], output: Path, common: list[str], timeout: Optional[float]) -> ChildRun:
    argv = [*ldmtool_argv(), "superres", *inputs, "-o", str(output), "--json", *common]
    run = run_child(argv, env=python_env(), timeout=timeout)
    if run.returncode != 0:
        raise SystemExit(f"superres failed (exit {run.returncode}): {run.stderr.strip()[-500:]}")
    return run


def one_process(folder: Path, output: Path, common: list[str], timeout: Optional[float]) -> dict[str, Any]:
    run = superres([str(folder)], output, common, timeout)
    items = [r["seconds"] for r in run.json_lines() if r.get("event") == "done"]
    return {"bench": "folder_throughput", "mode": "one_process", "images": len(items),
            "seconds": round(run.seconds, 2), "fixed_seconds": round(run.seconds - sum(items), 2),
            "item_seconds_mean": round(statistics.mean(items), 3),
            "item_seconds_after_first": round(statistics.mean(items[1:] or items), 3)}


def separate(paths: list[Path], output: Path, common: list[str], timeout: Optional[float]) -> dict[str, Any]:
    seconds = [superres([str(path)], output, common, timeout).seconds for path in paths]
    return {"bench": "folder_throughput", "mode": "separate", "invocations": len(seconds),
            "seconds": round(sum(seconds), 2), "per_invocation_mean": round(statistics.mean(seconds), 3),
            "per_invocation_min": round(min(seconds), 3)}


def extrapolate(one: dict[str, Any], sep: dict[str, Any], count: int) -> dict[str, Any]:
    one_total = one["seconds"] if one["images"] == count else one["fixed_seconds"] + count * one["item_seconds_after_first"]
    sep_total = sep["seconds"] if sep["invocations"] == count else count * sep["per_invocation_mean"]
    ratio = one_total / sep_total
    return {"bench": "folder_throughput", "summary": True, "images": count,
            "extrapolated": one["images"] != count or sep["invocations"] != count,
            "one_process_seconds": round(one_total, 2), "separate_seconds": round(sep_total, 2),
            "ratio_one_over_separate": round(ratio, 4), "target": TARGET, "ok": ratio <= TARGET}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="images the comparison is about")
    parser.add_argument("--quick", action="store_true", help="10 images in one process, 3 separate; extrapolate")
    parser.add_argument("--size", type=int, default=32, help="input side in pixels (output is 4x)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--model", type=Path, help="checkpoint (default: a tiny random ldm-bsr-sr)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per process")
    parser.add_argument("--dry-run", action="store_true", help="2 images in one process, 1 separate")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    in_one, in_separate = args.count, args.count
    if args.quick:
        in_one, in_separate = min(10, args.count), min(3, args.count)
    if args.dry_run:
        in_one, in_separate = 2, 1
    with tempfile.TemporaryDirectory(prefix="ldm-folder-", dir=args.workdir) as tmp:
        root = Path(tmp)
        model = args.model
        if model is None:
            from ldmtool.checkpoints.tiny import save_tiny_checkpoint

            model = root / "tiny-bsr.safetensors"
            save_tiny_checkpoint(model, "ldm-bsr-sr", seed=0, with_config=True)
        paths = write_inputs(root / "in", max(in_one, in_separate), args.size)
        batch = root / "batch"
        batch.mkdir()
        for path in paths[:in_one]:
            os.link(path, batch / path.name)
        common = ["--model", str(model), "--scale", "4", "--steps", str(args.steps), "--seed", "0", "--device", "cpu"]
        emit({"bench": "folder_throughput", "machine": machine(), "model": str(args.model or "tiny ldm-bsr-sr"),
              "input_side": args.size, "steps": args.steps, "command": ldmtool_argv()[-1]})
        started = time.perf_counter()
        one = one_process(batch, root / "out-one", common, args.timeout)
        emit(one)
        sep = separate(paths[:in_separate], root / "out-separate", common, args.timeout)
        emit(sep)
        emit({**extrapolate(one, sep, args.count), "benchmark_seconds": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    main()
