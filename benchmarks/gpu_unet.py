"""GPU UNet benchmark (issue 8): SD 1.5-architecture UNet at 512x512 (64x64 latent), one 20-step image with
classifier-free guidance (network batch 2), fp16 and bf16, ldmtool vs diffusers on the same weights, as
JSON lines, with achieved TFLOP/s against the card's dense tensor-core peak.

Weights: our UNet is built directly on the device (random init, zero-initialised output layers filled too,
so no layer is trivially zero), cast to the dtype, and converted with diffusers' own single-file converter
into diffusers' UNet2DConditionModel, which is assigned the SAME tensors (no second copy, identical weights).
The outputs of the two are compared once (max abs difference over the max abs value).

FLOPs are counted analytically once per shape with `torch.utils.flop_counter` on the meta device (the math
attention path, so convolutions, projections and both attention matmuls count; on real devices fused kernels
can hide from the counter). TFLOP/s = FLOPs per step x steps / seconds per image. The peak is looked up from
the device name (dense fp16/bf16 tensor-core figures from the vendors' data sheets) or given by --peak-tflops.

Each variant (dtype x memory layout x compiled or not) times both implementations alternately after warm-up;
`--compile` adds torch.compile variants and `--channels-last` adds channels-last ones, so the summary can keep
them only where they win. Target: ldmtool's time per image <= 1.0x diffusers' in bf16.

    python benchmarks/gpu_unet.py                                  # needs CUDA
    python benchmarks/gpu_unet.py --compile --channels-last
    python benchmarks/gpu_unet.py --dry-run                        # CPU, tiny width and latent: checks the logic
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from _common import matmul_peaks

SD15_UNET = dict(image_size=64, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Dense (no sparsity) fp16/bf16 tensor-core peak TFLOP/s with fp32 accumulation. Checked in order: the more
# specific name first ("H100 PCIe" before "H100", "A100" before "A10", "L40S" before "L4").
PEAK_TFLOPS = [
    ("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
]


@dataclass(frozen=True)
class Variant:
    dtype: str
    channels_last: bool
    compiled: bool

    @property
    def name(self) -> str:
        return "+".join([self.dtype] + ["channels_last"] * self.channels_last + ["compile"] * self.compiled)


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def sig(value: float) -> float:
    """Four significant figures (a dry run's TFLOP/s are tiny, a GPU's are hundreds)."""
    return float(f"{value:.4g}")


def peak_tflops(device: torch.device, override: Optional[float]) -> Optional[float]:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_TFLOPS if key in name), None)


# -- the two networks on the same weights ------------------------------------------------------------


def unet_params(width: int) -> dict[str, Any]:
    return dict(SD15_UNET, model_channels=width)


def build_ours(params: dict[str, Any], device: torch.device, seed: int = 0):
    from ldmtool.nets.unet import UNetModel

    torch.manual_seed(seed)
    with torch.device(device):
        ours = UNetModel(**params).eval().requires_grad_(False)
    with torch.no_grad():  # the reference zero-initialises output layers: give them values like a trained model
        for p in ours.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return ours


def diffusers_twin(ours, params: dict[str, Any]):
    """diffusers' UNet2DConditionModel holding exactly `ours`'s tensors (converted keys, shared storage)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=params["image_size"] * 8)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True, assign=True)
    return theirs.eval().requires_grad_(False)


def count_flops(params: dict[str, Any], batch: int, latent: int) -> int:
    """FLOPs of one UNet forward, counted on the meta device (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldmtool.nets.unet import UNetModel

    with torch.device("meta"):
        model = UNetModel(**params).eval()
        x, t = torch.empty(batch, 4, latent, latent), torch.full((batch,), 500)
        context = torch.empty(batch, 77, params["context_dim"])
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x, t, context)
    return int(counter.get_total_flops())


# -- timing -------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def image_loop(step: Callable, x: torch.Tensor, timesteps: list[torch.Tensor]) -> Callable[[], None]:
    """One image's sampling: `steps` network calls on a changing timestep (the sampler's own math is
    negligible next to the network and is left out so both implementations see identical work)."""
    def run() -> None:
        for t in timesteps:
            step(x, t)
    return run


def time_image(run: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def variant_models(master, params: dict[str, Any], variant: Variant, args: argparse.Namespace) -> dict[str, Any]:
    """This variant's pair: a copy of the fp32 master cast to its dtype (and layout), and diffusers' twin on
    that copy's tensors, so both run identical weights and each cast starts from fp32."""
    ours = copy.deepcopy(master).to(dtype=DTYPES[variant.dtype])
    if variant.channels_last:
        ours = ours.to(memory_format=torch.channels_last)
    theirs = diffusers_twin(ours, params)
    if variant.channels_last:
        theirs = theirs.to(memory_format=torch.channels_last)  # already channels-last tensors: no copy
    models = {"ldmtool": ours, "diffusers": theirs}
    if variant.compiled:
        models = {name: torch.compile(net, mode=args.compile_mode) for name, net in models.items()}
    return models


def first_outputs(steps: dict[str, Callable], x, t, variant: Variant) -> dict[str, torch.Tensor]:
    """One call of each implementation; one that raises is reported and left out of the timing."""
    outputs = {}
    for name, step in steps.items():
        try:
            outputs[name] = step(x, t).float()
        except (RuntimeError, TypeError, ValueError) as err:
            emit({"bench": "gpu_unet", "impl": name, "variant": variant.name,
                  "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
    return outputs


def run_variant(variant: Variant, nets: dict[str, Any], args: argparse.Namespace, device: torch.device,
                flops: int, peak: Optional[float]) -> dict[str, float]:
    """Seconds per image of each implementation that runs in this variant (records emitted as it goes)."""
    dtype = DTYPES[variant.dtype]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.latent, args.latent, generator=gen).to(device, dtype)
    if variant.channels_last:
        x = x.to(memory_format=torch.channels_last)
    context = (torch.randn(args.batch, 77, 768, generator=gen) * 0.5).to(device, dtype)
    timesteps = [torch.full((args.batch,), int(t), device=device) for t in torch.linspace(999, 0, args.steps)]
    steps = {
        "ldmtool": lambda x, t: nets["ldmtool"](x, t, context),
        "diffusers": lambda x, t: nets["diffusers"](x, t, encoder_hidden_states=context).sample,
    }
    with torch.inference_mode():
        outputs = first_outputs(steps, x, timesteps[0], variant)
        steps = {name: step for name, step in steps.items() if name in outputs}
        rel_diff = None
        if len(outputs) == 2:
            scale = outputs["diffusers"].abs().max().item() or 1.0
            rel_diff = (outputs["ldmtool"] - outputs["diffusers"]).abs().max().item() / scale
        memory = {name: warm_up(step, x, timesteps[0], args.warmup, device) for name, step in steps.items()}
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.repeat):  # alternate so drifting clocks or neighbours hit both alike
            for name, step in steps.items():
                times[name].append(time_image(image_loop(step, x, timesteps), device))
    results = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        tflops = flops * args.steps / results[name] / 1e12
        emit({"bench": "gpu_unet", "impl": name, "variant": variant.name, "dtype": variant.dtype,
              "channels_last": variant.channels_last, "compiled": variant.compiled,
              "seconds_per_image": round(results[name], 4), "ms_per_step": round(1000 * results[name] / args.steps, 3),
              "runs": [round(v, 4) for v in values], "tflops": sig(tflops),
              "fraction_of_peak": sig(tflops / peak) if peak else None,
              "peak_memory_gib": round(memory[name] / 2**30, 3) if memory[name] is not None else None,
              "finite": bool(torch.isfinite(outputs[name]).all()),
              **({"max_rel_diff_vs_diffusers": rel_diff} if name == "ldmtool" else {})})
    if len(results) == 2:
        emit({"bench": "gpu_unet", "variant": variant.name,
              "ratio_ldmtool_over_diffusers": round(results["ldmtool"] / results["diffusers"], 4)})
    return results


def warm_up(step: Callable, x, t, calls: int, device: torch.device) -> Optional[int]:
    """Warm-up calls (compilation, cuDNN autotuning); returns the peak device memory they needed (CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(calls):
        step(x, t)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def variants(args: argparse.Namespace) -> list[Variant]:
    layouts = [False, True] if args.channels_last else [False]
    compiled = [False, True] if args.compile else [False]
    return [Variant(d, c, k) for d, c, k in itertools.product(args.dtypes, layouts, compiled)]


def summarise(all_results: dict[Variant, dict[str, float]], flops: int, steps: int, peak: Optional[float]) -> None:
    """Per dtype: the fastest variant of each implementation (so compile / channels-last are kept only where
    they win) and the ratio of the two bests."""
    for dtype in sorted({v.dtype for v in all_results}):
        best = {}
        for impl in ("ldmtool", "diffusers"):
            timed = [(v, r[impl]) for v, r in all_results.items() if v.dtype == dtype and impl in r]
            if not timed:
                continue
            variant, seconds = min(timed, key=lambda p: p[1])
            tflops = flops * steps / seconds / 1e12
            best[impl] = {"variant": variant.name, "seconds_per_image": round(seconds, 4), "tflops": sig(tflops),
                          "fraction_of_peak": sig(tflops / peak) if peak else None}
        record: dict[str, Any] = {"bench": "gpu_unet", "summary": True, "dtype": dtype, "best": best}
        if len(best) == 2:
            ratio = best["ldmtool"]["seconds_per_image"] / best["diffusers"]["seconds_per_image"]
            record["ratio_best_ldmtool_over_best_diffusers"] = round(ratio, 4)
            if dtype == "bf16":
                record.update(target=1.0, ok=ratio <= 1.0)
        emit(record)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None, help="default: fp16 bf16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2, help="network batch: 2 = one image with guidance")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 images)")
    parser.add_argument("--width", type=int, default=320, help="model_channels (320 = SD 1.5)")
    parser.add_argument("--warmup", type=int, default=3, help="network calls before timing, per variant")
    parser.add_argument("--repeat", type=int, default=3, help="timed images per implementation and variant")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: its default)")
    parser.add_argument("--channels-last", action="store_true", help="also time channels-last variants")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense fp16/bf16 peak, if not in the table")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU at width 32, latent 16, 2 steps, fp32 and bf16: checks the logic")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device = args.device or "cpu"
        args.width, args.latent, args.steps, args.warmup, args.repeat = 32, 16, 2, 1, 1
        args.dtypes = args.dtypes or ["fp32", "bf16"]
    args.dtypes = args.dtypes or ["fp16", "bf16"]
    args.device = args.device or "cuda"
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_unet: no CUDA device here; run it on a GPU machine, or use --dry-run on the CPU")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    params = unet_params(args.width)
    master = build_ours(params, device)
    flops = count_flops(params, args.batch, args.latent)
    peak = peak_tflops(device, args.peak_tflops)
    emit({"bench": "gpu_unet", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
          "torch": torch.__version__, "cuda": torch.version.cuda, "width": args.width, "latent": args.latent,
          "batch": args.batch, "steps": args.steps, "gflops_per_step": round(flops / 1e9, 2),
          "peak_tflops": peak, "dry_run": args.dry_run, "host": matmul_peaks(0.2)})
    all_results = {}
    for variant in variants(args):
        nets = variant_models(master, params, variant, args)
        all_results[variant] = run_variant(variant, nets, args, device, flops, peak)
        del nets
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summarise(all_results, flops, args.steps, peak)


if __name__ == "__main__":
    main()
