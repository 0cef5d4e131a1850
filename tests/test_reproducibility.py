"""The reproducibility contract of README "Reproducibility", checked through the real CLI in child processes.

Each child runs the shipped default models (superres, inpaint, txt2img; 2 steps, tiny inputs) with one
setting changed: batch size, tile batch, shards, thread count, the Ray engine, a restricted instruction
set. On one machine the pixels must be identical and the recipe equal apart from the command line; with a
restricted instruction set (standing in for another CPU) they must stay within the README's bound.
Thread counts are set in the child's environment (conftest pins one thread for the suite itself).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "photos"
# Run several CLI commands in one child, so torch and the models load once per setting.
CHILD = """
import json, sys
from ldmtool.cli.app import main
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit as exit:
        if exit.code:
            raise
"""
# README "Reproducibility": another instruction set moves a pixel by at most this many levels of 255, and
# the mean absolute difference stays below MEAN_BOUND levels (measured: 1 level, mean 0.0004).
MAX_BOUND, MEAN_BOUND = 2, 0.01


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three same-size crops of the example photos for superres, and the same with masks for inpaint."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "sr").mkdir(), (root / "inpaint").mkdir()
    for photo in sorted(PHOTOS.glob("*.png")):
        rgb = np.asarray(Image.open(photo).convert("RGB"))
        Image.fromarray(rgb[20:52, 30:70]).save(root / "sr" / photo.name)  # 40x32
        Image.fromarray(rgb[8:56, 20:84]).save(root / "inpaint" / photo.name)  # 64x48
        mask = np.zeros((48, 64), np.uint8)
        mask[12:36, 16:44] = 255
        Image.fromarray(mask).save(root / "inpaint" / f"{photo.stem}_mask.png")
    return root


def _commands(inputs: Path, out: Path, batch: int = 1, tile_batch: bool = False, shards: bool = False,
              only: tuple = ("superres", "inpaint", "txt2img"), extra: tuple = ()) -> list[list[str]]:
    common = ["--steps", "2", "--seed", "5", "--quiet", "--batch-size", str(batch), *extra]
    # A fixed --tile keeps the tile plan the same; --max-memory only lets tiles share a network batch.
    tiles = ["--tile", "24", "--tile-overlap", "8"] + (["--max-memory", "8GB"] if tile_batch else [])
    runs = {
        "superres": [["superres", str(inputs / "sr"), "-o", str(out / "superres"), *tiles, *common]],
        "inpaint": [["inpaint", str(inputs / "inpaint"), "-o", str(out / "inpaint"), *common]],
        "txt2img": [["txt2img", "--prompt", "a red circle above a blue square", "--n", "3",
                     "-o", str(out / "txt2img"), *common]],
    }
    if shards:  # each shard a run of its own into the same folder
        runs["superres"] = [runs["superres"][0] + ["--shard", f"{k}/2"] for k in (1, 2)]
    return [argv for name in only for argv in runs[name]]


def _run(commands: list[list[str]], threads: int = 1, env: dict | None = None) -> None:
    # PASSIVE: idle OpenMP threads sleep instead of spinning (3 threads on a 2-core machine stay quick).
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                   "OMP_WAIT_POLICY": "PASSIVE", "LDMTOOL_RAY_WORKERS": "2", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(commands)], env=environment,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _outputs(folder: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """Pixels and recipe of every PNG under `folder`, without the command line and without how the model hash
    was obtained (`model_sha256_source`: "computed" by the first process that hashed the file, "cache" after it,
    so it depends on which test ran first, not on the job)."""
    found = {}
    for path in sorted(folder.rglob("*.png")):
        image = Image.open(path)
        recipe = json.loads(image.text["ldmtool"])
        recipe.pop("argv")
        recipe.pop("model_sha256_source", None)
        found[str(path.relative_to(folder))] = (np.asarray(image.convert("RGB")).astype(np.int16), recipe)
    return found


@pytest.fixture(scope="module")
def baseline(inputs, tmp_path_factory):
    """One thread, batch size 1, one tile per network call, local engine."""
    out = tmp_path_factory.mktemp("baseline")
    _run(_commands(inputs, out))
    found = _outputs(out)
    assert len(found) == 9  # 3 upscaled photos, 3 inpainted photos, 3 samples of one prompt
    return found


def _assert_identical(baseline: dict, other: Path) -> None:
    found = _outputs(other)
    assert sorted(found) == sorted(baseline)
    differ = {name: f"{int((pixels != baseline[name][0]).sum())} values, max {np.abs(pixels - baseline[name][0]).max()}"
              for name, (pixels, _) in found.items() if not np.array_equal(pixels, baseline[name][0])}
    assert not differ, differ
    assert {name: recipe for name, (_, recipe) in found.items()} == {name: baseline[name][1] for name in found}


def test_batch_size_tile_batch_and_shards_do_not_change_pixels(inputs, baseline, tmp_path):
    _run(_commands(inputs, tmp_path, batch=3, tile_batch=True, shards=True))
    _assert_identical(baseline, tmp_path)


def test_thread_count_does_not_change_pixels(inputs, baseline, tmp_path):
    # Three threads: chunks of a parallel loop then rarely line up with the vector width.
    _run(_commands(inputs, tmp_path), threads=3)
    _assert_identical(baseline, tmp_path)


def test_ray_engine_gives_the_local_engine_pixels(inputs, baseline, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed here (pip install 'ldmtool[ray]')")
    _run(_commands(inputs, tmp_path, batch=3, only=("superres",), extra=("--engine", "ray")), threads=2)
    only_superres = {k: v for k, v in baseline.items() if k.startswith("superres")}
    _assert_identical(only_superres, tmp_path)


# Another CPU, emulated: oneDNN, ATen and MKL all held to their oldest code paths (SSE4.1, no SIMD
# dispatch, MKL's "compatible" branch), as far from this machine's as they go.
RESTRICTED = {"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}


def test_another_instruction_set_stays_within_the_stated_bound(inputs, baseline, tmp_path):
    _run(_commands(inputs, tmp_path), env=RESTRICTED)
    found = _outputs(tmp_path)
    assert sorted(found) == sorted(baseline)
    for name, (pixels, recipe) in found.items():
        diff = np.abs(pixels - baseline[name][0])
        assert diff.max() <= MAX_BOUND and diff.mean() < MEAN_BOUND, (name, int(diff.max()), float(diff.mean()))
        assert recipe["machine"]["cpu"] == "DEFAULT"  # the record says where it ran (replay names it)
        assert {**recipe, "machine": None} == {**baseline[name][1], "machine": None}


# Products whose sums Intel MKL splits by the thread count unless it runs in its strict reproducible mode
# (few rows, long inner dimension: measured on an AVX-512 Xeon, benchmarks/gemm_threads.py).
THREAD_SPLIT_CHILD = """
import os
import ldmtool
import torch
print(os.environ.get("MKL_CBWR"))
generator = torch.Generator().manual_seed(0)
for rows, inner, columns in [(64, 960, 320), (64, 1280, 640), (64, 2560, 320), (256, 2560, 640), (1024, 2560, 320)]:
    a, b = torch.randn(rows, inner, generator=generator), torch.randn(inner, columns, generator=generator)
    torch.set_num_threads(2)
    two = a @ b
    torch.set_num_threads(1)
    assert torch.equal(a @ b, two), (rows, inner, columns)
"""


def test_importing_ldmtool_makes_fp32_matrix_products_independent_of_the_thread_count():
    environment = {key: value for key, value in os.environ.items() if key != "MKL_CBWR"}
    proc = subprocess.run([sys.executable, "-c", THREAD_SPLIT_CHILD], env=environment, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["AUTO,STRICT"]
    kept = subprocess.run([sys.executable, "-c", "import os, ldmtool; print(os.environ['MKL_CBWR'])"],
                          env={**environment, "MKL_CBWR": "COMPATIBLE"}, capture_output=True, text=True, timeout=60)
    assert kept.stdout.split() == ["COMPATIBLE"]  # the user's own setting wins
