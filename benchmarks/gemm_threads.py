"""Do matrix products give the same result on 1 and 2 threads? One JSON line per precision (issues 15 and 17).

Multiplies random matrices of the UNet's sizes (tokens x channels, both orientations) in fp32 and bf16 on 1
and on 2 threads and counts the shapes whose results differ by a bit. Run it as it is (ldmtool's
`MKL_CBWR=AUTO,STRICT` applies: importing ldmtool sets it), and with `--mkl-default` to see what MKL does
without it. fp32 products go to Intel MKL, bf16 ones to oneDNN, which has no such mode.

    python benchmarks/gemm_threads.py
    python benchmarks/gemm_threads.py --mkl-default
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

ROWS = (64, 256, 1024, 4096)
INNER = (320, 640, 960, 1280, 1920, 2560)
COLUMNS = (320, 640, 1280, 2560)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mkl-default", action="store_true", help="leave MKL_CBWR unset (MKL's own choice)")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()
    if args.mkl_default:
        os.environ.pop("MKL_CBWR", None)
        import torch

        torch.ones(2, 2) @ torch.ones(2, 2)  # MKL reads MKL_CBWR at its first call: before ldmtool can set it
        mode = None
    else:
        import torch

        import ldmtool  # noqa: F401 - sets MKL_CBWR before MKL's first call

        mode = os.environ.get("MKL_CBWR")
    from _common import emit, machine

    for name in args.dtype:
        dtype = torch.float32 if name == "fp32" else torch.bfloat16
        differing = [list(shape) for shape in itertools.product(ROWS, INNER, COLUMNS) if not _same(shape, dtype)]
        emit({"bench": "gemm_threads", "dtype": name, "mkl_cbwr": mode,
              "shapes": len(ROWS) * len(INNER) * len(COLUMNS), "differing": len(differing),
              "differing_shapes_mkn": differing[:40], "torch": torch.__version__, **machine()})


def _same(shape: tuple[int, int, int], dtype) -> bool:
    """Both orientations of an (M, K) x (K, N) product equal on 1 and 2 threads."""
    import torch

    rows, inner, columns = shape
    generator = torch.Generator().manual_seed(rows * 7 + inner * 3 + columns)
    a = torch.randn(rows, inner, generator=generator).to(dtype)
    b = (torch.randn(inner, columns, generator=generator) / inner ** 0.5).to(dtype)
    products = (lambda: a @ b, lambda: b.t() @ a.t())
    with torch.inference_mode():
        for product in products:
            torch.set_num_threads(2)
            two = product()
            torch.set_num_threads(1)
            one = product()
            torch.set_num_threads(2)
            if not torch.equal(one, two):
                return False
    return True


if __name__ == "__main__":
    sys.exit(main())
