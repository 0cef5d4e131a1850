"""Upscale by diffusion (`img2img --scale 4`): peak memory versus input size (issue 20), as JSON lines.

Each input size runs `ldmtool img2img --scale 4` on one random image in a FRESH child process, so its peak
RSS (the child's own `VmHWM`) belongs to that size alone. Target: the peak on a 1 MP input (16 MP output)
within 1.3x of the peak on a 0.25 MP input (4 MP output): memory follows the tile, not the image.

    python benchmarks/upscale_memory.py                          # inputs 512² and 1024² (the issue's sizes)
    python benchmarks/upscale_memory.py --sizes 128 256          # the same 4x area ratio, 16x less work
    python benchmarks/upscale_memory.py --dry-run                # tiny sizes: checks the script

The model is the shipped `default-txt2img` (img2img's default). Sampling is cut to what memory needs: one
UNet step (`--steps 2 --strength 0.5`) and no guidance (`--cfg 1`); the exact tiled encode and decode, which
visit the whole image, run in full. Records: one per size (`bench: upscale_memory`), then one `summary`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MIB, emit, machine, peak_rss, python_argv, python_env, run_child  # noqa: E402

SCALE = 4
DEFAULT_SIZES = [512, 1024]
DRY_SIZES = [16, 32]
PEAK_TARGET = 1.3


def child_main(argv: list[str]) -> None:
    """`--child INPUT OUTPUT CLI_ARGS...`: the img2img CLI in this process, then its peak RSS."""
    from ldmtool.cli.app import main

    source, output, cli_args = argv[0], argv[1], argv[2:]
    code = 0
    try:
        main(["img2img", source, "-o", output, "--overwrite", "--json", *cli_args])
    except SystemExit as exit:
        code = exit.code or 0
    emit({"child": "peak", "exit_code": code, "process_peak_rss": peak_rss()})


def write_input(path: Path, side: int) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def measure_size(side: int, folder: Path, cli_args: list[str], timeout: Optional[float]) -> dict[str, Any]:
    source, output = folder / f"in-{side}.png", folder / f"out-{side}.png"
    write_input(source, side)
    child = run_child(python_argv(__file__, "--child", str(source), str(output), *cli_args), env=python_env(),
                      timeout=timeout)
    lines = child.json_lines()
    peak = next((r for r in lines if r.get("child") == "peak"), {})
    done = next((r for r in lines if r.get("event") == "done"), None)
    record: dict[str, Any] = {
        "bench": "upscale_memory", "input": side, "input_mp": round(side * side / 1e6, 3),
        "output": side * SCALE, "output_mp": round((side * SCALE) ** 2 / 1e6, 3), "exit_code": child.returncode,
        "peak_rss_mib": round(int(peak.get("process_peak_rss", 0)) / MIB, 1), "process_seconds": round(child.seconds, 2),
    }
    if done is None or child.returncode != 0:
        record["error"] = (child.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return record
    record["item_seconds"] = done["seconds"]
    output.unlink()
    return record


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if "item_seconds" in r]
    summary: dict[str, Any] = {"bench": "upscale_memory", "summary": True, "inputs": [r["input"] for r in ok]}
    if len(ok) < 2:
        return {**summary, "error": "fewer than two sizes finished"}
    ratio = ok[-1]["peak_rss_mib"] / ok[0]["peak_rss_mib"]
    return {**summary, "peak_ratio_largest_over_smallest": round(ratio, 3), "peak_target": PEAK_TARGET,
            "peak_ok": ratio <= PEAK_TARGET}


def cli_arguments(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--scale", str(SCALE), "--strength", "0.5", "--steps", str(args.steps),
            "--cfg", "1", "--prompt", "a red circle", "--seed", "0", "--device", "cpu", *args.extra]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="input sides in pixels, smallest first")
    parser.add_argument("--steps", type=int, default=2, help="sampler steps (x 0.5 strength = UNet steps run)")
    parser.add_argument("--model", default="default-txt2img")
    parser.add_argument("--workdir", type=Path, help="where inputs and outputs go")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per size")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more img2img options, last")
    parser.add_argument("--dry-run", action="store_true", help=f"input sides {DRY_SIZES}")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    args = parse_args(argv)
    sizes = args.sizes or (DRY_SIZES if args.dry_run else DEFAULT_SIZES)
    with tempfile.TemporaryDirectory(prefix="ldm-upscale-mem-", dir=args.workdir) as tmp:
        cli_args = cli_arguments(args)
        emit({"bench": "upscale_memory", "machine": machine(), "sizes": sizes, "cli": cli_args})
        records = []
        for side in sizes:
            records.append(measure_size(side, Path(tmp), cli_args, args.timeout))
            emit(records[-1])
        emit(summarise(records))


if __name__ == "__main__":
    main()
