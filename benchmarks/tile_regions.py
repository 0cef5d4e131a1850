"""Tile-region consistency (issue 20): does the texture or colour of an output change where tiles meet?

A seam is a sharp line; a *region change* is subtler: one tile's content drifts (a sky that turns from clean
blue to grey and blotchy past x≈680) and the blend only softens the step. The metric compares local
statistics in strips either side of every blend zone of the tile plan (where two tiles' weights cross)
against the same comparison at lines elsewhere in the image:

    features of a strip, per block of rows: mean R, G, B and texture (mean |Laplacian| of the grey image)
    change(line) = mean over row blocks of the L1 distance between the left and right strips' features
    ratio = mean change at the tile blend zones / median change at lines away from every zone

About 1 means the tile boundaries look like anywhere else; a region change along a boundary gives well
above 1. Both axes are scanned (vertical lines, then the transposed image for horizontal ones). Each run
records the tile plan it used (`TiledDenoiser.plan`, the largest canvas), so the lines are the real ones.

    python benchmarks/tile_regions.py                        # tile-synth, superres, img2img --scale: defaults
    python benchmarks/tile_regions.py --jobs tile-synth --extra --tile-overlap 8
    python benchmarks/tile_regions.py --jobs tile-synth --shift              # shifted tile grids per step
    python benchmarks/tile_regions.py --untiled              # and each job untiled, scored on the same lines
    python benchmarks/tile_regions.py --image out.png --zones-x 120:136 --zones-y ''   # score any image

Records: one per job (`bench: tile_regions`) with the ratio per axis, the worst zone and where it is.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emit, machine  # noqa: E402

Zone = tuple[int, int]  # [start, end) in pixels along the axis: where two tiles' weights cross

JOBS = {  # name -> (command line after `ldmtool`, output file name)
    "tile-synth": (["tile-synth", str(REPO / "examples/labelmaps/landscape.png"), "--width", "1024", "--height",
                    "256", "--seed", "1"], "landscape.png"),
    "superres": (["superres", str(REPO / "examples/photos/leaf.png"), "--scale", "4", "--seed", "1"], "leaf.png"),
    "upscale": (["img2img", str(REPO / "examples/photos/leaf.png"), "--scale", "4", "--strength", "0.4",
                 "--prompt", "a red circle", "--seed", "1"], "leaf.png"),
}


# -- the metric ---------------------------------------------------------------------------------------


def column_features(image: np.ndarray, block: int) -> np.ndarray:
    """(blocks, W, 4): per column and block of `block` rows, the mean R, G, B and texture (|Laplacian|)."""
    import cv2

    texture = np.abs(cv2.Laplacian(image.mean(axis=2).astype(np.float32), cv2.CV_32F))
    stacked = np.concatenate([image, texture[..., None]], axis=2)
    rows = (image.shape[0] // block) * block
    return stacked[:rows].reshape(rows // block, block, image.shape[1], 4).mean(axis=1)


def change_across(features: np.ndarray, zone: Zone, strip: int) -> float:
    """How much the strips of `strip` columns left of and right of `zone` differ (mean over row blocks)."""
    left = features[:, zone[0] - strip : zone[0]].mean(axis=1)
    right = features[:, zone[1] : zone[1] + strip].mean(axis=1)
    return float(np.abs(left - right).sum(axis=1).mean())


def axis_ratio(image: np.ndarray, zones: Sequence[Zone], strip: int = 8, block: int = 32) -> Optional[dict[str, Any]]:
    """The region-change ratio along vertical lines of an (H, W, 3) float image in [0, 1]; None without zones."""
    width = image.shape[1]
    zones = [z for z in zones if z[0] - strip >= 0 and z[1] + strip <= width]
    if not zones or image.shape[0] < block:
        return None
    features = column_features(image, block)
    gap = max(z[1] - z[0] for z in zones)
    at_zones = [change_across(features, z, strip) for z in zones]
    centres = [(z[0] + z[1]) / 2 for z in zones]
    reach = gap / 2 + strip  # a control line whose strips would touch a zone's centre is not "elsewhere"
    controls = [change_across(features, (x, x + gap), strip) for x in range(strip, width - gap - strip + 1, 2)
                if all(abs(x + gap / 2 - c) > reach for c in centres)]
    if not controls:
        return None
    elsewhere = float(np.median(controls))
    worst = int(np.argmax(at_zones))
    return {"ratio": round(float(np.mean(at_zones)) / max(elsewhere, 1e-9), 3),
            "worst_ratio": round(at_zones[worst] / max(elsewhere, 1e-9), 3), "worst_at": round(centres[worst]),
            "zones": len(zones), "controls": len(controls)}


def region_ratios(image: np.ndarray, zones_x: Sequence[Zone], zones_y: Sequence[Zone], **kwargs: Any) -> dict[str, Any]:
    """The ratio along vertical lines (zones_x) and horizontal ones (zones_y)."""
    return {"x": axis_ratio(image, zones_x, **kwargs), "y": axis_ratio(image.transpose(1, 0, 2), zones_y, **kwargs)}


def blend_zones(spans: Sequence[tuple[int, int]], scale: int) -> list[Zone]:
    """Pixel zones where consecutive tiles (start, length in latent pixels) overlap, times the first stage's
    downsampling `scale`."""
    zones = []
    for (start, length), (next_start, _) in zip(spans, spans[1:]):
        if next_start < start + length:
            zones.append((next_start * scale, (start + length) * scale))
    return zones


# -- running ldmtool with the plan recorded -----------------------------------------------------------


def run_job(name: str, folder: Path, extra: Sequence[str], shift: bool = False,
            untiled_reference: bool = False) -> dict[str, Any]:
    """One job through the CLI in this process; `shift`: the tiled engine's shifted grids (`TileConfig.shift`,
    a grid offset per step; the zones scored are those of the unshifted plan)."""
    from dataclasses import replace

    from ldmtool.cli.app import main
    from ldmtool.tiling import fusion

    plans: list[Any] = []
    original, original_init = fusion.TiledDenoiser.plan, fusion.TiledDenoiser.__init__

    def recording(self, height, width, sigma=None):
        plans.append(original(self, height, width, None))  # the unshifted plan: the zones to score
        return original(self, height, width, sigma)

    def shifted(self, inner, config=fusion.TileConfig()):
        original_init(self, inner, replace(config, shift=True))

    fusion.TiledDenoiser.plan = recording  # type: ignore[method-assign]
    if shift:
        fusion.TiledDenoiser.__init__ = shifted  # type: ignore[method-assign]
    args, filename = JOBS[name]
    output = folder / name / filename
    try:
        main([*args, "-o", str(output.parent), "--overwrite", "--quiet", *extra])
    except SystemExit as done:
        if done.code:
            return {"bench": "tile_regions", "job": name, "error": f"exit {done.code}"}
    finally:
        fusion.TiledDenoiser.plan = original  # type: ignore[method-assign]
        fusion.TiledDenoiser.__init__ = original_init  # type: ignore[method-assign]
    from PIL import Image

    image = np.asarray(Image.open(output).convert("RGB"), dtype=np.float32) / 255
    record: dict[str, Any] = {"bench": "tile_regions", "job": name, "extra": list(extra), "shift": shift,
                              "size": list(image.shape[1::-1])}
    if not plans:
        return {**record, "tiled": False}
    plan = max(plans, key=lambda p: p.height * p.width)
    scale = image.shape[0] // plan.height if image.shape[0] % plan.height == 0 else round(image.shape[0] / plan.height)
    zones_x = blend_zones([(c.start, c.length) for c in plan.cols], scale)
    zones_y = blend_zones([(r.start, r.length) for r in plan.rows], scale)
    record.update(tiled=True, latent=[plan.height, plan.width], tile=list(plan.tile_shape), overlap=plan.overlap,
                  **region_ratios(image, zones_x, zones_y))
    if untiled_reference:  # the same job untiled, scored on the same lines: what the content alone gives
        reference = _untiled_image(name, folder, extra)
        record["untiled"] = region_ratios(reference, zones_x, zones_y) if reference is not None else None
    return record


def _untiled_image(name: str, folder: Path, extra: Sequence[str]) -> Optional[np.ndarray]:
    from PIL import Image

    from ldmtool.cli.app import main

    args, filename = JOBS[name]
    output = folder / f"{name}-untiled" / filename
    try:
        main([*args, "-o", str(output.parent), "--overwrite", "--quiet", *extra, "--tile", "0"])
    except SystemExit as done:
        if done.code:
            return None
    return np.asarray(Image.open(output).convert("RGB"), dtype=np.float32) / 255


def parse_zones(text: str) -> list[Zone]:
    return [(int(a), int(b)) for a, b in (part.split(":") for part in text.split(",") if part)]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", choices=sorted(JOBS), default=sorted(JOBS))
    parser.add_argument("--image", type=Path, help="score this image with --zones-x/--zones-y instead")
    parser.add_argument("--zones-x", default="", help="pixel zones START:END,... (vertical lines)")
    parser.add_argument("--zones-y", default="", help="pixel zones START:END,... (horizontal lines)")
    parser.add_argument("--shift", action="store_true", help="shifted tile grids per step (TileConfig.shift)")
    parser.add_argument("--untiled", action="store_true",
                        help="also score the same job run untiled (--tile 0) on the same lines: the content's share")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more options for every job, last")
    args = parser.parse_args(argv)
    emit({"bench": "tile_regions", "machine": machine()})
    if args.image is not None:
        from PIL import Image

        image = np.asarray(Image.open(args.image).convert("RGB"), dtype=np.float32) / 255
        emit({"bench": "tile_regions", "image": str(args.image),
              **region_ratios(image, parse_zones(args.zones_x), parse_zones(args.zones_y))})
        return
    with tempfile.TemporaryDirectory(prefix="ldm-tile-regions-") as tmp:
        for name in args.jobs:
            emit(run_job(name, Path(tmp), args.extra, shift=args.shift, untiled_reference=args.untiled))


if __name__ == "__main__":
    main()
