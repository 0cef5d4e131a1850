"""Regenerate the README's pictures from the shipped default models and the example inputs.

    python docs/make_pictures.py                 # every picture whose default model ships
    python docs/make_pictures.py --only superres

Each picture runs the real command (the same one the README shows) into a temporary folder and lays the
results out beside a classical baseline: for superres the input (nearest-neighbour enlarged), bicubic,
ldmtool; for inpaint the image with its mask, OpenCV Telea, ldmtool; for semantic2img the label map in
the palette's colours beside ldmtool; for layout2img the boxes drawn beside ldmtool; for txt2img each
prompt under its image; for sample four unconditional samples; for canny (the default-canny ControlNet)
each example scene, its hint, txt2img with and without control, and the img2img batch job's output. Nothing here is used by the tests.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
GAP = 4  # pixels of white between panels


def run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ldmtool", *args, "--quiet"], check=True)


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def enlarge(image: np.ndarray, factor: int = 2) -> np.ndarray:
    """Nearest-neighbour enlargement, so small outputs show their pixels rather than a resampler's blur."""
    return cv2.resize(image, (image.shape[1] * factor, image.shape[0] * factor), interpolation=cv2.INTER_NEAREST)


def row(panels: list[np.ndarray]) -> np.ndarray:
    height = max(p.shape[0] for p in panels)
    gap = np.full((height, GAP, 3), 255, np.uint8)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in panels]
    return np.concatenate([x for p in padded for x in (p, gap)][:-1], axis=1)


def column(rows: list[np.ndarray]) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    gap = np.full((GAP, width, 3), 255, np.uint8)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate([x for r in padded for x in (r, gap)][:-1], axis=0)


def superres(out: Path) -> Path:
    photos = ROOT / "examples" / "photos"
    run("superres", str(photos), "--scale", "4", "-o", str(out))  # the README's main job, as written
    rows = []
    for source in sorted(photos.glob("*.png")):
        low = read(source)
        size = (low.shape[1] * 4, low.shape[0] * 4)
        rows.append(row([cv2.resize(low, size, interpolation=cv2.INTER_NEAREST),
                         cv2.resize(low, size, interpolation=cv2.INTER_CUBIC), read(out / source.name)]))
    target = IMAGES / "superres-default.png"
    Image.fromarray(column(rows)).save(target, optimize=True)
    return target


def inpaint(out: Path) -> Path:
    folder = ROOT / "examples" / "inpaint"
    image_path = next(p for p in sorted(folder.iterdir()) if "mask" not in p.stem)
    mask_path = next(p for p in sorted(folder.iterdir()) if "mask" in p.stem)
    run("inpaint", str(folder), "--feather", "4", "--seed", "1", "-o", str(out))  # examples/scripts/inpaint.sh
    image, mask = read(image_path), read(mask_path)[..., 0] > 127
    shown = image.copy()
    shown[mask] = (shown[mask] * 0.3 + np.array([255, 0, 255]) * 0.7).astype(np.uint8)
    telea = cv2.inpaint(image, mask.astype(np.uint8) * 255, 5, cv2.INPAINT_TELEA)
    result = read(next(out.glob(f"{image_path.stem}*")))
    target = IMAGES / "inpaint-default.png"
    Image.fromarray(row([enlarge(p) for p in (shown, telea, result)])).save(target, optimize=True)
    return target


def semantic(out: Path) -> Path:
    import yaml

    labels = ROOT / "examples" / "labelmaps" / "landscape.png"
    run("semantic2img", str(labels), "--seed", "1", "-o", str(out / "landscape.png"))  # examples/scripts/semantic2img.sh
    palette = yaml.safe_load((labels.parent / "palette.yaml").read_text())["palette"]
    ids = np.asarray(Image.open(labels))
    coloured = np.zeros((*ids.shape, 3), np.uint8)
    for index, colour in palette.items():
        coloured[ids == int(index)] = colour
    target = IMAGES / "semantic2img-default.png"
    Image.fromarray(row([enlarge(coloured, 3), enlarge(read(out / "landscape.png"), 3)])).save(target, optimize=True)
    return target


def layout(out: Path) -> Path:
    layouts = ROOT / "examples" / "layouts"
    run("layout2img", str(layouts), "--draw-boxes", "--seed", "1", "-o", str(out))  # examples/scripts/layout2img.sh
    panels = [enlarge(read(path), 3) for path in sorted(out.glob("*.png"))]  # park.boxes.png, then park.png
    target = IMAGES / "layout2img-default.png"
    Image.fromarray(row(panels)).save(target, optimize=True)
    return target


def txt2img(out: Path) -> Path:
    prompts = ROOT / "examples" / "prompts" / "prompts.txt"
    run("txt2img", "--prompts", str(prompts), "--seed", "1", "--name", "{index}.{ext}", "-o", str(out))  # txt2img.sh
    panels = []
    for index, prompt in enumerate(line.strip() for line in prompts.read_text().splitlines() if line.strip()):
        image = enlarge(read(out / f"{index}.png"), 3)
        caption = np.full((22, max(image.shape[1], 7 * len(prompt)), 3), 255, np.uint8)
        cv2.putText(caption, prompt, (2, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        panels.append(column([np.pad(image, ((0, 0), (0, caption.shape[1] - image.shape[1]), (0, 0)), constant_values=255),
                              caption]))
    target = IMAGES / "txt2img-default.png"
    Image.fromarray(row(panels)).save(target, optimize=True)
    return target


def sample(out: Path) -> Path:
    run("sample", "--n", "4", "--seed", "1", "--name", "{index}.{ext}", "-o", str(out))  # examples/scripts/sample.sh
    panels = [read(path) for path in sorted(out.glob("*.png"))]
    target = IMAGES / "sample-default.png"
    Image.fromarray(row([enlarge(p) for p in panels])).save(target, optimize=True)
    return target


def canny(out: Path) -> Path:
    """Each example scene, its canny hint, txt2img with default-canny, the same prompt and seed without
    control, and the README's img2img batch job (a folder of scenes, hints matched by name)."""
    scenes = ROOT / "examples" / "scenes"
    captions = (ROOT / "examples" / "prompts" / "scenes.txt").read_text().splitlines()
    hints = out / "hints"
    run("preprocess", "canny", str(scenes), "-o", str(hints))  # the README's batch job, as written
    run("img2img", str(scenes), "--controlnet", "default-canny", "--control-image", str(hints), "--prompt",
        RESTYLE_PROMPT, "--strength", "0.9", "--seed", "1", "-o", str(out / "restyled"))
    rows = []
    for index, (scene, caption) in enumerate(zip(sorted(scenes.glob("*.png")), captions)):
        hint = hints / scene.name
        run("txt2img", "--prompt", caption, "--seed", "1", "--controlnet", "default-canny", "--control-image",
            str(hint), "-o", str(out / f"controlled{index}.png"))
        run("txt2img", "--prompt", caption, "--seed", "1", "-o", str(out / f"plain{index}.png"))
        panels = [scene, hint, out / f"controlled{index}.png", out / f"plain{index}.png", out / "restyled" / scene.name]
        rows.append(row([enlarge(read(p), 3) for p in panels]))
    target = IMAGES / "canny-default.png"
    Image.fromarray(column(rows)).save(target, optimize=True)
    return target


RESTYLE_PROMPT = "a purple circle above a green square"
PICTURES = {"superres": superres, "inpaint": inpaint, "semantic2img": semantic, "layout2img": layout, "txt2img": txt2img,
            "sample": sample, "canny": canny}


def main() -> None:
    from ldmtool.checkpoints.presets import models_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(PICTURES), nargs="+")
    args = parser.parse_args()
    IMAGES.mkdir(parents=True, exist_ok=True)
    for name in args.only or sorted(PICTURES):
        model = f"default-{name}"
        if not (models_dir() / f"{model}.safetensors").is_file():
            print(f"{name}: no shipped {model}; skipped", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory(prefix="ldm-pictures-") as tmp:
            print(f"wrote {PICTURES[name](Path(tmp))}", file=sys.stderr)


if __name__ == "__main__":
    main()
