"""SDXL UNet step time on this machine (issue 18): the full-size base UNet (2.57 billion parameters) with
random weights, one denoising step per precision, as JSON lines.

The UNet is built on the meta device and materialised directly in each precision (fp32: ~10.3 GB, bf16:
~5.1 GB; one precision at a time), then times `unet(x, t, context, y)` on one latent of `--latent`
pixels a side (128 is SDXL's native 1024x1024; the default 64, 512x512, keeps a CPU run short) with batch 1
(a guided step is two such rows). Each line has wall seconds (median and min over --rounds), CPU seconds
of this process (median) and the process's peak RSS so far.

    python benchmarks/sdxl_unet_step.py                          # fp32 and bf16, 64x64 latent, 2 rounds
    python benchmarks/sdxl_unet_step.py --latent 128 --dtypes bf16
    python benchmarks/sdxl_unet_step.py --dry-run                # a tiny SDXL UNet: checks the script
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MIB, emit, machine, peak_rss  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_unet(dtype: Any, tiny: bool) -> Any:
    """The base preset's UNet, its weights drawn uniformly in [-0.02, 0.02] straight in `dtype`."""
    import torch

    from ldmtool.checkpoints.config import instantiate
    from ldmtool.checkpoints.presets import load_preset
    from ldmtool.checkpoints.tiny import tiny_config

    doc = tiny_config("sdxl-base") if tiny else load_preset("sdxl-base")
    with torch.device("meta"):
        unet = instantiate(doc["model"]["params"]["network_config"])
    unet = unet.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in unet.parameters():
            tensor.copy_(torch.empty(tensor.shape).uniform_(-0.02, 0.02, generator=generator))
    return unet.eval().requires_grad_(False)


def time_steps(unet: Any, dtype: Any, latent: int, rounds: int, name: str = "") -> dict[str, Any]:
    import torch

    params = unet.label_emb[0][0].in_features, unet.input_blocks[0][0].in_channels
    context_dim = unet.middle_block[1].transformer_blocks[0].attn2.to_k.in_features
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, params[1], latent, latent, generator=generator).to(dtype)
    context = torch.randn(1, 77, context_dim, generator=generator).to(dtype)
    y = torch.randn(1, params[0], generator=generator).to(dtype)
    t = torch.tensor([500])
    walls, cpus = [], []
    with torch.inference_mode():
        for _ in range(rounds):
            wall, cpu = time.perf_counter(), time.process_time()
            out = unet(x, t, context, y)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            # each round as it ends: a slow precision on a busy machine still leaves its first figure
            emit({"bench": "sdxl_unet_step", "dtype": name, "round": len(walls), "wall_s": round(walls[-1], 2),
                  "cpu_s": round(cpus[-1], 2)})
    assert torch.isfinite(out.float()).all()
    return {"wall_s_median": round(statistics.median(walls), 2), "wall_s_min": round(min(walls), 2),
            "cpu_s_median": round(statistics.median(cpus), 2)}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--latent", type=int, default=64, help="latent side in pixels (image side / 8)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="a tiny SDXL UNet, one round")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    import torch

    latent, rounds = (16, 1) if args.dry_run else (args.latent, args.rounds)
    emit({"bench": "sdxl_unet_step", "machine": machine(), "tiny": args.dry_run, "latent": latent,
          "image_side": latent * 8, "batch": 1, "rounds": rounds, "torch_threads": torch.get_num_threads()})
    for name in args.dtypes:
        dtype = getattr(torch, DTYPES[name])
        start = time.perf_counter()
        unet = build_unet(dtype, args.dry_run)
        parameters = sum(p.numel() for p in unet.parameters())
        built = round(time.perf_counter() - start, 1)
        emit({"bench": "sdxl_unet_step", "dtype": name, "parameters": parameters, "build_s": built,
              **time_steps(unet, dtype, latent, rounds, name), "peak_rss_mib": round(peak_rss() / MIB, 1)})
        del unet


if __name__ == "__main__":
    main()
