"""bf16 against fp32 on every shipped default and a tiny random SD 1.x model (issue 17), as JSON lines: the
PSNR of each final image computed in bf16 against the same command's fp32 image (same seed, same inputs).

Each command runs through the real command line, in this process, once with `--precision fp32` and once in
bf16. On a CPU that computes bf16 natively (AMX, AVX512-BF16) the bf16 run is the real `--precision bf16`.
Elsewhere real bf16 is emulated by oneDNN's reference kernels, about 100x slower than fp32 (measured on an
AMD EPYC with AVX2: one default-superres UNet call 0.2 s fp32, 23 s bf16), so by default it is simulated:
the fp32 run inside `Bf16Rounding`, which rounds every floating-point result of every torch operation to
bf16 inside the networks' forward calls. That is what bf16 kernels deliver (inputs in bf16, fp32
accumulation, results rounded to bf16); the sampler's state stays fp32 in both, as ldmtool keeps it. `--check` compares the simulation with real bf16 on one small UNet call first.

    python benchmarks/precision_quality.py              # every shipped default + tiny SD, README table
    python benchmarks/precision_quality.py --real       # real bf16 even where it is emulated (slow)
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from _common import REPO, emit, machine
from ldmtool.runtime.device import native_cpu_bf16

EXAMPLES = REPO / "examples"
TARGET_DB = 35.0


class Bf16Rounding(TorchDispatchMode):
    """Every float32 result of every torch operation run inside a network's forward (a module of ldmtool.nets
    or transformers) rounded to the nearest bf16, kept as float32: the networks as bf16 kernels compute them,
    the sampler around them in fp32, as ldmtool runs bf16."""

    def __enter__(self):
        self._depth = 0
        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self._enter_network),
                       torch.nn.modules.module.register_module_forward_hook(self._leave_network)]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    @staticmethod
    def _is_network(module: torch.nn.Module) -> bool:
        return type(module).__module__.startswith(("ldmtool.nets", "transformers"))

    def _enter_network(self, module, args):
        self._depth += self._is_network(module)

    def _leave_network(self, module, args, output):
        self._depth -= self._is_network(module)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._depth <= 0 or func.is_view:  # outside the networks; or a view, which holds no new values
            return out
        if func._schema.is_mutable:  # in place (add_, copy_, out=): round what it wrote, where it wrote it
            tree_map(_round_in_place, out)
            return out
        return tree_map(_rounded, out)


def _rounded(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.to(torch.bfloat16).to(torch.float32)
    return value


def _round_in_place(value: Any) -> None:
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        value.copy_(value.to(torch.bfloat16))


def commands(tiny_sd: Path) -> Iterator[tuple[str, list[str]]]:
    """(name, ldmtool arguments without -o/--precision) for each shipped default and the tiny SD model."""
    yield "superres (default-superres)", ["superres", str(EXAMPLES / "photos" / "leaf.png"), "--scale", "4"]
    yield "inpaint (default-inpaint)", ["inpaint", str(EXAMPLES / "inpaint" / "coffee.png"),
                                        str(EXAMPLES / "inpaint" / "coffee_mask.png")]
    yield "semantic2img (default-semantic2img)", ["semantic2img", str(EXAMPLES / "labelmaps" / "landscape.png")]
    yield "layout2img (default-layout2img)", ["layout2img", str(EXAMPLES / "layouts" / "park.json")]
    yield "txt2img (default-txt2img)", ["txt2img", "--prompt", "a red circle left of a blue square"]
    yield "sample (default-sample)", ["sample", "--n", "1"]
    yield "txt2img (tiny random SD 1.x)", ["txt2img", "--prompt", "a red fox", "--model", str(tiny_sd),
                                           "--width", "64", "--height", "64", "--steps", "10"]


def run(args: Sequence[str], output: Path, precision: str, simulate: bool) -> np.ndarray:
    from ldmtool.cli.app import main

    argv = [*args, "--seed", "1", "--precision", precision, "-o", str(output), "--quiet", "--no-gallery"]
    try:
        if simulate:
            with Bf16Rounding():
                main(argv)
        else:
            main(argv)
    except SystemExit as done:
        if done.code:
            raise RuntimeError(f"ldmtool {' '.join(argv)} exited {done.code}") from None
    (image,) = sorted(p for p in output.rglob("*.png") if p.name != "index.html")
    with Image.open(image) as opened:
        return np.asarray(opened.convert("RGB"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def check_simulation() -> dict[str, Any]:
    """One small call of the default-superres UNet: fp32, real bf16 and simulated bf16."""
    from ldmtool.checkpoints.api import load_model

    torch.manual_seed(0)
    x, t = torch.randn(1, 6, 16, 16), torch.tensor([500.0])
    outputs = {}
    with torch.inference_mode():
        for name, dtype, simulate in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
                                      ("simulated", torch.float32, True)):
            unet = load_model("default-superres", dtype=dtype).model.diffusion_model.eval()
            if simulate:
                with Bf16Rounding():
                    outputs[name] = unet(x, t).float()
            else:
                outputs[name] = unet(x.to(dtype), t).float()
    error = {name: float((outputs[name] - outputs["fp32"]).abs().mean()) for name in ("bf16", "simulated")}
    return {"bench": "precision_quality", "check": "unet_call_mean_abs_error_vs_fp32", **error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="real bf16 even where the CPU emulates it (slow)")
    parser.add_argument("--check", action="store_true", help="first compare the simulation with real bf16")
    parser.add_argument("--only", help="run only the commands whose name contains this text")
    args = parser.parse_args()
    native = native_cpu_bf16()
    simulate = native is None and not args.real
    emit({"bench": "precision_quality", "native_bf16": native, "bf16": "simulated" if simulate else "real",
          "isa": torch.backends.cpu.get_cpu_capability(), **machine()})
    if args.check:
        emit(check_simulation())
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        from ldmtool.checkpoints.tiny import save_tiny_checkpoint

        tiny_sd = Path(folder) / "tiny-sd1.safetensors"
        save_tiny_checkpoint(tiny_sd, "sd1", seed=1, with_config=True)
        for name, argv in commands(tiny_sd):
            if args.only and args.only not in name:
                continue
            fp32 = run(argv, Path(folder) / name / "fp32", "fp32", False)
            bf16 = run(argv, Path(folder) / name / "bf16", "fp32" if simulate else "bf16", simulate)
            db = float(psnr(fp32, bf16))
            rows.append((name, db))
            emit({"bench": "precision_quality", "command": name, "psnr_db": round(db, 2),
                  "max_abs_diff": float(np.abs(fp32 - bf16).max()), "target_db": TARGET_DB,
                  "meets_target": db >= TARGET_DB, "bf16": "simulated" if simulate else "real"})
    print("\n| command (model) | bf16 vs fp32 PSNR |\n|---|---|")
    for name, db in rows:
        print(f"| {name} | {db:.1f} dB |")


if __name__ == "__main__":
    main()
