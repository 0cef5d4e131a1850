"""Quality of the shipped default models against classical baselines (issue 7), on data no default was
trained on, as JSON lines.

- superres: held-out photographs in named sets (`--eval-data`; default: the corpus's held-out images, the
  held-out wallpapers of `debian:lomiri-wallpapers-16.04` and, as a set from a package no default trains
  on, one file of every wallpaper of `plasma-workspace-wallpapers`, each where installed). A photo larger
  than 1024 px on its long side is first area-downscaled to 1024: wallpapers are stored far beyond their
  optical sharpness (upscaled, denoised, compressed), so at full size a 256² crop is a few blurry pixels
  of detail and every method scores alike. Then fixed 256² crops (centre and four corners), shrunk x4 with
  `cv2.INTER_AREA`; each set is reported on its own and all together (`"set"` in each JSON line).
  `ldmtool superres --scale 4` (raw, `--colour-fix`, `--consistency`; or each `--settings` option set) vs bicubic and
  Lanczos upscales, and bicubic followed by the same back-projection `--consistency` applies (so the
  table shows what the model adds beyond that classical step). PSNR and SSIM against the crop, and the high-frequency energy ratio: spectral energy above 1/4
  of the Nyquist frequency (the low-res image's own Nyquist limit, i.e. the detail an upscaler must
  invent), output over ground truth, luminance, Hann-windowed; 1.0 = as much detail as the truth.
  Target (issue 7): better than bicubic in PSNR and SSIM.
- inpaint: the same crops with fixed seeded masks (boxes and free-form strokes, `ldmtool.train.masks`);
  `ldmtool inpaint` vs OpenCV Telea. MAE and PSNR inside the mask, and the largest change outside the
  mask grown by the command's feather band (must be 0: the input is kept there).
- semantic / layout / txt2img: the project's procedural generators with seeds from a namespace training
  never uses. Agreement by colour statistics of the procedural classes: a region counts as right when the
  mean colour of its generated pixels is nearest to the requested class's colour (semantic: each class's
  region of the label map; layout: each box's visible part); txt2img: the caption's two colours are the
  two most frequent palette colours, and their centroids are in the caption's relation (axis accuracy:
  along the relation's axis, in either order). Two references are scored the same way: the procedural
  ground truth (oracle) and the ground truth of a different sample (chance).

`--model` defaults to the shipped default of the task's command (`default-semantic2img`, ...); a task
without one is reported as skipped. The model runs through the real command line
(`ldmtool <command> ... --seed N`), in a child process per run.

    python benchmarks/quality.py --task all --markdown      # README table
    python benchmarks/quality.py --task superres --quick    # centre crops only, model default setting
    python benchmarks/quality.py --task superres --eval-data corpus debian:lomiri-wallpapers-16.04 \
        --settings "; --temperature 0; --steps 1; --sampler ddim --steps 4"   # one row per option set
    python benchmarks/quality.py --dry-run                  # tiny random models: checks the script

With `--markdown` the README table rows go to stdout and the JSON lines to stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, python_env, run_child  # noqa: E402
from folder_throughput import ldmtool_argv  # noqa: E402

TASKS = ("superres", "inpaint", "semantic", "layout", "txt2img")
COMMANDS = {"superres": "superres", "inpaint": "inpaint", "semantic": "semantic2img", "layout": "layout2img",
            "txt2img": "txt2img"}
# Output sides. txt2img and layout at 64 px, the shipped defaults' training size: they learn a whole scene's
# composition at that size, and a larger canvas repeats it (semantic maps condition every pixel, so 128 is fine).
DEFAULT_SIZE = {"superres": 256, "inpaint": 256, "semantic": 128, "layout": 64, "txt2img": 64}
TINY_PRESETS = {"superres": "ldm-bsr-sr", "inpaint": "ldm-inpainting-big", "semantic": "ldm-semantic-synthesis256",
                "layout": "ldm-layout2img-openimages256", "txt2img": "ldm-text2img256"}
SR_SCALE = 4
PSNR_CAP = 100.0  # dB for identical images (JSON has no infinity)
HF_CUTOFF = 1 / SR_SCALE  # of the Nyquist frequency
FEATHER = 4  # `ldmtool inpaint`'s default blend band in pixels
MIN_REGION = 16  # pixels a region needs after erosion to be scored
SAMPLES = {False: 16, True: 4}  # procedural samples per generator task (full, quick)


# -- metrics ----------------------------------------------------------------------------------------------


def psnr(truth: np.ndarray, out: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """PSNR in dB of 8-bit images (over the pixels where `mask` is true), capped at PSNR_CAP."""
    diff = truth.astype(np.float64) - out.astype(np.float64)
    if mask is not None:
        diff = diff[mask.astype(bool)]
    mse = float(np.mean(diff**2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0**2 / mse))


def ssim(truth: np.ndarray, out: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(truth, out, channel_axis=2, data_range=255))


def high_frequency_energy(image: np.ndarray, cutoff: float = HF_CUTOFF) -> float:
    """Spectral energy of the luminance above `cutoff` x Nyquist (radially), Hann-windowed so the image's
    borders add no false edges."""
    grey = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) if image.ndim == 3 else image.astype(np.float64)
    grey = (grey - grey.mean()) * np.outer(np.hanning(grey.shape[0]), np.hanning(grey.shape[1]))
    power = np.abs(np.fft.fft2(grey)) ** 2
    fy, fx = np.fft.fftfreq(grey.shape[0])[:, None], np.fft.fftfreq(grey.shape[1])[None, :]
    radius = np.sqrt(fx**2 + fy**2) / 0.5
    return float(power[radius > cutoff].sum())


def high_frequency_ratio(truth: np.ndarray, out: np.ndarray) -> float:
    return high_frequency_energy(out) / max(high_frequency_energy(truth), 1e-12)


def masked_mae(truth: np.ndarray, out: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute error in 0..255 units over the masked pixels (all channels)."""
    return float(np.abs(truth.astype(np.float64) - out.astype(np.float64))[mask.astype(bool)].mean())


def nearest_colour(mean: np.ndarray, palette: np.ndarray) -> int:
    return int(np.argmin(((palette - mean) ** 2).sum(axis=1)))


def region_hits(image: np.ndarray, regions: Sequence[tuple[np.ndarray, int]], palette: np.ndarray) -> tuple[int, int]:
    """(right, scored) over (boolean region, requested class) pairs: a region is right when the mean colour
    of its pixels, eroded by 2 px so boundaries do not count, is nearest to its class's palette colour."""
    right = scored = 0
    kernel = np.ones((5, 5), np.uint8)
    for region, cls in regions:
        inner = cv2.erode(region.astype(np.uint8), kernel).astype(bool)
        if inner.sum() < MIN_REGION:
            continue
        scored += 1
        right += nearest_colour(image[inner].astype(np.float64).mean(axis=0), palette) == cls
    return right, scored


# -- held-out data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Crop:
    name: str  # file-name safe, e.g. "skimage_chelsea_c"
    image: np.ndarray  # (size, size, 3) uint8 RGB


def crop_origins(height: int, width: int, size: int, quick: bool) -> list[tuple[str, int, int]]:
    """Centre crop, plus the four corners in full mode: (tag, top, left)."""
    centre = [("c", (height - size) // 2, (width - size) // 2)]
    if quick:
        return centre
    bottom, right = height - size, width - size
    return centre + [("tl", 0, 0), ("tr", 0, right), ("bl", bottom, 0), ("br", bottom, right)]


def eval_crops(size: int, quick: bool) -> list[Crop]:
    from ldmtool.train.data import corpus_images, load_rgb

    crops = []
    for corpus_image in corpus_images("eval"):
        rgb = load_rgb(corpus_image.path)
        if min(rgb.shape[:2]) < size:
            continue
        stem = corpus_image.key.rsplit(".", 1)[0].replace("/", "_")
        for tag, top, left in crop_origins(*rgb.shape[:2], size, quick):
            crops.append(Crop(f"{stem}_{tag}", np.ascontiguousarray(rgb[top : top + size, left : left + size])))
    if not crops:
        raise SystemExit(f"no held-out image is at least {size} px on its short side (install scikit-image; try a smaller --size)")
    return crops


LONG_SIDE = 1024  # photos larger than this are area-downscaled to it before cropping (see the docstring)
CORPUS_SET = "corpus"
HELD_OUT_PACKAGE = "lomiri-wallpapers-16.04"  # what default-superres trains on; its held-out split
OUT_OF_PACKAGE = "plasma-workspace-wallpapers"  # no default trains on it: every wallpaper is held out
ALL_OF = "debian-all:"


def installed(package: str) -> bool:
    from ldmtool.errors import UsageError
    from ldmtool.train import debian

    try:
        debian.package_files(package)
    except UsageError:
        return False
    return True


def default_eval_sets() -> list[str]:
    """The corpus's held-out photos, plus the Debian sets whose packages are installed."""
    sets = [CORPUS_SET]
    if installed(HELD_OUT_PACKAGE):
        sets.append(f"debian:{HELD_OUT_PACKAGE}")
    if installed(OUT_OF_PACKAGE):
        sets.append(f"{ALL_OF}{OUT_OF_PACKAGE}")
    return sets


def eval_set_images(spec: str) -> list[tuple[str, Path]]:
    """(file-name safe stem, path) of a set: `corpus` (its held-out images), `debian:PKG[,PKG]` (their held-out
    wallpapers), `debian-all:PKG[,PKG]` (every wallpaper of packages no model trains on) or a folder of
    images. A wallpaper shipped in several sizes counts once, by its largest file."""
    from ldmtool.train import debian
    from ldmtool.train.data import corpus_images, folder_images

    if spec == CORPUS_SET:
        return [(image.key.rsplit(".", 1)[0].replace("/", "_"), image.path) for image in corpus_images("eval")]
    if spec.startswith((ALL_OF, debian.PREFIX)):
        every = spec.startswith(ALL_OF)
        images = debian.debian_images(debian.PREFIX + spec.split(":", 1)[1], "all" if every else "eval")
        largest: dict[str, Path] = {}
        for image in images:
            if image.group not in largest or _pixels(image.path) > _pixels(largest[image.group]):
                largest[image.group] = image.path
        return [(group.replace("/", "_"), path) for group, path in sorted(largest.items())]
    folder = Path(spec)
    return [(path.relative_to(folder).with_suffix("").as_posix().replace("/", "_"), path)
            for path in folder_images(folder)]


def _pixels(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.width * image.height


def shrink_long_side(rgb: np.ndarray, long_side: int = LONG_SIDE) -> np.ndarray:
    """Area-downscale so the long side is at most `long_side` (smaller images are returned as they are)."""
    height, width = rgb.shape[:2]
    if max(height, width) <= long_side:
        return rgb
    factor = long_side / max(height, width)
    return cv2.resize(rgb, (round(width * factor), round(height * factor)), interpolation=cv2.INTER_AREA)


def photo_crops(stem: str, rgb: np.ndarray, size: int, quick: bool) -> list[Crop]:
    rgb = shrink_long_side(rgb)
    if min(rgb.shape[:2]) < size:
        return []
    return [Crop(f"{stem}_{tag}", np.ascontiguousarray(rgb[top : top + size, left : left + size]))
            for tag, top, left in crop_origins(*rgb.shape[:2], size, quick)]


def eval_sets(specs: Sequence[str], size: int, quick: bool) -> dict[str, list[Crop]]:
    """{set name: its crops}; a set without an image large enough for one crop is left out."""
    from ldmtool.train.data import load_rgb

    sets = {}
    for spec in dict.fromkeys(specs):
        crops = [crop for stem, path in eval_set_images(spec) for crop in photo_crops(stem, load_rgb(path), size, quick)]
        if crops:
            sets[spec] = crops
    if not sets:
        raise SystemExit(f"no held-out image in {', '.join(specs)} is at least {size} px on its short side")
    return sets


def write_png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rgb[:, :, ::-1] if rgb.ndim == 3 else rgb)
    return path


def read_png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f"cannot read {path}")
    return np.ascontiguousarray(image[:, :, ::-1])


def eval_seed(base: int, task: str, index: int) -> int:
    """Procedural seeds in a namespace of their own (training derives `<task>/<i>` from its seed)."""
    from ldmtool.runtime.seeds import derive_seed

    return derive_seed(base, f"quality-eval/{task}/{index}")


# -- running the model ------------------------------------------------------------------------------------


@dataclass
class Settings:
    model: str
    seed: int
    steps: Optional[int]
    quick: bool
    size: int
    workdir: Path
    timeout: Optional[float] = None
    extra: list[str] = field(default_factory=list)  # e.g. --device cpu
    eval_data: list[str] = field(default_factory=lambda: [CORPUS_SET])  # superres: the held-out sets
    option_sets: Optional[list[str]] = None  # superres: ldmtool option sets, one row each (None: the usual three)


def run_ldmtool(settings: Settings, command: str, args: Sequence[str], output: Path) -> tuple[dict[str, Path], float]:
    """Run `ldmtool COMMAND ARGS -o OUTPUT` with the model, seed and steps; {item key: output file}, seconds."""
    argv = [*ldmtool_argv(), command, *args, "-o", str(output), "--model", settings.model, "--seed",
            str(settings.seed), "--json", "--overwrite", *settings.extra]
    if settings.steps:
        argv += ["--steps", str(settings.steps)]
    run = run_child(argv, env=python_env(), timeout=settings.timeout)
    if run.returncode != 0:
        raise SystemExit(f"{command} failed (exit {run.returncode}): {run.stderr.strip()[-800:]}")
    done = {r["key"]: Path(r["output"]) for r in run.json_lines() if r.get("event") == "done"}
    return done, run.seconds


def by_stem(outputs: dict[str, Path]) -> dict[str, Path]:
    return {Path(key).stem: path for key, path in outputs.items()}


def method_record(task: str, method: str, values: dict[str, list[float]], **extra: Any) -> dict[str, Any]:
    """One method's means over the items (and the per-item values)."""
    means = {name: round(float(np.mean(v)), 4) for name, v in values.items()}
    per_item = {f"{name}_per_item": [round(float(x), 3) for x in v] for name, v in values.items()}
    return {"bench": "quality", "task": task, "method": method, "items": len(next(iter(values.values()))),
            **means, **extra, **per_item}


# -- tasks ------------------------------------------------------------------------------------------------


def superres_runs(settings: Settings) -> list[tuple[str, list[str]]]:
    """(method name, ldmtool flags) of the model's rows: each `--settings` option set, or the usual ones."""
    if settings.option_sets is not None:
        return [(f"ldmtool {text.strip()}".strip() if text.strip() else "ldmtool (model defaults)", shlex.split(text))
                for text in settings.option_sets]
    if settings.quick:
        return [("ldmtool", [])]
    return [("ldmtool --no-colour-fix", ["--no-colour-fix", "--no-consistency"]),
            ("ldmtool --colour-fix", ["--colour-fix", "--no-consistency"]),
            ("ldmtool --consistency", ["--no-colour-fix", "--consistency"])]


def bench_superres(settings: Settings) -> list[dict[str, Any]]:
    sets = eval_sets(settings.eval_data, settings.size, settings.quick)
    crops = [crop for set_crops in sets.values() for crop in set_crops]
    low_side = settings.size // SR_SCALE
    low_dir = settings.workdir / "superres-low"
    lows = {c.name: cv2.resize(c.image, (low_side, low_side), interpolation=cv2.INTER_AREA) for c in crops}
    for name, low in lows.items():
        write_png(low_dir / f"{name}.png", low)
    from ldmtool.pipelines.consistency import back_project_

    bicubic = lambda n: cv2.resize(lows[n], (settings.size,) * 2, interpolation=cv2.INTER_CUBIC)  # noqa: E731
    outputs: dict[str, Callable[[str], np.ndarray]] = {
        "bicubic": bicubic,
        "lanczos": lambda n: cv2.resize(lows[n], (settings.size,) * 2, interpolation=cv2.INTER_LANCZOS4),
        # the classical half of --consistency alone: what back-projection adds without a model
        "bicubic + back-projection": lambda n: back_project_(bicubic(n), lows[n]),
    }
    seconds = {}
    for method, flags in superres_runs(settings):
        out_dir = settings.workdir / f"superres-{len(seconds)}"
        done, seconds[method] = run_ldmtool(settings, "superres", [str(low_dir), "--scale", str(SR_SCALE), *flags], out_dir)
        files = by_stem(done)
        outputs[method] = lambda n, files=files: read_png(files[n])
    scores = {method: {crop.name: crop_scores(crop, produce(crop.name)) for crop in crops}
              for method, produce in outputs.items()}
    groups = {**sets, "all": crops} if len(sets) > 1 else sets
    records = []
    for set_name, set_crops in groups.items():
        set_records = []
        for method in outputs:
            values = {metric: [scores[method][crop.name][metric] for crop in set_crops] for metric in SR_METRICS}
            whole = set_name == list(groups)[-1]  # a run covers every set: its time goes on the last row only
            extra = {"seconds": round(seconds[method], 1)} if method in seconds and whole else {}
            set_records.append(method_record("superres", method, values, set=set_name, **extra))
        records += set_records + [{**superres_summary(set_records), "set": set_name}]
    return records


SR_METRICS = ("psnr", "ssim", "hf_ratio")


def crop_scores(crop: Crop, out: np.ndarray) -> dict[str, float]:
    return {"psnr": psnr(crop.image, out), "ssim": ssim(crop.image, out), "hf_ratio": high_frequency_ratio(crop.image, out)}


def superres_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    bicubic = next(r for r in records if r["method"] == "bicubic")
    projected = next(r for r in records if r["method"] == "bicubic + back-projection")
    ours = [r for r in records if r["method"].startswith("ldmtool")]
    best = max(ours, key=lambda r: r["psnr"])
    return {"bench": "quality", "task": "superres", "summary": True, "best_ldmtool": best["method"],
            "psnr_gain_over_bicubic_db": round(best["psnr"] - bicubic["psnr"], 3),
            "ssim_gain_over_bicubic": round(best["ssim"] - bicubic["ssim"], 4),
            "psnr_gain_over_bicubic_back_projection_db": round(best["psnr"] - projected["psnr"], 3),
            "target": "better than bicubic in PSNR and SSIM",
            "ok": best["psnr"] > bicubic["psnr"] and best["ssim"] > bicubic["ssim"]}


def inpaint_masks(size: int, count: int, seed: int) -> list[np.ndarray]:
    """Fixed masks: boxes and free-form strokes alternately, from seeded generators."""
    from ldmtool.train.masks import box_mask, freeform_mask

    masks = []
    for index in range(count):
        rng = np.random.default_rng(eval_seed(seed, "inpaint-mask", index))
        make = box_mask if index % 2 == 0 else freeform_mask
        mask = make(size, size, rng) > 0.5
        if not mask.any():
            mask[size // 2, size // 2] = True
        masks.append(mask)
    return masks


def telea(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """OpenCV's Telea inpainting (radius 3) of the masked pixels."""
    return cv2.inpaint(image, mask.astype(np.uint8) * 255, 3, cv2.INPAINT_TELEA)


def outside_band(mask: np.ndarray, band: int = FEATHER) -> np.ndarray:
    """Pixels farther than `band` from the mask: the command promises the input exactly there."""
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((2 * band + 3, 2 * band + 3), np.uint8))
    return grown == 0


def bench_inpaint(settings: Settings) -> list[dict[str, Any]]:
    crops = eval_crops(settings.size, settings.quick)
    masks = dict(zip((c.name for c in crops), inpaint_masks(settings.size, len(crops), settings.seed)))
    image_dir, mask_dir = settings.workdir / "inpaint-in", settings.workdir / "inpaint-masks"
    for crop in crops:
        write_png(image_dir / f"{crop.name}.png", crop.image)
        write_png(mask_dir / f"{crop.name}.png", masks[crop.name].astype(np.uint8) * 255)
    produce: dict[str, Callable[[Crop], np.ndarray]] = {"telea": lambda c: telea(c.image, masks[c.name])}
    seconds = {}
    runs = [("ldmtool", [])] if settings.quick else [("ldmtool --no-colour-fix", ["--no-colour-fix"]),
                                                      ("ldmtool --colour-fix", ["--colour-fix"])]
    for method, flags in runs:
        done, seconds[method] = run_ldmtool(settings, "inpaint", [str(image_dir), "--masks", str(mask_dir), *flags],
                                            settings.workdir / f"inpaint-out-{len(seconds)}")
        produce[method] = lambda c, files=by_stem(done): read_png(files[c.name])
    records = []
    for method, make in produce.items():
        values: dict[str, list[float]] = {"mae_in_mask": [], "psnr_in_mask": [], "outside_max_abs_diff": []}
        for crop in crops:
            out, mask = make(crop), masks[crop.name]
            values["mae_in_mask"].append(masked_mae(crop.image, out, mask))
            values["psnr_in_mask"].append(psnr(crop.image, out, mask))
            outside = outside_band(mask)
            diff = np.abs(crop.image.astype(int) - out.astype(int))[outside]
            values["outside_max_abs_diff"].append(float(diff.max()) if diff.size else 0.0)
        extra = {"seconds": round(seconds[method], 1)} if method in seconds else {}
        record = method_record("inpaint", method, values, mask_kinds="box, free-form (alternating)", **extra)
        record["outside_max_abs_diff"] = max(values["outside_max_abs_diff"])  # the worst item, not the mean
        records.append(record)
    return records


def class_palette() -> np.ndarray:
    from ldmtool.train.procedural import CLASSES

    return np.array([c.colour for c in CLASSES], np.float64)


def bench_semantic(settings: Settings) -> list[dict[str, Any]]:
    from ldmtool.train.procedural import semantic_sample

    count = SAMPLES[settings.quick]
    samples = [semantic_sample(eval_seed(settings.seed, "semantic", i), settings.size) for i in range(count)]
    map_dir = settings.workdir / "semantic-maps"
    for index, (_, labels) in enumerate(samples):
        write_png(map_dir / f"map{index:03d}.png", labels)
    done, seconds = run_ldmtool(settings, "semantic2img", [str(map_dir)], settings.workdir / "semantic-out")
    files = by_stem(done)
    palette = class_palette()

    def regions(index: int) -> list[tuple[np.ndarray, int]]:
        labels = samples[index][1]
        return [(labels == cls, int(cls)) for cls in np.unique(labels)]

    images = {"ldmtool": lambda i: read_png(files[f"map{i:03d}"]), "procedural ground truth (oracle)": lambda i: samples[i][0],
              "ground truth of another map (chance)": lambda i: samples[(i + 1) % count][0]}
    return [agreement_record("semantic", method, [region_hits(make(i), regions(i), palette) for i in range(count)],
                             seconds if method == "ldmtool" else None) for method, make in images.items()]


def agreement_record(task: str, method: str, hits: list[tuple[int, int]], seconds: Optional[float]) -> dict[str, Any]:
    right, scored = sum(h[0] for h in hits), sum(h[1] for h in hits)
    record = {"bench": "quality", "task": task, "method": method, "items": len(hits), "regions": scored,
              "accuracy": round(right / scored, 4) if scored else None}
    if seconds is not None:
        record["seconds"] = round(seconds, 1)
    return record


def visible_boxes(boxes: Sequence[Any], size: int) -> list[tuple[np.ndarray, int]]:
    """Each box's visible part (later boxes are drawn over earlier ones, as the generator does)."""
    owner = np.full((size, size), -1, np.int32)
    for index, box in enumerate(boxes):
        owner[round(box.y0 * size) : round(box.y1 * size), round(box.x0 * size) : round(box.x1 * size)] = index
    return [(owner == index, box.cls) for index, box in enumerate(boxes)]


def bench_layout(settings: Settings) -> list[dict[str, Any]]:
    from ldmtool.train.diffusion import LAYOUT_NAMES
    from ldmtool.train.procedural import CLASSES, layout_sample

    count, size = SAMPLES[settings.quick], settings.size
    samples = [layout_sample(eval_seed(settings.seed, "layout", i), size) for i in range(count)]
    layout_dir = settings.workdir / "layouts"
    layout_dir.mkdir(parents=True, exist_ok=True)
    for index, (_, boxes) in enumerate(samples):
        objects = [{"label": LAYOUT_NAMES[CLASSES[b.cls].name], "box": [b.x0, b.y0, b.x1, b.y1]} for b in boxes]
        (layout_dir / f"layout{index:03d}.json").write_text(json.dumps({"units": "relative", "objects": objects}))
    done, seconds = run_ldmtool(settings, "layout2img", [str(layout_dir), "--width", str(size), "--height", str(size)],
                                settings.workdir / "layout-out")
    files = by_stem(done)
    palette = class_palette()
    images = {"ldmtool": lambda i: read_png(files[f"layout{i:03d}"]), "procedural ground truth (oracle)": lambda i: samples[i][0],
              "ground truth of another layout (chance)": lambda i: samples[(i + 1) % count][0]}
    return [agreement_record("layout", method,
                             [region_hits(make(i), visible_boxes(samples[i][1], size), palette) for i in range(count)],
                             seconds if method == "ldmtool" else None) for method, make in images.items()]


@dataclass(frozen=True)
class Caption:
    colour_a: str
    colour_b: str
    relation: str


def parse_caption(text: str) -> Caption:
    from ldmtool.train.procedural import COLOURS, RELATIONS, SHAPES

    colours, shapes, relations = "|".join(COLOURS), "|".join(SHAPES), "|".join(RELATIONS)
    match = re.fullmatch(rf"a ({colours}) (?:{shapes}) ({relations}) a ({colours}) (?:{shapes})", text)
    if match is None:
        raise ValueError(f"not a procedural caption: {text!r}")
    return Caption(match.group(1), match.group(3), match.group(2))


def caption_scores(image: np.ndarray, caption: Caption) -> tuple[float, bool, bool]:
    """(share of the caption's two colours among the image's two most frequent palette colours, whether
    their centroids are in the caption's relation, whether they lie along the relation's axis in either
    order). Pixels are assigned to the nearest of the palette and a light grey background; a colour needs
    0.5% of the image to count."""
    from ldmtool.train.procedural import COLOURS

    names = list(COLOURS)
    palette = np.array([*COLOURS.values(), (220, 220, 220)], np.float64)
    flat = image.reshape(-1, 3).astype(np.float64)
    nearest = np.argmin(((flat[:, None, :] - palette[None]) ** 2).sum(axis=2), axis=1).reshape(image.shape[:2])
    counts = np.bincount(nearest.ravel(), minlength=len(palette))[: len(names)]
    present = [i for i in np.argsort(-counts, kind="stable")[:2] if counts[i] >= 0.005 * nearest.size]
    wanted = {names.index(caption.colour_a), names.index(caption.colour_b)}
    colour_score = len(wanted & {int(i) for i in present}) / 2
    a, b = names.index(caption.colour_a), names.index(caption.colour_b)
    if min(counts[a], counts[b]) < 0.005 * nearest.size:
        return colour_score, False, False
    ya, xa = np.argwhere(nearest == a).mean(axis=0)
    yb, xb = np.argwhere(nearest == b).mean(axis=0)
    dx, dy = {"above": (0, -1), "below": (0, 1), "left of": (-1, 0), "right of": (1, 0)}[caption.relation]
    along, across = (xa - xb) * dx + (ya - yb) * dy, (xa - xb) * dy + (ya - yb) * dx
    return colour_score, bool(along > 0), bool(abs(along) > abs(across))


def bench_txt2img(settings: Settings) -> list[dict[str, Any]]:
    from ldmtool.train.procedural import shape_scene

    count, size = SAMPLES[settings.quick], settings.size
    samples = [shape_scene(eval_seed(settings.seed, "txt2img", i), size) for i in range(count)]
    prompts = settings.workdir / "prompts.txt"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(f"{caption}\n" for _, caption in samples))
    done, seconds = run_ldmtool(settings, "txt2img", ["--prompts", str(prompts), "--width", str(size), "--height", str(size),
                                                      "--name", "prompt{index:03d}.{ext}"], settings.workdir / "txt2img-out")
    files = {path.stem: path for path in done.values()}
    images = {"ldmtool": lambda i: read_png(files[f"prompt{i:03d}"]), "procedural ground truth (oracle)": lambda i: samples[i][0],
              "ground truth of another caption (chance)": lambda i: samples[(i + 1) % count][0]}
    records = []
    for method, make in images.items():
        scores = [caption_scores(make(i), parse_caption(samples[i][1])) for i in range(count)]
        record = {"bench": "quality", "task": "txt2img", "method": method, "items": count,
                  "colour_accuracy": round(float(np.mean([s[0] for s in scores])), 4),
                  "relation_accuracy": round(float(np.mean([s[1] for s in scores])), 4),
                  "axis_accuracy": round(float(np.mean([s[2] for s in scores])), 4)}
        if method == "ldmtool":
            record["seconds"] = round(seconds, 1)
        records.append(record)
    return records


REGISTRY: dict[str, Callable[[Settings], list[dict[str, Any]]]] = {
    "superres": bench_superres, "inpaint": bench_inpaint, "semantic": bench_semantic, "layout": bench_layout,
    "txt2img": bench_txt2img,
}


# -- output -----------------------------------------------------------------------------------------------

METRIC_TEXT = {
    "psnr": "PSNR {:.2f} dB", "ssim": "SSIM {:.3f}", "hf_ratio": "HF energy {:.2f}",
    "mae_in_mask": "MAE in mask {:.1f}", "psnr_in_mask": "PSNR in mask {:.2f} dB",
    "outside_max_abs_diff": "max change outside {:.0f}", "accuracy": "region accuracy {:.2f}",
    "colour_accuracy": "colour accuracy {:.2f}", "relation_accuracy": "relation accuracy {:.2f}",
    "axis_accuracy": "axis accuracy {:.2f}",
}


def markdown_rows(records: list[dict[str, Any]]) -> list[str]:
    """README table: one row per (task, method); skipped tasks say so."""
    rows = ["| task | model | method | items | result |", "|---|---|---|---|---|"]
    for r in records:
        if r.get("skipped"):
            rows.append(f"| {r['task']} | — | — | — | skipped: {r['skipped']} |")
        elif "method" in r:
            metrics = ", ".join(text.format(r[k]) for k, text in METRIC_TEXT.items() if r.get(k) is not None)
            task = f"{r['task']} ({r['set']})" if r.get("set") else r["task"]
            rows.append(f"| {task} | {r.get('model', '')} | {r['method']} | {r['items']} | {metrics} |")
    return rows


def resolve_model(task: str, model: Optional[str]) -> Optional[str]:
    """The model to measure: `--model`, else the shipped default of the task's command (`default-superres`,
    `default-semantic2img`, ...) when installed, else None."""
    if model:
        return model
    from ldmtool.checkpoints.presets import shipped_model

    name = f"default-{COMMANDS[task]}"
    return name if shipped_model(name) is not None else None


def weights_sha256(model: str) -> Optional[str]:
    """sha256 of the weights a run measures (a file, or a shipped default's file), so a stored result can be
    matched to the weights that ship (tests/test_shipped_defaults.py)."""
    from ldmtool.checkpoints.presets import shipped_model
    from ldmtool.runtime.cache import hash_file

    shipped = shipped_model(model) if not Path(model).is_file() else None
    path = shipped.weights if shipped is not None else Path(model)
    return hash_file(path) if path.is_file() else None


def tiny_model(task: str, folder: Path) -> str:
    from ldmtool.checkpoints.tiny import save_tiny_checkpoint

    path = folder / f"tiny-{task}.safetensors"
    save_tiny_checkpoint(path, TINY_PRESETS[task], seed=0, with_config=True)
    return str(path)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="+", choices=[*TASKS, "all"], default=["all"], help="one or more tasks, or all")
    parser.add_argument("--model", help="checkpoint file or shipped name (default: the shipped default-<task>)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    parser.add_argument("--cfg", type=float, help="guidance scale of the generators (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the model runs and the procedural samples")
    parser.add_argument("--size", type=int, help="crop / output side in pixels (default: 256 superres and inpaint, 128 semantic, 64 layout and txt2img)")
    parser.add_argument("--quick", action="store_true", help="centre crops only, 4 procedural samples, model default setting")
    parser.add_argument("--markdown", action="store_true", help="README table on stdout (JSON lines on stderr)")
    parser.add_argument("--dry-run", action="store_true", help="tiny random models, 64 px, 2 steps, quick: checks the script")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, help="keep inputs and outputs here (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, help="seconds per ldmtool process")
    parser.add_argument("--eval-data", nargs="+", metavar="SET",
                        help="superres held-out sets, each reported alone and all together: corpus, debian:PKG[,PKG] "
                             "(held-out split), debian-all:PKG[,PKG] (every wallpaper of a package no model trains on) "
                             "or a folder (default: corpus, plus debian:lomiri-wallpapers-16.04 and "
                             "debian-all:plasma-workspace-wallpapers where installed; --dry-run: corpus)")
    parser.add_argument("--settings", metavar="OPTIONS",
                        help="superres: ldmtool option sets separated by ';', one row each, e.g. "
                             "\"--settings=; --temperature 0; --sampler ddim --steps 4\" (an empty set: the model's defaults)")
    parser.add_argument("--precision", default="fp32", help="ldmtool --precision of every run (default fp32)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        args.quick, args.size, args.steps = True, args.size or 64, args.steps or 2
    tasks = TASKS if "all" in args.task else tuple(dict.fromkeys(args.task))
    eval_data = args.eval_data or ([CORPUS_SET] if args.dry_run else default_eval_sets())
    option_sets = args.settings.split(";") if args.settings is not None else None
    stream = sys.stderr if args.markdown else sys.stdout

    def emit(record: dict[str, Any]) -> None:
        print(json.dumps(record), file=stream, flush=True)

    emit({"bench": "quality", "machine": machine(), "tasks": list(tasks), "seed": args.seed, "quick": args.quick,
          "eval_data": eval_data if "superres" in tasks else None, "precision": args.precision})
    records = []
    with tempfile.TemporaryDirectory(prefix="ldm-quality-") as tmp:
        root = args.workdir or Path(tmp)
        for task in tasks:
            model = tiny_model(task, Path(tmp)) if args.dry_run and not args.model else resolve_model(task, args.model)
            if model is None:
                record = {"bench": "quality", "task": task, "skipped": f"no shipped default-{COMMANDS[task]}; pass --model"}
                emit(record)
                records.append(record)
                continue
            settings = Settings(model=model, seed=args.seed, steps=args.steps, quick=args.quick,
                                size=args.size or DEFAULT_SIZE[task], workdir=root / task, timeout=args.timeout,
                                extra=["--device", args.device, "--precision", args.precision,
                                       *(["--cfg", str(args.cfg)] if args.cfg else [])],
                                eval_data=eval_data, option_sets=option_sets)
            started = time.perf_counter()
            digest = weights_sha256(model)
            for record in REGISTRY[task](settings):
                record = {**record, "model": Path(model).name if Path(model).is_file() else model,
                          "weights_sha256": digest, "size": settings.size, "steps": args.steps}
                emit(record)
                records.append(record)
            emit({"bench": "quality", "task": task, "benchmark_seconds": round(time.perf_counter() - started, 1)})
    if args.markdown:
        print("\n".join(markdown_rows(records)), flush=True)


if __name__ == "__main__":
    main()
