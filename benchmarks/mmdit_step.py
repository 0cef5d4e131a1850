"""SD3 / SD3.5 MMDiT step time on this machine (issue 24): a full-size preset's transformer with random
weights, one velocity evaluation per precision, as JSON lines; with --diffusers, diffusers'
SD3Transformer2DModel on the same weights (converted by diffusers' single-file converter) beside it.

The network is built on the meta device and materialised directly in each precision (sd3.5-medium: ~9.9 GB
in fp32, ~4.9 GB in bf16; twice that with --diffusers), then times `model(x, t, y=pooled, context=tokens)`
on one latent of `--latent` pixels a side (64: a 512x512 image, 1024 image tokens; 128 is the native
1024x1024) with 333 text tokens (77 CLIP + 256 T5, as the reference pads) and batch 1 (a guided step is two
rows). Each line has wall seconds (median and min over --rounds), CPU seconds of this process (median), the
process's peak RSS after building the network and after the calls, and the load average at the end.

    python benchmarks/mmdit_step.py                                   # sd3.5-medium, fp32 and bf16, latent 64
    python benchmarks/mmdit_step.py --preset sd3-medium --dtypes bf16 --diffusers
    python benchmarks/mmdit_step.py --dry-run                         # a tiny MMDiT, with diffusers: checks the script
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MIB, emit, machine, peak_rss  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TEXT_TOKENS = 77 + 256


def build_mmdit(preset: str, dtype: Any, tiny: bool) -> Any:
    """The preset's MMDiT, its weights drawn uniformly in [-0.02, 0.02] straight in `dtype`."""
    import torch

    from ldmtool.nets.mmdit import MMDiT, MMDiTConfig
    from ldmtool.nets.sd3_files import SD3_PRESETS

    config = (MMDiTConfig(depth=2, pos_embed_max_size=16, adm_in_channels=32, context_in_channels=32,
                          qk_norm=True, dual_attention_layers=(0,)) if tiny else SD3_PRESETS[preset])
    with torch.device("meta"):
        model = MMDiT(config)
    model = model.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.empty(tensor.shape).uniform_(-0.02, 0.02, generator=generator))
    return model.eval().requires_grad_(False)


def diffusers_twin(model: Any) -> Any:
    """diffusers' SD3Transformer2DModel holding `model`'s weights (test-only dependency)."""
    import torch
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    config = model.config
    with torch.device("meta"):
        twin = SD3Transformer2DModel(
            patch_size=config.patch_size, in_channels=config.in_channels, num_layers=config.depth,
            attention_head_dim=64, num_attention_heads=config.depth, joint_attention_dim=config.context_in_channels,
            caption_projection_dim=config.hidden_size, pooled_projection_dim=config.adm_in_channels,
            out_channels=config.out_channels, pos_embed_max_size=config.pos_embed_max_size,
            dual_attention_layers=config.dual_attention_layers, qk_norm="rms_norm" if config.qk_norm else None)
    state = convert_sd3_transformer_checkpoint_to_diffusers(dict(model.state_dict()))
    twin.load_state_dict(state, strict=True, assign=True)
    return twin.eval().requires_grad_(False)


def inputs(model: Any, dtype: Any, latent: int) -> tuple[Any, Any, Any, Any]:
    import torch

    config = model.config
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, config.in_channels, latent, latent, generator=generator).to(dtype)
    pooled = torch.randn(1, config.adm_in_channels, generator=generator).to(dtype)
    context = torch.randn(1, TEXT_TOKENS, config.context_in_channels, generator=generator).to(dtype)
    return x, torch.tensor([500.0]), pooled, context


def time_calls(call: Callable[[], Any], rounds: int, label: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    import torch

    walls, cpus = [], []
    with torch.inference_mode():
        for _ in range(rounds):
            wall, cpu = time.perf_counter(), time.process_time()
            out = call()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            emit({"bench": "mmdit_step", **label, "round": len(walls), "wall_s": round(walls[-1], 2),
                  "cpu_s": round(cpus[-1], 2)})
    assert torch.isfinite(out.float()).all()
    return {"wall_s_median": round(statistics.median(walls), 2), "wall_s_min": round(min(walls), 2),
            "cpu_s_median": round(statistics.median(cpus), 2)}, out


def measure(name: str, preset: str, tiny: bool, latent: int, rounds: int, with_diffusers: bool) -> None:
    """One precision: build, time ours, then (optionally) diffusers' twin on the same weights and inputs."""
    import torch

    dtype = getattr(torch, DTYPES[name])
    start = time.perf_counter()
    model = build_mmdit(preset, dtype, tiny)
    parameters = sum(t.numel() for t in model.state_dict().values())
    built = round(time.perf_counter() - start, 1)
    peak_after_build = round(peak_rss() / MIB, 1)
    x, t, pooled, context = inputs(model, dtype, latent)
    ours, out = time_calls(lambda: model(x, t, y=pooled, context=context), rounds, {"net": "ldmtool", "dtype": name})
    emit({"bench": "mmdit_step", "net": "ldmtool", "dtype": name, "parameters": parameters, "build_s": built,
          **ours, "peak_rss_after_build_mib": peak_after_build, "peak_rss_mib": round(peak_rss() / MIB, 1),
          "loadavg_1m": round(os.getloadavg()[0], 2)})
    if not with_diffusers:
        return
    twin = diffusers_twin(model)
    theirs, want = time_calls(lambda: twin(hidden_states=x, timestep=t, pooled_projections=pooled,
                                           encoder_hidden_states=context).sample,
                              rounds, {"net": "diffusers", "dtype": name})
    difference = ((out.float() - want.float()).abs().max() / want.float().abs().max()).item()
    emit({"bench": "mmdit_step", "net": "diffusers", "dtype": name, **theirs,
          "max_relative_difference": float(f"{difference:.3g}"), "peak_rss_mib": round(peak_rss() / MIB, 1)})


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["sd3-medium", "sd3.5-medium", "sd3.5-large"], default="sd3.5-medium")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--latent", type=int, default=64, help="latent side in pixels (image side / 8)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--diffusers", action="store_true", help="also time diffusers on the same weights")
    parser.add_argument("--dry-run", action="store_true", help="a tiny MMDiT, one round, with diffusers")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    import torch

    latent, rounds = (8, 1) if args.dry_run else (args.latent, args.rounds)
    with_diffusers = args.diffusers or args.dry_run
    emit({"bench": "mmdit_step", "machine": machine(), "preset": "tiny" if args.dry_run else args.preset,
          "latent": latent, "image_side": latent * 8, "image_tokens": (latent // 2) ** 2, "text_tokens": TEXT_TOKENS,
          "batch": 1, "rounds": rounds, "torch_threads": torch.get_num_threads()})
    for name in args.dtypes:
        measure(name, args.preset, args.dry_run, latent, rounds, with_diffusers)


if __name__ == "__main__":
    main()
