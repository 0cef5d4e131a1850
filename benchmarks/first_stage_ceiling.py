"""How far a latent super-resolution model can get past bicubic with a given first stage (issue 28).

A latent SR model predicts the latent of the high-res image and its first stage decodes it; with
`--consistency` the output is then back-projected onto the input. So the best any such model could do is
the first stage's own reconstruction of the true image, back-projected onto the low-res input ("ae + bp"):
a model that predicted the true latent exactly would score that. The gap between this ceiling and bicubic
is all the room a better UNet has; the gap between the model and the ceiling is what it leaves.
It measured +1.29 dB for the shipped KL f4 first stage (2026-12-07), which is why default-superres now
runs on the lossless patch first stage (`--first-stage patch:4`), whose ceiling is the truth itself.

On the same held-out sets and 256² crops as `quality.py` (area-downscaled x4), per set and together: PSNR
(RGB, no border crop) of bicubic, bicubic + back-projection, the first stage's reconstruction (the
posterior mean decoded), and that reconstruction back-projected. fp32, CPU.

    python benchmarks/first_stage_ceiling.py                         # the shared KL f4 (default-txt2img's)
    python benchmarks/first_stage_ceiling.py --model runs/ae         # an autoencoder run folder (its YAML)
    python benchmarks/first_stage_ceiling.py --dry-run               # corpus centre crops only
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from quality import CORPUS_SET, SR_SCALE, default_eval_sets, eval_sets, psnr  # noqa: E402

METHODS = ("bicubic", "bicubic+bp", "ae", "ae+bp")


def reconstruct(model: Any, image: np.ndarray) -> np.ndarray:
    """The first stage's decode of the posterior mean of `image` (H, W, 3) uint8."""
    import torch

    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.inference_mode():
        moments = model.quant_conv(model.encoder(x))
        rec = model.decode(moments[:, : moments.shape[1] // 2])
    return ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def outputs(model: Any, truth: np.ndarray) -> dict[str, np.ndarray]:
    from ldmtool.pipelines.consistency import back_project_

    size = (truth.shape[1] // SR_SCALE, truth.shape[0] // SR_SCALE)
    low = cv2.resize(truth, size, interpolation=cv2.INTER_AREA)
    bicubic = cv2.resize(low, truth.shape[1::-1], interpolation=cv2.INTER_CUBIC)
    rec = reconstruct(model, truth)
    return {"bicubic": bicubic, "bicubic+bp": back_project_(bicubic.copy(), low),
            "ae": rec, "ae+bp": back_project_(rec.copy(), low)}


def measure(model: Any, sets: dict[str, list[Any]], emit: Callable[[dict[str, Any]], None]) -> None:
    everything: dict[str, list[float]] = {m: [] for m in METHODS}
    for name, crops in sets.items():
        scores: dict[str, list[float]] = {m: [] for m in METHODS}
        for crop in crops:
            for method, image in outputs(model, crop.image).items():
                scores[method].append(psnr(crop.image, image))
        for method in METHODS:
            everything[method] += scores[method]
        emit(record(name, scores))
    if len(sets) > 1:
        emit(record("all", everything))


def record(name: str, scores: dict[str, list[float]]) -> dict[str, Any]:
    means = {method: round(float(np.mean(values)), 2) for method, values in scores.items()}
    return {"bench": "first_stage_ceiling", "set": name, "crops": len(scores["bicubic"]), "psnr": means,
            "room_over_bicubic_db": round(means["ae+bp"] - means["bicubic"], 2)}


def load_first_stage(name: str) -> Any:
    from ldmtool.train.diffusion_parts import load_first_stage as load

    return load(Path(name), "cpu").model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default-txt2img",
                        help="shipped default name (its first stage) or autoencoder run folder / file with YAML")
    parser.add_argument("--eval-data", nargs="+", help="held-out sets as quality.py (default: as quality.py)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="centre crops only")
    parser.add_argument("--dry-run", action="store_true", help="corpus centre crops only: checks the script")
    args = parser.parse_args(argv)
    specs = [CORPUS_SET] if args.dry_run else (args.eval_data or default_eval_sets())
    print(json.dumps({"bench": "first_stage_ceiling", "machine": machine(), "model": args.model, "sets": specs}),
          flush=True)
    sets = eval_sets(specs, args.size, args.quick or args.dry_run)
    measure(load_first_stage(args.model), sets, lambda r: print(json.dumps(r), flush=True))


if __name__ == "__main__":
    main()
