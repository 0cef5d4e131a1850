"""UNet step time, ldmtool vs diffusers on the same weights (issue 8): SD 1.5 architecture, random weights.

Builds our UNet from the SD 1.5 `unet_config`, converts its state dict with diffusers' own single-file
converter and loads it into diffusers' UNet2DConditionModel sharing the same tensors (no second copy of the
weights). Then times one denoising step of each, alternating so that load from other processes hits both
alike, and prints one JSON line per (implementation, batch) plus the ratio ldmtool / diffusers.

    python benchmarks/unet_step.py                 # full size, fp32, 64x64 latent, batch 1 and 2 (~7.5 GB)
    python benchmarks/unet_step.py --width 160     # a cheaper proxy with half the channels
    python benchmarks/unet_step.py --device cuda --dtype bf16 --latent 64

Each JSON line has wall seconds (median and min over --rounds) and CPU seconds of this process (median);
the ratios are ldmtool / diffusers from the same run. On a machine shared with other work the wall times
swing with the load; the CPU-time ratio and the ratio of the fastest runs are the steadier figures.
Our CPU fast path keeps a oneDNN-packed copy of every conv and transformer-linear weight (about +3.2 GiB
for SD 1.5 in fp32), which the peak RSS line includes (~7.5 GiB in all).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch

from ldmtool.nets.unet import UNetModel

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


def time_once(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). On a shared machine the CPU time is the steadier measure
    of work done; the wall time is what a user waits."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=320, help="model_channels (320 = SD 1.5)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 images)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per implementation and batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ours, theirs = build_pair(args.width)
    ours.to(device, dtype), theirs.to(device, dtype)  # shared tensors: converts both at once
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "device": str(device), "width": args.width, "latent": args.latent, "dtype": args.dtype}
    for batch in args.batch:
        gen = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 4, args.latent, args.latent, generator=gen).to(device, dtype)
        t = torch.full((batch,), 500, device=device)
        context = torch.randn(batch, 77, 768, generator=gen).to(device, dtype)
        runs = {
            "ldmtool": lambda: ours(x, t, context),
            "diffusers": lambda: theirs(x, t, encoder_hidden_states=context).sample,
        }
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        with torch.inference_mode():
            diff = (runs["ldmtool"]() - runs["diffusers"]()).abs().max().item()  # also the warm-up
            for _ in range(args.rounds):
                for name, fn in runs.items():  # alternate, so background load hits both alike
                    times[name].append(time_once(fn, device))
        summary = {}
        for name, values in times.items():
            walls, cpus = [v[0] for v in values], [v[1] for v in values]
            summary[name] = (statistics.median(walls), min(walls), statistics.median(cpus))
            print(json.dumps({"bench": "unet_step", "impl": name, "batch": batch,
                              "wall_s": round(summary[name][0], 3), "wall_min_s": round(summary[name][1], 3),
                              "cpu_s": round(summary[name][2], 3), "runs_wall_s": [round(w, 3) for w in walls],
                              **meta}), flush=True)
        ours_s, theirs_s = summary["ldmtool"], summary["diffusers"]
        print(json.dumps({"bench": "unet_step", "batch": batch,
                          "ratio_wall": round(ours_s[0] / theirs_s[0], 3),
                          "ratio_wall_min": round(ours_s[1] / theirs_s[1], 3),
                          "ratio_cpu": round(ours_s[2] / theirs_s[2], 3),
                          "max_abs_diff": diff, **meta}), flush=True)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"bench": "unet_step", "peak_rss_gib": round(peak_gib, 2), **meta}), flush=True)


if __name__ == "__main__":
    main()
