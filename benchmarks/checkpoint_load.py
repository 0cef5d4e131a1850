"""Checkpoint load time and peak memory: memory-mapped `.safetensors` vs `.ckpt` (issue 8), as JSON lines.

Writes one checkpoint of the SD 1.5 architecture (UNet, KL-f8 autoencoder, CLIP ViT-L text encoder; about
1.07 billion parameters, 4.3 GB in fp32) with random weights, in the original key layout, as
`.safetensors` and as a Lightning-style `.ckpt` (zip format, so `torch.load(weights_only=True, mmap=True)`
maps it). Neither file is ever held whole in this process: the safetensors file is streamed tensor by
tensor from a meta-device model, and the `.ckpt` is saved from tensors that are views of that file's
memory map. Then each format is loaded with `ldmtool.load_model` in a FRESH child process, alternating
formats, `--repeat` times: wall seconds of reading the file and of the whole load (imports excluded), then
of reading every weight once (what the first forward does: memory-mapped weights are only paged in when
touched, so `load_s` alone can hide the I/O), and the child's peak RSS
(its own `VmHWM`) next to its RSS after `import torch`, and how much of its final RSS is anonymous memory
(copies) versus file pages (weights still backed by the memory-mapped file). The files live in the page cache after writing (the
loads are warm-cache loads; this script never drops the system's caches). Both files are deleted at exit.

Target (DESIGN.md §7): the safetensors load peaks near one copy of the weights (no second copy while the
model is built) and is faster than the `.ckpt` load.

    python benchmarks/checkpoint_load.py                  # SD 1.5 size, fp32 (needs ~9 GB disk, ~5 GB RAM)
    python benchmarks/checkpoint_load.py --dtype fp16     # half the size
    python benchmarks/checkpoint_load.py --dry-run        # a tiny SD-1 layout: checks the script
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MIB, emit, machine, python_argv, python_env, run_child  # noqa: E402

SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32"}


# -- writing the checkpoint without holding it ------------------------------------------------------


def architecture(preset: str, tiny: bool):
    """The SD bundle on the meta device (no weight allocated) and its CompVis config."""
    import ldmtool
    from ldmtool.checkpoints.tiny import tiny_config

    config = tiny_config(preset) if tiny else preset
    bundle = ldmtool.build_model(config, device="meta")
    return bundle, bundle.config


def random_tensors(shapes: dict[str, Any], dtype, seed: int = 0) -> Iterator[tuple[str, Any]]:
    """Each tensor materialised alone: uniform in [-0.05, 0.05] (what the bytes hold does not change load time)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for key, meta in shapes.items():
        out_dtype = dtype if meta.dtype.is_floating_point else meta.dtype
        value = torch.empty(meta.shape, dtype=torch.float32)
        if meta.dtype.is_floating_point:
            value.uniform_(-0.05, 0.05, generator=generator)
        else:
            value.zero_()
        yield key, value.to(out_dtype)


def write_safetensors_streaming(path: Path, shapes: dict[str, Any], dtype) -> int:
    """A valid safetensors file written one tensor at a time (peak memory: the largest tensor). Returns bytes."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, meta in shapes.items():
        out_dtype = dtype if meta.dtype.is_floating_point else meta.dtype
        size = meta.numel() * torch.empty((), dtype=out_dtype).element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[str(out_dtype).removeprefix("torch.")],
                       "shape": list(meta.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for _, value in random_tensors(shapes, dtype):
            f.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too (logit_scale)
    return path.stat().st_size


def mapped_tensors(path: Path) -> dict[str, Any]:
    """Tensors that are views of a safetensors file's memory map (nothing read until used)."""
    import numpy as np
    import torch

    torch_dtypes = {v: getattr(torch, k) for k, v in SAFETENSORS_DTYPES.items()}
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        chunk = torch.from_numpy(raw[start:end])  # read-only view: torch warns, nothing is written through it
        out[key] = chunk.view(torch_dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def write_checkpoints(folder: Path, preset: str, tiny: bool, dtype) -> dict[str, Path]:
    import warnings

    import torch
    import yaml

    bundle, config = architecture(preset, tiny)
    shapes = bundle.state_dict()
    paths = {"safetensors": folder / "sd.safetensors", "ckpt": folder / "sd.ckpt"}
    write_safetensors_streaming(paths["safetensors"], shapes, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # non-writable numpy views
        torch.save({"state_dict": mapped_tensors(paths["safetensors"]), "global_step": 0}, paths["ckpt"])
    for path in paths.values():  # the architecture beside each file, as users keep it
        path.with_suffix(".yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return paths


# -- loading, in a fresh child per measurement -------------------------------------------------------


def child_main(path: str) -> None:
    """`--child FILE`: load it with ldmtool and print the phase timings and RSS after `import torch`."""
    import torch

    from _common import peak_rss, status_kib

    after_import = status_kib("VmRSS") * 1024
    start = time.perf_counter()
    from ldmtool.checkpoints import api, bundle as _bundle  # noqa: F401

    timings: dict[str, float] = {"import_s": time.perf_counter() - start}
    read = api.read_state_dict

    def timed_read(*args, **kwargs):
        start = time.perf_counter()
        result = read(*args, **kwargs)
        timings["read_s"] = time.perf_counter() - start
        return result

    api.read_state_dict = timed_read
    start = time.perf_counter()
    bundle = api.load_model(path, dtype=None)
    timings["load_s"] = time.perf_counter() - start
    peak_after_load = peak_rss()
    start = time.perf_counter()
    state = bundle.state_dict()
    for tensor in state.values():  # what the first forward does: every weight byte read once
        tensor.sum()
    timings["touch_s"] = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for t in state.values())
    emit({"child": "load", "rss_after_import": after_import, "peak_rss_load": peak_after_load, "peak_rss": peak_rss(),
          "rss_anon_end": status_kib("RssAnon") * 1024, "rss_file_end": status_kib("RssFile") * 1024,
          "weights_bytes": weights, "torch_threads": torch.get_num_threads(), **timings})


def measure(fmt: str, path: Path, timeout: Optional[float]) -> dict[str, Any]:
    child = run_child(python_argv(__file__, "--child", str(path)), env=python_env(), timeout=timeout)
    found = next((r for r in child.json_lines() if r.get("child") == "load"), None)
    record: dict[str, Any] = {"bench": "checkpoint_load", "format": fmt, "file_mib": round(path.stat().st_size / MIB, 1),
                              "exit_code": child.returncode, "process_seconds": round(child.seconds, 2)}
    if found is None:
        record["error"] = (child.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return record
    base, peak, weights = found["rss_after_import"], found["peak_rss"], found["weights_bytes"]
    record.update(import_s=round(found["import_s"], 3), read_s=round(found["read_s"], 3),
                  load_s=round(found["load_s"], 3), touch_s=round(found["touch_s"], 3),
                  load_and_touch_s=round(found["load_s"] + found["touch_s"], 3),
                  peak_rss_after_load_mib=round(found["peak_rss_load"] / MIB, 1), peak_rss_mib=round(peak / MIB, 1),
                  rss_after_import_mib=round(base / MIB, 1), peak_above_import_mib=round((peak - base) / MIB, 1),
                  weights_mib=round(weights / MIB, 1), peak_above_import_over_weights=round((peak - base) / weights, 3),
                  rss_anon_end_mib=round(found["rss_anon_end"] / MIB, 1),
                  rss_file_end_mib=round(found["rss_file_end"] / MIB, 1))
    return record


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    best: dict[str, dict[str, Any]] = {}
    for r in records:
        if "load_s" in r and (r["format"] not in best or r["load_and_touch_s"] < best[r["format"]]["load_and_touch_s"]):
            best[r["format"]] = r
    summary: dict[str, Any] = {"bench": "checkpoint_load", "summary": True}
    if len(best) < 2:
        return {**summary, "error": "a format failed to load"}
    st, ck = best["safetensors"], best["ckpt"]
    return {**summary, "best_load_s": {k: v["load_s"] for k, v in best.items()},
            "best_load_and_touch_s": {k: v["load_and_touch_s"] for k, v in best.items()},
            "peak_rss_mib": {k: v["peak_rss_mib"] for k, v in best.items()},
            "load_time_ratio_safetensors_over_ckpt": round(st["load_s"] / ck["load_s"], 3),
            "load_and_touch_ratio_safetensors_over_ckpt": round(st["load_and_touch_s"] / ck["load_and_touch_s"], 3),
            "peak_ratio_safetensors_over_ckpt": round(st["peak_rss_mib"] / ck["peak_rss_mib"], 3)}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd1", help="architecture (an ldmtool preset name)")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--repeat", type=int, default=2, help="loads per format (alternating)")
    parser.add_argument("--workdir", type=Path, help="where the checkpoint files go (deleted at exit)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per load")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model of the same layout, one load each")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1])
    args = parse_args(argv)
    import torch

    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    repeat = 1 if args.dry_run else args.repeat
    with tempfile.TemporaryDirectory(prefix="ldm-ckpt-load-", dir=args.workdir) as tmp:
        start = time.perf_counter()
        paths = write_checkpoints(Path(tmp), args.preset, args.dry_run, dtype)
        emit({"bench": "checkpoint_load", "machine": machine(), "preset": args.preset, "tiny": args.dry_run,
              "dtype": args.dtype, "repeat": repeat, "write_seconds": round(time.perf_counter() - start, 1),
              "page_cache": "warm (files just written)"})
        records = []
        for _ in range(repeat):
            for fmt, path in paths.items():
                records.append(measure(fmt, path, args.timeout))
                emit(records[-1])
        emit(summarise(records))


if __name__ == "__main__":
    main()
