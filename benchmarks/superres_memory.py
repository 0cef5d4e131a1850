"""Superres x4: peak memory and time versus output size (issue 8), as JSON lines.

Each output size runs `ldmtool superres` on one random image of a quarter of the side, in a FRESH child
process, so its peak RSS (the kernel's high-water mark of the child's own address space) belongs to that
size alone. Inside the
child every phase is measured too (`/proc/self/clear_refs` resets the high-water mark between phases):
model open, reading the input, the whole item, sampling, first-stage decode, writing the file. Each
size's record also lists the analytic sizes of the buffers that grow with the image, to name what grows.

Targets: peak memory at 16 output megapixels <= 1.3x that at 1 MP; seconds per output megapixel flat within
+-20% (from the item's own seconds, model loading excluded). The item's CPU seconds per megapixel are
reported beside them: on a shared machine wall time follows the other jobs, CPU time follows the work.

    python benchmarks/superres_memory.py --steps 2                        # 1024², 2048², 4096² (1, 4, 16 MP)
    python benchmarks/superres_memory.py --sizes 1024 2048 --steps 1
    python benchmarks/superres_memory.py --model my.safetensors           # a real model (config beside it)
    python benchmarks/superres_memory.py --model tiny --sizes 256 512     # tiny random LDM BSR x4
    python benchmarks/superres_memory.py --vae-store-mib 0                # diagnosis: no tiled-VAE store
    python benchmarks/superres_memory.py --dry-run                        # tiny sizes: checks the script

The model defaults to the shipped `default-superres` (the README's main job; its first stage has no
attention, so its exact tiled decode is linear in the area). `--model tiny` writes a tiny random checkpoint
of the LDM BSR x4 architecture (`ldm-bsr-sr`, narrow widths) to the work folder: its first stage keeps the
reference's global mid-block attention, which is exact and therefore quadratic in the latent area, so it
is only for small sizes. Records: one per size (`bench: superres_memory`), then one `summary`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MIB, emit, machine, python_argv, python_env, run_child  # noqa: E402

SCALE = 4
DEFAULT_SIZES = [1024, 2048, 4096]
DRY_SIZES = [64, 128]
PEAK_TARGET, TIME_SPREAD_TARGET = 1.3, 0.2


# -- the child: one superres run with every phase measured -------------------------------------------


def child_main(argv: list[str]) -> None:
    """`--child INPUT OUTPUT CLI_ARGS...`: run the superres CLI in this process, then print the phases."""
    from _common import PhaseRecorder, reset_peak, status_kib

    source, output, store_mib, cli_args = argv[0], argv[1], argv[2], argv[3:]
    recorder = PhaseRecorder(on_start=_progress)
    _instrument(recorder)
    if store_mib != "default":
        _limit_vae_store(int(float(store_mib) * MIB))
    from ldmtool.cli.app import main

    code = 0
    try:
        main(["superres", source, "-o", output, "--overwrite", "--json", *cli_args])
    except SystemExit as exit:
        code = exit.code or 0
    process_peak = max([status_kib("VmHWM") * 1024] + [p.peak_rss for p in recorder.phases])
    reset_peak()
    emit({"child": "phases", "exit_code": code, "exact_peaks": recorder.exact, "process_peak_rss": process_peak,
          "phases": [p.record() for p in recorder.phases]})


def _progress(phase: str) -> None:
    """Phase starts on stderr with the time, to follow a long size (its peak so far: VmHWM in /proc)."""
    print(f"{time.strftime('%H:%M:%S')} {phase} starts", file=sys.stderr, flush=True)


def _limit_vae_store(store_bytes: int) -> None:
    """Diagnosis: the engine's tiled first stage with this checkpoint store budget instead of its default."""
    import functools

    from ldmtool.pipelines import engine

    engine.VAETiling = functools.partial(engine.VAETiling, store_bytes=store_bytes)


def _instrument(recorder) -> None:
    """Wrap the functions each phase goes through (their modules' own names, which callers look up)."""
    from ldmtool.pipelines import engine, superres
    from ldmtool.runtime import execution

    targets = [
        (superres.SuperresTask, "open", "open_model"),
        (superres.SuperresTask, "load", "read_input"),
        (superres.SuperresTask, "_upscale_item", "upscale_item"),
        (engine.Engine, "sample", "sample"),
        (engine.Engine, "decode_pixels", "decode"),
        (execution, "write_image", "write"),
    ]
    for owner, attribute, phase in targets:
        setattr(owner, attribute, recorder.wrap(phase, getattr(owner, attribute)))


# -- the parent: one child per size -------------------------------------------------------------------


def write_input(path: Path, side: int) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def tiny_model(folder: Path) -> Path:
    from ldmtool.checkpoints.tiny import save_tiny_checkpoint

    path = folder / "tiny-bsr.safetensors"
    save_tiny_checkpoint(path, "ldm-bsr-sr", seed=0, with_config=True)
    return path


def growing_buffers(side: int, latent_channels: int = 3, downsampling: int = 4) -> dict[str, float]:
    """MiB of the buffers whose size follows the image (what a flat-memory pipeline must not hold whole)."""
    pixels = side * side
    latent = pixels // downsampling**2
    return {
        "output_rgb_float32": round(12 * pixels / MIB, 1),
        "output_rgb_uint8": round(3 * pixels / MIB, 1),
        "input_rgb_float32": round(12 * pixels / SCALE**2 / MIB, 1),
        "latent_float32": round(4 * latent_channels * latent / MIB, 1),
        "lowres_cond_at_latent_float32": round(4 * 3 * latent / MIB, 1),
    }


def measure_size(side: int, folder: Path, cli_args: list[str], timeout: Optional[float],
                 vae_store_mib: Optional[float] = None) -> dict[str, Any]:
    source, output = folder / f"in-{side}.png", folder / f"out-{side}.png"
    write_input(source, side // SCALE)
    store = "default" if vae_store_mib is None else str(vae_store_mib)
    child = run_child(python_argv(__file__, "--child", str(source), str(output), store, *cli_args),
                      env=python_env(), timeout=timeout)
    lines = child.json_lines()
    phases = next((r for r in lines if r.get("child") == "phases"), {})
    done = next((r for r in lines if r.get("event") == "done"), None)
    peak = int(phases.get("process_peak_rss", 0))
    megapixels = side * side / 1e6
    record: dict[str, Any] = {
        "bench": "superres_memory", "output": side, "output_mp": round(megapixels, 3), "input": side // SCALE,
        "exit_code": child.returncode, "peak_rss_mib": round(peak / MIB, 1), "process_seconds": round(child.seconds, 2),
        "vae_store_mib": vae_store_mib,
    }
    if done is None or child.returncode != 0:
        record["error"] = (child.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return record
    record["item_seconds"] = done["seconds"]
    record["seconds_per_mp"] = round(done["seconds"] / megapixels, 3)
    record["phases"] = phases.get("phases", [])
    item_phase = next((p for p in record["phases"] if p["phase"] == "upscale_item"), None)
    if item_phase is not None:
        record["cpu_seconds_per_mp"] = round(item_phase["cpu_seconds"] / megapixels, 3)
    record["exact_phase_peaks"] = phases.get("exact_peaks", False)
    record["growing_buffers_mib"] = growing_buffers(side)
    record["output_file_mib"] = round(output.stat().st_size / MIB, 2)
    output.unlink()
    return record


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if "seconds_per_mp" in r]
    summary: dict[str, Any] = {"bench": "superres_memory", "summary": True, "sizes": [r["output"] for r in ok]}
    if len(ok) < 2:
        return {**summary, "error": "fewer than two sizes finished"}
    small, large = ok[0], ok[-1]
    per_mp = [r["seconds_per_mp"] for r in ok]
    mean = sum(per_mp) / len(per_mp)
    spread = max(abs(v - mean) for v in per_mp) / mean
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    cpu = [r["cpu_seconds_per_mp"] for r in ok if "cpu_seconds_per_mp" in r]
    cpu_spread = max(abs(v - sum(cpu) / len(cpu)) for v in cpu) / (sum(cpu) / len(cpu)) if len(cpu) == len(ok) else None
    return {**summary, "peak_ratio_largest_over_smallest": round(ratio, 3), "peak_target": PEAK_TARGET,
            "peak_ok": ratio <= PEAK_TARGET, "seconds_per_mp": per_mp,
            "seconds_per_mp_max_deviation_from_mean": round(spread, 3), "time_target": TIME_SPREAD_TARGET,
            "time_ok": spread <= TIME_SPREAD_TARGET,
            # CPU seconds (one thread): the same flatness, free of other jobs' share of the machine
            "cpu_seconds_per_mp": cpu, "cpu_seconds_per_mp_max_deviation_from_mean":
                None if cpu_spread is None else round(cpu_spread, 3)}


def cli_arguments(args: argparse.Namespace, model: Path) -> list[str]:
    out = ["--model", str(model), "--scale", str(SCALE), "--steps", str(args.steps), "--seed", "0",
           "--device", "cpu"]
    if args.sampler:
        out += ["--sampler", args.sampler]
    if args.config:
        out += ["--config", str(args.config)]
    return out + list(args.extra)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="output sides in pixels (multiples of 16)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--sampler", default=None, help="default: the model's (DDIM for LDM BSR)")
    parser.add_argument("--model", default="default-superres",
                        help="model name or checkpoint, or 'tiny' (a tiny random ldm-bsr-sr); --dry-run: tiny")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--workdir", type=Path, help="where inputs, outputs and the tiny model go")
    parser.add_argument("--vae-store-mib", type=float, default=None,
                        help="diagnosis: the tiled first stage's checkpoint store budget (default: the engine's)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per size")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more superres options, last")
    parser.add_argument("--dry-run", action="store_true", help=f"sizes {DRY_SIZES}, one step")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    args = parse_args(argv)
    if args.dry_run:
        args.sizes, args.steps, args.model = args.sizes or DRY_SIZES, 1, "tiny"
    sizes = args.sizes or DEFAULT_SIZES
    with tempfile.TemporaryDirectory(prefix="ldm-superres-mem-", dir=args.workdir) as tmp:
        folder = Path(tmp)
        model = tiny_model(folder) if args.model == "tiny" else args.model
        cli_args = cli_arguments(args, model)
        emit({"bench": "superres_memory", "machine": machine(), "model": str(args.model),
              "steps": args.steps, "sizes": sizes, "cli": cli_args[2:]})
        records = []
        for side in sizes:
            records.append(measure_size(side, folder, cli_args, args.timeout, args.vae_store_mib))
            emit(records[-1])
        emit(summarise(records))


if __name__ == "__main__":
    main()
