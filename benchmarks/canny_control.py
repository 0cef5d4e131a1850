"""How well the shipped default-canny ControlNet follows its hint (issue 25): edge overlap on held-out scenes.

For each captioned shape scene (a seed stream no training run draws), its canny hint is made by the same
preprocessor as `ldmtool preprocess canny`; `txt2img` runs with the scene's caption and seed once with
`--controlnet default-canny --control-image HINT` and once without. The score of an output is the IoU of its
canny edges with the hint's, each widened by 2 pixels. One JSON line per scene, then the means.

    python benchmarks/canny_control.py                      # 8 scenes, the default 50 DDIM steps
    python benchmarks/canny_control.py --scenes 3 --steps 10
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from _common import emit, machine
from ldmtool.cli.app import main as ldmtool
from ldmtool.pipelines.preprocess import PreprocessSettings, canny, edge_agreement
from ldmtool.runtime.seeds import derive_seed
from ldmtool.train.procedural import shape_scene


def run(args: list[str]) -> None:
    try:
        ldmtool(args)
    except SystemExit as exit_info:
        if exit_info.code not in (0, None):
            raise


def score(folder: Path, index: int, steps: int) -> dict:
    scene, caption = shape_scene(derive_seed(13, f"canny-bench/{index}"), 64)
    hint = canny(scene, PreprocessSettings(), 0)
    Image.fromarray(hint).save(folder / f"hint{index}.png")
    common = ["txt2img", "--prompt", caption, "--steps", str(steps), "--seed", str(index), "--quiet"]
    run([*common, "--controlnet", "default-canny", "--control-image", str(folder / f"hint{index}.png"),
         "-o", str(folder / f"controlled{index}.png")])
    run([*common, "-o", str(folder / f"plain{index}.png")])
    scores = {name: edge_agreement(np.asarray(Image.open(folder / f"{name}{index}.png").convert("RGB")), hint[..., 0] > 0)
              for name in ("controlled", "plain")}
    return {"scene": index, "caption": caption, **{k: round(v, 3) for k, v in scores.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ldm-canny-") as tmp:
        rows = []
        for index in range(args.scenes):
            rows.append(score(Path(tmp), index, args.steps))
            emit(rows[-1])
    emit({"steps": args.steps, "scenes": args.scenes, **machine(),
          "controlled_mean": round(float(np.mean([r["controlled"] for r in rows])), 3),
          "plain_mean": round(float(np.mean([r["plain"] for r in rows])), 3)})


if __name__ == "__main__":
    main()
