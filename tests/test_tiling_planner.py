"""Tile planner properties over many canvases, tiles and overlaps, and the memory-budget choices."""
import itertools
import random

import pytest
import torch

from ldmtool.errors import UsageError
from ldmtool.tiling.memory import UNetMemory, check_tile, choose_tiling, parse_memory
from ldmtool.tiling.planner import Weighting, axis_spans, crop_tile, fit_tile, plan_tiles, tile_weights


def _cases():
    rng = random.Random(5)
    fixed = [(64, 64, 64, 8), (65, 64, 64, 8), (128, 200, 64, 6), (7, 300, 32, 4), (33, 31, 32, 0), (512, 96, 64, 6)]
    drawn = []
    for _ in range(20):
        tile = rng.choice([8, 16, 24, 32, 48, 64])
        drawn.append((rng.randint(1, 260), rng.randint(1, 260), tile, rng.randint(0, tile // 2)))
    return fixed + drawn


def _indices(rect, plan):
    return (rect.top + torch.arange(rect.height)) % plan.height, (rect.left + torch.arange(rect.width)) % plan.width


def _coverage(plan):
    count = torch.zeros(plan.height, plan.width)
    for rect in plan.tiles:
        ys, xs = _indices(rect, plan)
        count[ys[:, None], xs[None, :]] += 1
    return count


@pytest.mark.parametrize("height,width,tile,overlap", _cases())
@pytest.mark.parametrize("wrap", [(False, False), (True, True), (False, True)])
def test_plan_covers_everything_with_positive_weights(height, width, tile, overlap, wrap):
    shifts = [(0, 0), (3, 5)] if tile - overlap > 1 else [(0, 0)]
    for shift in shifts:
        plan = plan_tiles(height, width, tile, overlap, wrap_y=wrap[0], wrap_x=wrap[1], shift=shift)
        assert (_coverage(plan) >= 1).all()
        for rect in plan.tiles:
            assert rect.height == min(tile, height) and rect.width == min(tile, width)
            assert 0 <= rect.top < height and 0 <= rect.left < width
            if not wrap[0]:
                assert rect.top + rect.height <= height
            if not wrap[1]:
                assert rect.left + rect.width <= width
        for weighting in Weighting:
            weights = tile_weights(plan, weighting)
            total = torch.zeros(height, width, dtype=torch.float64)
            for rect, w in zip(plan.tiles, weights):
                assert torch.isfinite(w).all() and (w >= 0).all()
                ys, xs = _indices(rect, plan)
                total[ys[:, None], xs[None, :]] += w.double()
            torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)


@pytest.mark.parametrize("length,tile,overlap", [(300, 64, 6), (129, 64, 8), (1000, 96, 10), (65, 64, 0)])
def test_neighbours_overlap_by_at_least_the_overlap_and_last_tile_meets_the_edge(length, tile, overlap):
    spans = axis_spans(length, tile, overlap)
    assert spans[0].start == 0 and spans[-1].start + tile == length
    for a, b in zip(spans, spans[1:]):
        assert a.start + tile - b.start >= overlap
    assert not spans[0].inner_lo and not spans[-1].inner_hi


def test_wrap_plan_rotates_and_tiles_cross_the_edge_correctly():
    spans = axis_spans(100, 32, 8, wrap=True, shift=10)
    assert len(spans) == len(axis_spans(100, 32, 8, wrap=True))  # rotating costs no extra tile
    assert all(s.inner_lo and s.inner_hi for s in spans)
    plan = plan_tiles(100, 20, 32, 8, wrap_y=True, shift=(90, 0))
    canvas = torch.arange(100.0)[:, None].expand(100, 20)
    crossing = next(r for r in plan.tiles if r.top + r.height > 100)
    rows = crop_tile(canvas, crossing, plan)[:, 0]
    expected = torch.tensor([(crossing.top + i) % 100 for i in range(32)], dtype=torch.float32)
    assert torch.equal(rows, expected)


def test_canvas_smaller_than_a_tile_is_one_tile():
    plan = plan_tiles(10, 12, 64, 8)
    assert plan.single and plan.tiles[0].height == 10 and plan.tiles[0].width == 12
    assert torch.equal(tile_weights(plan)[0], torch.ones(10, 12))


def test_overlap_must_be_smaller_than_the_tile():
    with pytest.raises(ValueError, match="overlap"):
        plan_tiles(100, 100, 16, 16)


@pytest.mark.parametrize("text,value", [("4GB", 4 * 2**30), ("512MiB", 512 * 2**20), ("1.5g", int(1.5 * 2**30)), ("1000", 1000)])
def test_parse_memory(text, value):
    assert parse_memory(text) == value


@pytest.mark.parametrize("text", ["", "GB", "4 bananas", "-3GB", "0"])
def test_parse_memory_rejects_nonsense_with_a_usage_error(text):
    with pytest.raises(UsageError, match="--max-memory"):
        parse_memory(text)


def test_canvas_that_fits_the_budget_runs_untiled_unless_a_tile_is_asked_for():
    memory = UNetMemory()
    fits = memory.bytes_for(128 * 128, 2)
    assert choose_tiling((128, 128), native_tile=64, items=2, budget=fits) is None
    assert choose_tiling((128, 128), native_tile=64, items=2, budget=fits - 1) is not None
    assert choose_tiling((128, 128), native_tile=64, items=2, budget=fits, tile=64) is not None
    assert choose_tiling((4096, 4096), native_tile=64, device=torch.device("cpu")) is not None


def test_budget_picks_smaller_tiles_and_bigger_batches():
    memory = UNetMemory(channels=320, dtype_bytes=2)
    roomy = choose_tiling((256, 256), native_tile=64, budget=64 * 2**30, memory=memory)
    tight = choose_tiling((256, 256), native_tile=64, budget=int(memory.bytes_for(32 * 32, 1) * 1.1), memory=memory)
    assert max(roomy.tile) <= 96 and roomy.tile_batch > 1  # up to 1.5x native where it saves work
    assert max(tight.tile) <= 32 and tight.tile_batch == 1
    assert choose_tiling((256, 256), native_tile=64, tile=0) is None
    assert choose_tiling((40, 60), native_tile=64) is None
    with pytest.raises(UsageError, match="--tile-overlap"):
        choose_tiling((256, 256), native_tile=64, tile=32, overlap=32)


def test_default_tiling_keeps_work_near_untiled():
    """Square latent canvases (multiples of 8): work = tile pixels run / canvas pixels with the default tiling."""
    ratios = {}
    for length in range(64, 2100, 8):
        tiling = choose_tiling((length, length), native_tile=64)
        if tiling is None:  # fits one tile of at most 1.5x native
            assert length <= 96
            ratios[length] = 1.0
            continue
        assert all(t % 8 == 0 and t <= 96 for t in tiling.tile)
        ratios[length] = plan_tiles(length, length, tiling.tile, tiling.overlap).work_pixels / length**2
    assert max(ratios.values()) <= 1.3  # issue 5's bound, at every size
    assert sum(ratios.values()) / len(ratios) <= 1.13


def test_tiles_prefer_the_native_size_when_work_is_equal():
    assert fit_tile(512, 80, 4, preferred=64) <= 64
    assert choose_tiling((72, 72), native_tile=64) is None  # within 1.25x native: one tile


def test_plans_are_deterministic_and_weights_hashable():
    a = plan_tiles(150, 90, 32, 8, shift=(4, 2))
    b = plan_tiles(150, 90, 32, 8, shift=(4, 2))
    assert a == b and hash(a) == hash(b)
    assert all(torch.equal(x, y) for x, y in zip(tile_weights(a), tile_weights(b)))


def test_every_combination_of_small_sizes():
    for height, width, tile, overlap in itertools.product([1, 5, 16, 17, 40], [3, 16, 33], [8, 16], [0, 2, 4]):
        plan = plan_tiles(height, width, tile, overlap)
        assert (_coverage(plan) >= 1).all()
        assert all(torch.isfinite(w).all() for w in tile_weights(plan))


@pytest.mark.parametrize("tile, overlap", [(9, None), (10, None), (11, None), (17, 5), (63, None)])
def test_a_tile_that_is_not_a_multiple_of_8_is_rounded_down(tile, overlap):
    """The networks take multiples of 8 latent pixels: --tile 9 used to reach them unrounded (every item
    failed with torch's "Sizes of tensors must match")."""
    tiling = choose_tiling((120, 80), native_tile=64, tile=tile, overlap=overlap)
    assert tiling is not None and all(side % 8 == 0 and side <= tile for side in tiling.tile)


def test_the_overlap_is_checked_against_the_rounded_tile():
    with pytest.raises(UsageError, match=r"must be smaller than the tile \(8 latent pixels: --tile 15 rounded down"):
        check_tile(15, 10)
    check_tile(15, 7)
