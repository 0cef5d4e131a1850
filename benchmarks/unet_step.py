"""UNet step time, ldmtool vs diffusers on the same weights (issue 8): SD 1.5 architecture, random weights.

Builds our UNet from the SD 1.5 `unet_config`, converts its state dict with diffusers' own single-file
converter and loads it into diffusers' UNet2DConditionModel sharing the same tensors (no second copy of the
weights). Then times one denoising step of each, alternating so that load from other processes hits both
alike, and prints one JSON line per (implementation, batch) plus the ratio ldmtool / diffusers.

    python benchmarks/unet_step.py                 # full size, fp32, 64x64 latent, batch 1 and 2 (~3.5 GB)
    python benchmarks/unet_step.py --width 160     # a cheaper proxy with half the channels
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from ldmtool.nets.unet import UNetModel

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


def time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=320, help="model_channels (320 = SD 1.5)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 images)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per implementation and batch")
    args = parser.parse_args()

    ours, theirs = build_pair(args.width)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "width": args.width, "latent": args.latent, "dtype": "fp32"}
    for batch in args.batch:
        gen = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 4, args.latent, args.latent, generator=gen)
        t = torch.full((batch,), 500)
        context = torch.randn(batch, 77, 768, generator=gen)
        runs = {
            "ldmtool": lambda: ours(x, t, context),
            "diffusers": lambda: theirs(x, t, encoder_hidden_states=context).sample,
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        with torch.inference_mode():
            diff = (runs["ldmtool"]() - runs["diffusers"]()).abs().max().item()  # also the warm-up
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    times[name].append(time_once(fn))
        for name, values in times.items():
            print(json.dumps({"bench": "unet_step", "impl": name, "batch": batch, "median_s": round(statistics.median(values), 4),
                              "min_s": round(min(values), 4), "runs": [round(v, 4) for v in values], **meta}), flush=True)
        ratio = statistics.median(times["ldmtool"]) / statistics.median(times["diffusers"])
        print(json.dumps({"bench": "unet_step", "batch": batch, "ratio_ldmtool_over_diffusers": round(ratio, 3),
                          "max_abs_diff": diff, **meta}), flush=True)


if __name__ == "__main__":
    main()
