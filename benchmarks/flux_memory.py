"""Loading a FLUX.1 dev transformer file (issue 24): peak memory and time per storage precision, and
optionally one transformer step, as JSON lines.

Writes a random transformer in BFL's released layout (full size: 11.9 B parameters, 23.8 GB in bf16, 11.9 GB
in fp8 `float8_e4m3fn`; `--depth D S` keeps the full widths with fewer blocks), streamed tensor by tensor so
this process never holds it; the values are one block of uniform [-0.05, 0.05] numbers repeated (what the
bytes hold does not change loading). The free disk space is checked first and a precision that does not fit
is skipped with a record saying so. Each file is loaded with `ldmtool.load_model(..., dtype=COMPUTE)` in a
FRESH child process, COMPUTE being what `--precision auto` gives on the step's device (`--compute`; fp32 on a
CPU without native bf16, where bf16 arithmetic is emulated and several times slower): fp8 `Linear` weights
stay fp8 (the file's pages) and are upcast one layer at a time, to COMPUTE, when the layer runs; bf16 weights
stay the memory-mapped file's, computed in bf16 when COMPUTE is bf16 and upcast one layer at a time when it is
fp32, as fp8 ones are. Each record has the load's seconds,
the child's peak RSS after the load and after reading every weight once (one at a time, as a step does),
its anonymous memory (copies) and file pages at the end, and with `--step DEVICE` one
denoiser call at 512² (1024 image tokens, 512 text tokens) on that device (wall and CPU seconds, the load
average before and after, and on CUDA peak allocated memory). Files are deleted at exit.

    python benchmarks/flux_memory.py --depth 2 4              # full widths, 2 + 4 blocks (~2.6 GB disk)
    python benchmarks/flux_memory.py --workdir /big/disk --step cuda   # full size: 36 GB of files
    python benchmarks/flux_memory.py --dry-run                # a tiny transformer: checks the script
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MIB, emit, machine, peak_rss, python_argv, python_env, run_child, status_kib  # noqa: E402

# name -> (torch dtype name, safetensors dtype code, bytes per value)
STORAGE = {"bf16": ("bfloat16", "BF16", 2), "fp8": ("float8_e4m3fn", "F8_E4M3", 1)}
BLOCK = 1 << 24  # values in the repeated random block
IMAGE_TOKENS, TEXT_TOKENS = 1024, 512  # 512x512 px: 64x64 latent, 32x32 patches; dev's T5 length


def transformer_doc(depth: Optional[list[int]], tiny: bool) -> dict[str, Any]:
    import copy

    from ldmtool.checkpoints.presets import load_preset
    from ldmtool.checkpoints.tiny import tiny_config

    doc = copy.deepcopy(tiny_config("flux1-dev") if tiny else load_preset("flux1-dev"))
    if depth:
        doc["model"]["params"]["denoiser_config"]["params"].update(depth=depth[0], depth_single_blocks=depth[1])
    return doc


def write_checkpoint(path: Path, doc: dict[str, Any], storage: str) -> int:
    """The transformer's state dict in `storage` precision, written one tensor at a time. Returns bytes."""
    import torch

    import ldmtool

    dtype_name, code, width = STORAGE[storage]
    shapes = ldmtool.build_model(doc, device="meta").state_dict()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, meta in shapes.items():
        size = meta.numel() * width
        header[key] = {"dtype": code, "shape": list(meta.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    block = torch.empty(BLOCK).uniform_(-0.05, 0.05, generator=torch.Generator().manual_seed(0))
    raw = block.to(getattr(torch, dtype_name)).view(torch.uint8).numpy().tobytes()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for meta in shapes.values():
            left = meta.numel() * width
            while left:
                chunk = raw[: min(left, len(raw))]
                f.write(chunk)
                left -= len(chunk)
    return path.stat().st_size


def child_main(path: str, step_device: str, compute: str) -> None:
    """`--child FILE DEVICE|- COMPUTE`: load it for COMPUTE (a torch dtype name) and report memory; one step
    on DEVICE unless '-'."""
    import torch

    from ldmtool.checkpoints.api import load_model

    after_import = status_kib("VmRSS") * 1024
    device = "cpu" if step_device == "-" else step_device
    dtype = getattr(torch, compute)
    start = time.perf_counter()
    bundle = load_model(path, dtype=dtype, device=device)
    load_s = time.perf_counter() - start
    record = {"child": "load", "rss_after_import": after_import, "load_s": load_s, "peak_rss_load": peak_rss(),
              "stored_bytes": sum(t.numel() * t.element_size() for t in bundle.state_dict().values())}
    start = time.perf_counter()
    for tensor in bundle.state_dict().values():  # every weight read once, as a step does (one at a time)
        tensor.to(torch.float32).sum()
    record.update(touch_s=time.perf_counter() - start, peak_rss_touch=peak_rss())
    if step_device != "-":
        record.update(_one_step(bundle.denoiser, device, dtype))
    record.update(peak_rss=peak_rss(), rss_anon_end=status_kib("RssAnon") * 1024,
                  rss_file_end=status_kib("RssFile") * 1024)
    emit(record)


def _one_step(net: Any, device: str, dtype: Any) -> dict[str, Any]:
    import os

    import torch

    g = torch.Generator().manual_seed(0)
    side = int(IMAGE_TOKENS ** 0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None]
    args = [torch.randn(1, IMAGE_TOKENS, net.in_channels, generator=g), img_ids.reshape(1, -1, 3),
            torch.randn(1, TEXT_TOKENS, net.txt_in.in_features, generator=g), torch.zeros(1, TEXT_TOKENS, 3),
            torch.tensor([0.5]), torch.randn(1, net.vector_in.in_layer.in_features, generator=g)]
    args = [a.to(device, dtype) if a.is_floating_point() else a.to(device) for a in args]
    guidance = torch.tensor([3.5], device=device, dtype=dtype)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    load_before, cpu_start, start = os.getloadavg()[0], time.process_time(), time.perf_counter()
    with torch.no_grad():
        out = net(*args, guidance=guidance)
    if cuda:
        torch.cuda.synchronize()
    record = {"step_s": time.perf_counter() - start, "step_cpu_s": time.process_time() - cpu_start,
              "step_finite": bool(torch.isfinite(out).all()), "loadavg_1m_before": load_before,
              "loadavg_1m_after": os.getloadavg()[0], "threads": torch.get_num_threads()}
    if cuda:
        record["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
    return record


def measure(path: Path, storage: str, compute: str, step: Optional[str], timeout: Optional[float]) -> dict[str, Any]:
    child = run_child(python_argv(__file__, "--child", str(path), step or "-", compute), env=python_env(),
                      timeout=timeout)
    found = next((r for r in child.json_lines() if r.get("child") == "load"), None)
    record: dict[str, Any] = {"bench": "flux_memory", "storage": storage, "compute": compute,
                              "file_mib": round(path.stat().st_size / MIB, 1), "exit_code": child.returncode}
    if found is None:
        record["error"] = (child.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return record
    record.update({"load_s": round(found["load_s"], 2), "stored_mib": round(found["stored_bytes"] / MIB, 1),
                   "rss_after_import_mib": round(found["rss_after_import"] / MIB, 1),
                   "peak_rss_after_load_mib": round(found["peak_rss_load"] / MIB, 1),
                   "touch_s": round(found["touch_s"], 2),
                   "peak_rss_after_touch_mib": round(found["peak_rss_touch"] / MIB, 1),
                   "peak_rss_mib": round(found["peak_rss"] / MIB, 1),
                   "rss_anon_end_mib": round(found["rss_anon_end"] / MIB, 1),
                   "rss_file_end_mib": round(found["rss_file_end"] / MIB, 1)})
    if "step_s" in found:
        record.update(step_device=step, step_s=round(found["step_s"], 3), step_cpu_s=round(found["step_cpu_s"], 1),
                      step_finite=found["step_finite"], threads=found["threads"],
                      loadavg_1m=[round(found["loadavg_1m_before"], 2), round(found["loadavg_1m_after"], 2)])
    if "cuda_peak_allocated" in found:
        record["cuda_peak_allocated_mib"] = round(found["cuda_peak_allocated"] / MIB, 1)
    return record


def compute_dtype(choice: str, step: Optional[str]) -> str:
    """The torch dtype name the step computes in: the choice, or what `--precision auto` resolves to."""
    import torch

    from ldmtool.runtime.device import resolve_precision

    if choice != "auto":
        return {"fp32": "float32", "bf16": "bfloat16"}[choice]
    return str(resolve_precision("auto", torch.device(step or "cpu")).dtype).removeprefix("torch.")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", nargs="+", choices=sorted(STORAGE), default=["fp8", "bf16"])
    parser.add_argument("--depth", nargs=2, type=int, metavar=("DOUBLE", "SINGLE"),
                        help="blocks to keep (default: all, 19 and 38)")
    parser.add_argument("--step", metavar="DEVICE", help="also run one denoiser call there (cpu, cuda)")
    parser.add_argument("--compute", choices=["auto", "fp32", "bf16"], default="auto",
                        help="the dtype the weights are loaded for and the step computes in (default: what "
                             "--precision auto gives on the step's device)")
    parser.add_argument("--workdir", type=Path, help="where the files go (deleted at exit)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per child")
    parser.add_argument("--dry-run", action="store_true", help="a tiny transformer of the same layout")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1], argv[2], argv[3])
    args = parse_args(argv)
    compute = compute_dtype(args.compute, args.step)
    doc = transformer_doc(args.depth, args.dry_run)
    params = doc["model"]["params"]["denoiser_config"]["params"]
    emit({"bench": "flux_memory", "machine": machine(), "tiny": args.dry_run, "depth": [params["depth"],
          params["depth_single_blocks"]], "compute": compute, "page_cache": "warm (file just written)"})
    with tempfile.TemporaryDirectory(prefix="ldm-flux-", dir=args.workdir) as tmp:
        import ldmtool

        values = sum(t.numel() for t in ldmtool.build_model(doc, device="meta").state_dict().values())
        for storage in args.storage:
            needed, free = values * STORAGE[storage][2], shutil.disk_usage(tmp).free
            if needed > 0.95 * free:
                emit({"bench": "flux_memory", "storage": storage, "skipped": f"needs {needed / MIB:.0f} MiB of disk, "
                      f"{free / MIB:.0f} MiB free in {tmp}"})
                continue
            path = Path(tmp) / f"flux1-dev-{storage}.safetensors"
            start = time.perf_counter()
            write_checkpoint(path, doc, storage)
            write_s = time.perf_counter() - start
            emit({**measure(path, storage, compute, args.step, args.timeout), "write_s": round(write_s, 1)})
            path.unlink()


if __name__ == "__main__":
    main()
