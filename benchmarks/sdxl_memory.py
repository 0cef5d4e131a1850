"""Loading a full-size SDXL single file (issue 18): peak memory and time, as JSON lines.

Writes a random SDXL base 1.0 checkpoint in the released layout and size (6.9 GB of fp16 safetensors: the
UNet, both text encoders and the VAE), streamed tensor by tensor so this process never holds it; the values
are one block of uniform [-0.05, 0.05] fp16 numbers repeated (what the bytes hold does not change loading,
and drawing 3.5 billion random numbers would dominate the run on a small machine). Then loads it with
`ldmtool.load_model` in a FRESH child process per precision: `fp16` (the file's own: memory-mapped, no
copy), then `bf16` and optionally `fp32` (the CPU precisions, `--precision`: one converted copy). Each
record has the load's wall seconds, the child's peak RSS after the load and after reading every weight once
(what the first step does), and how much of the final RSS is anonymous memory (copies) versus file pages
(weights still backed by the memory-mapped file). The file is deleted at exit.

    python benchmarks/sdxl_memory.py                       # fp16 and bf16 loads (~7 GB disk, ~8 GB RAM)
    python benchmarks/sdxl_memory.py --dtypes fp16 bf16 fp32 --workdir /big/disk
    python benchmarks/sdxl_memory.py --dry-run             # a tiny SDXL layout: checks the script
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MIB, emit, machine, peak_rss, python_argv, python_env, run_child, status_kib  # noqa: E402

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
BLOCK = 1 << 24  # values in the repeated random block


def write_checkpoint(path: Path, tiny: bool) -> int:
    """The base preset's state dict, every float tensor fp16, written one tensor at a time. Returns bytes."""
    import torch
    import yaml

    import ldmtool
    from ldmtool.checkpoints.tiny import tiny_config

    bundle = ldmtool.build_model(tiny_config("sdxl-base") if tiny else "sdxl-base", device="meta")
    shapes = bundle.state_dict()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, meta in shapes.items():
        size = meta.numel() * 2
        header[key] = {"dtype": "F16", "shape": list(meta.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    block = torch.empty(BLOCK).uniform_(-0.05, 0.05, generator=torch.Generator().manual_seed(0)).half()
    raw = block.view(torch.uint8).numpy().tobytes()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for meta in shapes.values():
            left = meta.numel() * 2
            while left:
                chunk = raw[: min(left, len(raw))]
                f.write(chunk)
                left -= len(chunk)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(bundle.config, sort_keys=False))
    return path.stat().st_size


def child_main(path: str, dtype_name: str) -> None:
    """`--child FILE DTYPE`: load it at that precision and report timings and memory."""
    import torch

    after_import = status_kib("VmRSS") * 1024
    from ldmtool.checkpoints.api import load_model

    start = time.perf_counter()
    bundle = load_model(path, dtype=getattr(torch, DTYPES[dtype_name]))
    load_s = time.perf_counter() - start
    peak_after_load = peak_rss()
    start = time.perf_counter()
    for tensor in bundle.state_dict().values():
        tensor.sum()
    touch_s = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for t in bundle.state_dict().values())
    emit({"child": "load", "rss_after_import": after_import, "peak_rss_load": peak_after_load,
          "peak_rss": peak_rss(), "rss_anon_end": status_kib("RssAnon") * 1024,
          "rss_file_end": status_kib("RssFile") * 1024, "weights_bytes": weights, "load_s": load_s,
          "touch_s": touch_s})


def measure(path: Path, dtype_name: str, timeout: Optional[float]) -> dict[str, Any]:
    child = run_child(python_argv(__file__, "--child", str(path), dtype_name), env=python_env(), timeout=timeout)
    found = next((r for r in child.json_lines() if r.get("child") == "load"), None)
    record: dict[str, Any] = {"bench": "sdxl_memory", "dtype": dtype_name, "file_mib": round(path.stat().st_size / MIB, 1),
                              "exit_code": child.returncode}
    if found is None:
        record["error"] = (child.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return record
    record.update({"load_s": round(found["load_s"], 2), "touch_s": round(found["touch_s"], 2),
                   "weights_mib": round(found["weights_bytes"] / MIB, 1),
                   "rss_after_import_mib": round(found["rss_after_import"] / MIB, 1),
                   "peak_rss_after_load_mib": round(found["peak_rss_load"] / MIB, 1),
                   "peak_rss_mib": round(found["peak_rss"] / MIB, 1),
                   "rss_anon_end_mib": round(found["rss_anon_end"] / MIB, 1),
                   "rss_file_end_mib": round(found["rss_file_end"] / MIB, 1)})
    return record


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    parser.add_argument("--workdir", type=Path, help="where the checkpoint goes (deleted at exit)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per load")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model of the same layout")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1], argv[2])
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ldm-sdxl-", dir=args.workdir) as tmp:
        path = Path(tmp) / "sdxl-base.safetensors"
        start = time.perf_counter()
        size = write_checkpoint(path, args.dry_run)
        emit({"bench": "sdxl_memory", "machine": machine(), "tiny": args.dry_run, "file_mib": round(size / MIB, 1),
              "write_seconds": round(time.perf_counter() - start, 1), "page_cache": "warm (file just written)"})
        for name in args.dtypes:
            emit(measure(path, name, args.timeout))


if __name__ == "__main__":
    main()
