"""A real `ldmtool txt2img` run with malloc as ldmtool sets it (kept) and as the C library has it (system).

Writes an SD 1.5-size checkpoint with random weights (UNet, KL-f8 autoencoder, CLIP ViT-L; fp16 on disk,
about 2.1 GB, as `checkpoint_load.py` writes its weights), then runs `ldmtool txt2img --n 6` on it in fresh
child processes, alternating `LDMTOOL_MALLOC=system` with the default, `--rounds` times each. For each run: wall
seconds, user and kernel CPU seconds, minor page faults and peak RSS of the child (from `wait4`, the
kernel's own accounting of that process). The kept mode is `runtime/allocator.py`: freed memory stays for
the next allocation instead of going back to the kernel and being faulted in again.

    python benchmarks/malloc_run.py                  # 512x512, six images of 2 steps, once each (~4 min, 2.1 GB disk)
    python benchmarks/malloc_run.py --images 1 --steps 4 --rounds 2
    python benchmarks/malloc_run.py --dry-run        # a tiny SD-1 layout, 64x64, two images of 1 step: checks the script
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine  # noqa: E402
from checkpoint_load import architecture, write_safetensors_streaming  # noqa: E402


def write_model(folder: Path, tiny: bool, dtype: Any) -> Path:
    """The SD 1.x networks with random weights, without the schedule buffers (random ones would be no noise
    schedule; without them the config's schedule is used), its YAML beside it."""
    import yaml

    bundle, config = architecture("sd1", tiny)
    shapes = {k: v for k, v in bundle.state_dict().items() if "." in k}  # the schedule's keys have no dot
    path = folder / "sd.safetensors"
    write_safetensors_streaming(path, shapes, dtype)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_once(model: Path, out: Path, malloc: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["LDMTOOL_MALLOC"] = malloc
    argv = [sys.executable, "-m", "ldmtool", "txt2img", "-p", "a lighthouse at dusk", "--model", str(model),
            "-W", str(args.size), "-H", str(args.size), "--steps", str(args.steps), "--n", str(args.images),
            "--seed", "1", "-o", str(out), "--overwrite", "--quiet", "--no-gallery"]
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: a chatty child never blocks on it
        start = time.perf_counter()
        child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(child.pid, 0)  # the child's own rusage, which Popen.wait does not give
        wall = time.perf_counter() - start
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    return {"bench": "malloc_run", "malloc": malloc, "exit_code": code, "wall_s": round(wall, 2),
            "user_cpu_s": round(usage.ru_utime, 2), "kernel_cpu_s": round(usage.ru_stime, 2),
            "page_faults": usage.ru_minflt, "peak_rss_mib": usage.ru_maxrss // 1024, "size": args.size,
            "steps": args.steps, "images": args.images, **({"stderr": stderr[-500:]} if code else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--images", type=int, default=6, help="images in one run (--n): what a batch run repeats")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="where the checkpoint and outputs go (default: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="tiny SD-1 layout, 64x64, 1 step, 1 round")
    args = parser.parse_args()
    if args.dry_run:
        args.size, args.steps, args.images, args.rounds = 64, 1, 2, 1
    import torch

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        folder = Path(work)
        model = write_model(folder, args.dry_run, torch.float16)
        emit({"bench": "malloc_run", **machine(), "checkpoint_mib": model.stat().st_size >> 20})
        results: dict[str, list[dict[str, Any]]] = {"kept": [], "system": []}
        for _ in range(args.rounds):
            for malloc in results:  # alternate, so background load hits both alike
                record = run_once(model, folder / "out", malloc, args)
                results[malloc].append(record)
                emit(record)
        emit({"bench": "malloc_run", "summary": {
            malloc: {key: min(r[key] for r in records) for key in ("wall_s", "user_cpu_s", "kernel_cpu_s", "page_faults",
                                                                   "peak_rss_mib")}
            for malloc, records in results.items()}})


if __name__ == "__main__":
    main()
