"""UNet step time, ldmtool vs diffusers on the same weights (issue 8): SD 1.5 architecture, random weights.

Builds our UNet from the SD 1.5 `unet_config`, converts its state dict with diffusers' own single-file
converter and loads it into diffusers' UNet2DConditionModel sharing the same tensors (no second copy of the
weights). Then times one denoising step of each, alternating so that load from other processes hits both
alike, and prints one JSON line per (implementation, batch) plus the ratio ldmtool / diffusers.

    python benchmarks/unet_step.py                 # full size, fp32, 64x64 latent, batch 1 and 2 (~7.5 GB)
    python benchmarks/unet_step.py --width 160     # a cheaper proxy with half the channels
    python benchmarks/unet_step.py --device cuda --dtype bf16 --latent 64

ldmtool runs in the precision `--precision auto` picks on this machine (bf16 on a CPU with AMX or
AVX512-BF16, else fp32); diffusers runs in that precision and, where it is bf16, in fp32 too, and the ratio
takes diffusers' faster one (issue 17). The first line names the CPU's instruction set and its measured fp32
and bf16 matmul rates (the best over a few shapes, `_common.PEAK_SHAPES`); each ratio line also gives the
step's FLOPs (torch's FlopCounterMode, taught the CPU flash-attention kernel) and ldmtool's achieved rate as a
fraction of the better of those two peaks.

Each JSON line has wall seconds (median and min over --rounds) and CPU seconds of this process (median);
the ratios are ldmtool / diffusers from the same run. On a machine shared with other work the wall times
swing with the load; the CPU-time ratio and the ratio of the fastest runs are the steadier figures.

malloc keeps freed memory as in an ldmtool batch run (runtime/allocator.py), for both implementations, since
the setting is the process's; `--malloc system` leaves glibc's own. Each line gives the step's page faults and
kernel CPU seconds, which show the difference.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from _common import count_cpu_attention, emit, matmul_peaks
from ldmtool.nets.compiled import compile_network
from ldmtool.nets.unet import UNetModel
from ldmtool.runtime.allocator import keep_freed_memory
from ldmtool.runtime.device import resolve_precision

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)


def build_pair(width: int):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    params = dict(SD15_UNET, model_channels=width)
    torch.manual_seed(0)
    ours = UNetModel(**params).eval()
    with torch.no_grad():  # the reference zero-initialises output layers; give them values like a real model
        for p in ours.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=512)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True, assign=True)
    return ours, theirs.eval()


def time_once(fn, device: torch.device) -> tuple[float, float, float, float]:
    """(wall seconds, CPU seconds of this process, page faults, kernel CPU seconds). On a shared machine the
    CPU time is the steadier measure of work done; the wall time is what a user waits; the faults and kernel
    time show memory handed back to the kernel and faulted in again (runtime/allocator.py)."""
    wall, cpu, usage = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (time.perf_counter() - wall, time.process_time() - cpu, after.ru_minflt - usage.ru_minflt,
            after.ru_stime - usage.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=320, help="model_channels (320 = SD 1.5)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 images)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per implementation and batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+",
                        help="precisions to time both in (default: what ldmtool's --precision auto picks here, "
                        "plus fp32 where that is bf16, so diffusers gets its best)")
    parser.add_argument("--compile", action="store_true",
                        help="ldmtool's network as `--compile` runs it (torch.compile, frozen weights), in one precision "
                        "(the first --dtype, else auto's); the compile time of each batch's first call is reported")
    parser.add_argument("--max-autotune", action="store_true",
                        help="with --compile: inductor's max-autotune for the matrix products (its C++ AMX/AVX-512 GEMM "
                        "template against oneDNN, each product timed and the faster kept; not what --compile runs)")
    parser.add_argument("--malloc", choices=["kept", "system"], default="kept",
                        help="kept: freed memory stays for reuse, as in an ldmtool batch run (for both implementations: "
                        "the setting is the process's); system: the C library's default, as a plain diffusers script")
    parser.add_argument("--dry-run", action="store_true", help="tiny width and latent, one round (checks the script)")
    args = parser.parse_args()
    if args.dry_run:
        args.width, args.latent, args.rounds, args.batch = 32, 16, 1, [1]

    device = torch.device(args.device)
    kept = args.malloc == "kept" and keep_freed_memory()
    count_cpu_attention()
    auto = resolve_precision("auto", device)
    dtypes = args.dtype or list(dict.fromkeys([auto.name, "fp32"] if auto.name == "bf16" else [auto.name]))
    if args.compile:  # the compiled graph holds the weights of its dtype as constants: one dtype only
        dtypes = dtypes[:1]
    if args.max_autotune:
        import torch._inductor.config as inductor_config

        inductor_config.max_autotune, inductor_config.max_autotune_gemm_backends = True, "CPP,ATEN"
    ours, theirs = build_pair(args.width)
    peaks = matmul_peaks(0.2 if args.dry_run else 1.0) if device.type == "cpu" else {}
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "device": str(device), "width": args.width, "latent": args.latent, "ldmtool_compiled": args.compile,
            **({"inductor_max_autotune": True} if args.max_autotune else {}),
            "malloc": "kept" if kept else "system", **peaks}
    emit({"bench": "unet_step", "auto_precision": auto.name, "auto_reason": auto.reason, **meta})
    best: dict[tuple[str, str, int], tuple[float, ...]] = {}
    flops: dict[int, int] = {}
    for name in dtypes:
        ours.to(device, DTYPES[name]), theirs.to(device, DTYPES[name])  # shared tensors: converts both at once
        if args.compile:
            compile_network(ours, DTYPES[name])
        for batch in args.batch:
            summary, diff, flops[batch], first_call_s = time_pair(ours, theirs, batch, DTYPES[name], device,
                                                                     args.rounds, args.latent)
            for impl, values in summary.items():
                best[impl, name, batch] = values
                emit({"bench": "unet_step", "impl": impl, "dtype": name, "batch": batch,
                      **({"first_call_s": round(first_call_s, 1)} if impl == "ldmtool" else {}),
                      "wall_s": round(values[0], 3), "wall_min_s": round(values[1], 3), "cpu_s": round(values[2], 3),
                      "page_faults": int(values[3]), "kernel_cpu_s": round(values[4], 3), "max_abs_diff": diff, **meta})
    peak_gflops = max([v for k, v in peaks.items() if k.endswith("_gflops")], default=0.0)
    for batch in args.batch:
        ours_name = auto.name if auto.name in dtypes else dtypes[0]
        ours_s = best["ldmtool", ours_name, batch]
        theirs_name = min((n for n in dtypes), key=lambda n: best["diffusers", n, batch][1])
        theirs_s = best["diffusers", theirs_name, batch]
        achieved = flops[batch] / ours_s[1] / 1e9
        emit({"bench": "unet_step", "batch": batch, "ldmtool_dtype": ours_name, "diffusers_best_dtype": theirs_name,
              "ratio_wall": round(ours_s[0] / theirs_s[0], 3), "ratio_wall_min": round(ours_s[1] / theirs_s[1], 3),
              "ratio_cpu": round(ours_s[2] / theirs_s[2], 3), "gflop_per_step": round(flops[batch] / 1e9, 1),
              "ldmtool_gflops": round(achieved, 1),
              "fraction_of_best_matmul_peak": round(achieved / peak_gflops, 3) if peak_gflops else None, **meta})
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    emit({"bench": "unet_step", "peak_rss_gib": round(peak_gib, 2), **meta})


def time_pair(ours, theirs, batch: int, dtype: torch.dtype, device: torch.device, rounds: int, latent: int):
    """{impl: (median wall, min wall, median CPU seconds, median page faults, median kernel CPU seconds)}, their largest output difference, the FLOPs of
    one step (counted during the warm-up call), and the seconds of ldmtool's first call (with --compile: the
    compilation)."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 4, latent, latent, generator=gen).to(device, dtype)
    t = torch.full((batch,), 500, device=device)
    context = torch.randn(batch, 77, 768, generator=gen).to(device, dtype)
    runs = {
        "ldmtool": lambda: ours(x, t, context),
        "diffusers": lambda: theirs(x, t, encoder_hidden_states=context).sample,
    }
    times: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in runs}
    with torch.inference_mode():
        first = time.perf_counter()
        mine = runs["ldmtool"]()  # the warm-up; a compiled network compiles here, for this batch's shape
        first_call_s = time.perf_counter() - first
        with FlopCounterMode(display=False) as counter:
            ours.forward(x, t, context)  # eager (`forward` bypasses a compiled `__call__`): the same products
        diff = (mine - runs["diffusers"]()).abs().max().item()
        for _ in range(rounds):
            for name, fn in runs.items():  # alternate, so background load hits both alike
                times[name].append(time_once(fn, device))
    summary = {}
    for name, values in times.items():
        walls, cpus, faults, kernel = ([v[i] for v in values] for i in range(4))
        summary[name] = (statistics.median(walls), min(walls), statistics.median(cpus), statistics.median(faults),
                         statistics.median(kernel))
    return summary, diff, counter.get_total_flops(), first_call_s


if __name__ == "__main__":
    main()
