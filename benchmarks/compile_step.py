"""torch.compile against eager for one UNet step (issue 17's "compiled fast path"), as JSON lines.

Builds ldmtool's UNet at SD 1.5 size (random weights, as `unet_step.py`), in the precision `--precision auto`
picks here (or `--dtype`), and times one eager step, then the network as `--compile` runs it
(`ldmtool.nets.compiled.compile_network`: inductor, frozen and prepacked oneDNN weights, activations whole):
the compile time (its first call) and the compiled steps, with the largest difference from the eager output.

    python benchmarks/compile_step.py                   # SD 1.5 width, batch 2, 64² latent (compiles for minutes)
    python benchmarks/compile_step.py --width 64 --latent 16 --batch 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import emit, machine, matmul_peaks
from ldmtool.nets.compiled import compile_network
from ldmtool.runtime.device import resolve_precision
from unet_step import DTYPES, build_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: what --precision auto picks here")
    args = parser.parse_args()

    name = args.dtype or resolve_precision("auto", torch.device("cpu")).name
    dtype = DTYPES[name]
    ours, _ = build_pair(args.width)
    ours = ours.to(dtype).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.latent, args.latent, generator=generator).to(dtype)
    t = torch.full((args.batch,), 500)
    context = torch.randn(args.batch, 77, 768, generator=generator).to(dtype)
    meta = {"bench": "compile_step", "dtype": name, "width": args.width, "latent": args.latent, "batch": args.batch,
            "torch": torch.__version__, **machine(), **matmul_peaks(0.3)}
    with torch.inference_mode():
        eager = _times(lambda: ours(x, t, context), args.rounds)
        reference = ours(x, t, context)
        compiled = compile_network(ours, dtype)
        start = time.perf_counter()
        out = compiled(x, t, context)
        compile_s = time.perf_counter() - start
        steps = _times(lambda: compiled(x, t, context), args.rounds)
    emit({**meta, "eager_step_s": round(statistics.median(eager), 3), "compile_s": round(compile_s, 1),
          "compiled_step_s": round(statistics.median(steps), 3),
          "compiled_over_eager": round(statistics.median(steps) / statistics.median(eager), 3),
          "max_abs_diff": (out.float() - reference.float()).abs().max().item(),
          "output_abs_max": reference.float().abs().max().item()})


def _times(step, rounds: int) -> list[float]:
    step()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    main()
