"""CPU attention time against head size at the SD 1.5 UNet's largest attention (issue 17), as JSON lines.

SD 1.5 at 512x512 attends over 4096 tokens with 8 heads of 40 channels; at batch 2 that one shape takes
about a third of a compiled UNet step on a 2-core Xeon. This times `scaled_dot_product_attention` (the CPU
flash kernel) at that shape for several head sizes, fp32 and bf16: if the time barely moves with the head
size, the kernel's per-score work (scaling, max, exp, sum: `heads x tokens x tokens` of it) sets the pace,
not its products, and padding the heads or regrouping them cannot help. Also timed: the head padded to 48
and 64 channels (zeros, same result), and the same product computed plainly in query chunks.

    python benchmarks/attention_heads.py
    python benchmarks/attention_heads.py --tokens 1024 --dry-run
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine  # noqa: E402


def best_seconds(fn, rounds: int) -> float:
    fn()
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def padded(q, k, v, size: int):
    pad = (0, size - q.shape[-1])
    out = F.scaled_dot_product_attention(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), scale=q.shape[-1] ** -0.5)
    return out[..., : q.shape[-1]]


def chunked(q, k, v, rows: int = 1024):
    out = torch.empty_like(q)
    keys = k.transpose(-1, -2) * q.shape[-1] ** -0.5
    for start in range(0, q.shape[-2], rows):
        out[..., start : start + rows, :] = torch.matmul(torch.matmul(q[..., start : start + rows, :], keys).softmax(-1), v)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="256 tokens, one round")
    args = parser.parse_args()
    if args.dry_run:
        args.tokens, args.rounds = 256, 1
    emit({"bench": "attention_heads", **machine(), "threads": torch.get_num_threads(), "tokens": args.tokens,
          "heads": args.heads, "batch": args.batch})
    shape = (args.batch, args.heads, args.tokens)
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            for head in (8, 16, 40, 64, 128):
                q, k, v = (torch.randn(*shape, head, dtype=dtype) for _ in range(3))
                seconds = best_seconds(lambda: F.scaled_dot_product_attention(q, k, v), args.rounds)
                flops = 4 * args.batch * args.heads * args.tokens**2 * head
                emit({"bench": "attention_heads", "dtype": str(dtype).split(".")[-1], "head": head, "how": "sdpa",
                      "ms": round(seconds * 1e3, 1), "tflops": round(flops / seconds / 1e12, 3)})
            q, k, v = (torch.randn(*shape, 40, dtype=dtype) for _ in range(3))
            reference = F.scaled_dot_product_attention(q, k, v).float()
            for how, fn in (("pad48", lambda: padded(q, k, v, 48)), ("pad64", lambda: padded(q, k, v, 64)),
                            ("chunked", lambda: chunked(q, k, v))):
                seconds = best_seconds(fn, args.rounds)
                emit({"bench": "attention_heads", "dtype": str(dtype).split(".")[-1], "head": 40, "how": how,
                      "ms": round(seconds * 1e3, 1), "max_abs_diff": float((fn().float() - reference).abs().max())})


if __name__ == "__main__":
    main()
