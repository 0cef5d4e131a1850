"""The tile-region metric (benchmarks/tile_regions.py): it finds a region change along a tile boundary, and
not in a smooth image or one whose only change is away from the boundaries."""
import importlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
tile_regions = importlib.import_module("tile_regions")

ZONES = [(120, 136), (248, 264)]  # two blend zones of 16 pixels, as an f8 plan with 2-latent overlaps gives


def _texture(seed, height=256, width=384, amplitude=0.08, base=(0.3, 0.5, 0.8)):
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.float32)
    image[:] = base
    return np.clip(image + amplitude * rng.standard_normal((height, width, 1)).astype(np.float32), 0, 1)


def _smooth(seed):
    image = _texture(seed)
    return np.clip(image + np.linspace(0, 0.2, image.shape[1], dtype=np.float32)[None, :, None], 0, 1)


def _region_change_at(x, seed):
    """Blue sky left of x, greyer and blotchier right of it, with a 16-pixel blend (what tiles give)."""
    clean, blotchy = _texture(seed), _texture(seed + 1, amplitude=0.2, base=(0.45, 0.5, 0.55))
    ramp = np.clip((np.arange(clean.shape[1]) - x + 8) / 16, 0, 1).astype(np.float32)[None, :, None]
    return clean * (1 - ramp) + blotchy * ramp


def test_finds_a_region_change_along_a_tile_boundary():
    result = tile_regions.axis_ratio(_region_change_at(128, seed=0), ZONES)
    assert result["worst_at"] == 128
    assert result["worst_ratio"] > 5 and result["ratio"] > 2


def test_a_smooth_image_scores_about_one():
    for seed in range(3):
        result = tile_regions.axis_ratio(_smooth(seed), ZONES)
        assert 0.5 < result["ratio"] < 1.5 and result["worst_ratio"] < 1.8


def test_a_change_away_from_the_boundaries_is_not_blamed_on_them():
    result = tile_regions.axis_ratio(_region_change_at(330, seed=4), ZONES)
    assert result["worst_ratio"] < 1.8


def test_blend_zones_are_the_overlaps_of_consecutive_tiles_in_pixels():
    assert tile_regions.blend_zones([(0, 16), (12, 16), (24, 16)], 8) == [(96, 128), (192, 224)]
    assert tile_regions.region_ratios(_smooth(0), ZONES, [])["y"] is None


def test_tile_shift_reaches_the_tiled_denoiser(tmp_path):
    from ldmtool.checkpoints.tiny import save_tiny_checkpoint
    from ldmtool.pipelines.engine import Engine, ModelChoice, SamplingChoice
    from ldmtool.tiling.fusion import TiledDenoiser

    path = tmp_path / "tiny.safetensors"
    save_tiny_checkpoint(path, "ldm-text2img256", seed=0, with_config=True)
    for shift in (None, True):
        engine = Engine(ModelChoice(model=str(path), device="cpu"),
                        SamplingChoice(tile=8, tile_overlap=2, tile_shift=shift)).open()
        denoise = engine._denoiser((32, 32), 1, False)
        assert isinstance(denoise, TiledDenoiser) and denoise.config.shift is bool(shift)
