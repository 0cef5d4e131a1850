"""Few-step sampling cost (issue 25): 4-step LCM with --cfg 1 vs 25-step DPM++ 2M with guidance, same UNet.

An SD 1.5-architecture UNet (full width, random weights: the cost of a step does not depend on the weights)
samples one 512x512 image's latent (64x64) through the same path pipelines use (`sample_latents` over
`DiscreteDenoiser`, with `CFGDenoiser` for guidance). LCM at cfg 1 makes one UNet call per step (no
unconditional pass); DPM++ 2M with guidance makes two (cond and uncond rows), so the expected ratio of the
work is 4 / 50 = 1/12.5. Text encoding and the VAE decode (the same in both) are left out.

Each run prints one JSON line: UNet calls, wall seconds and CPU seconds of this process; the last line has
the ratios. On a machine shared with other work the CPU-time ratio is the steadier figure; it runs on one
thread by default (`--threads`), since idle OpenMP threads that spin while waiting for a busy core count as
CPU time too.

    python benchmarks/fewstep.py                 # full size (about 2 GB; minutes on 2 cores)
    python benchmarks/fewstep.py --dry-run       # a tiny UNet, seconds (tests/test_benchmarks_smoke.py)
"""
from __future__ import annotations

import argparse
import time

import torch

from _common import emit, machine
from ldmtool.diffusion.cond import Cond, Guided
from ldmtool.diffusion.denoisers import DiscreteDenoiser
from ldmtool.diffusion.guidance import CFGDenoiser
from ldmtool.diffusion.run import SamplerSettings, sample_latents
from ldmtool.diffusion.schedules import alphas_cumprod_from_betas, make_betas
from ldmtool.nets.unet import UNetModel
from ldmtool.runtime.seeds import NoiseSource

SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)
RUNS = (("lcm", 4, 1.0), ("dpmpp_2m", 25, 7.5))  # (sampler, steps, cfg)


class CountingUNet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet, self.calls = unet, 0

    def forward(self, x, timesteps, context=None, y=None):
        self.calls += 1
        return self.unet(x, timesteps, context=context, y=y)


def build_unet(width: int, context_dim: int) -> torch.nn.Module:
    torch.manual_seed(0)
    unet = UNetModel(**dict(SD15_UNET, model_channels=width, context_dim=context_dim)).eval()
    with torch.no_grad():  # the reference zero-initialises output layers; give them values like a real model
        for p in unet.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return unet


def run_once(unet: CountingUNet, latent: int, context_dim: int, sampler: str, steps: int, cfg: float) -> dict:
    alphas_cumprod = alphas_cumprod_from_betas(make_betas("linear", 1000, 0.00085, 0.012))
    denoise = DiscreteDenoiser(unet, alphas_cumprod, "eps", "crossattn")
    g = torch.Generator().manual_seed(1)
    cond, uncond = (Cond(crossattn=torch.randn(1, 77, context_dim, generator=g)) for _ in range(2))
    guided = cfg != 1
    unet.calls = 0
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        z = sample_latents(CFGDenoiser(denoise) if guided else denoise, Guided(cond, uncond, cfg) if guided else cond,
                           alphas_cumprod, NoiseSource([7]), SamplerSettings(sampler=sampler, steps=steps),
                           shape=(4, latent, latent))
    record = {"sampler": sampler, "steps": steps, "cfg": cfg, "unet_calls": unet.calls,
              "wall_seconds": round(time.perf_counter() - wall, 3), "cpu_seconds": round(time.process_time() - cpu, 3),
              "finite": bool(torch.isfinite(z).all())}
    emit(record)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=320, help="model_channels (320 = SD 1.5)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 images)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--dry-run", action="store_true", help="a tiny UNet (width 32, 16x16 latent)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    width, latent, context_dim = (32, 16, 64) if args.dry_run else (args.width, args.latent, 768)
    emit({**machine(), "threads": torch.get_num_threads(), "width": width, "latent": latent, "dtype": "fp32"})
    unet = CountingUNet(build_unet(width, context_dim))
    few, many = (run_once(unet, latent, context_dim, *run) for run in RUNS)
    emit({"summary": True, "ratio_cpu": round(few["cpu_seconds"] / many["cpu_seconds"], 4),
          "ratio_wall": round(few["wall_seconds"] / many["wall_seconds"], 4),
          "ratio_unet_calls": round(few["unet_calls"] / many["unet_calls"], 4)})


if __name__ == "__main__":
    main()
