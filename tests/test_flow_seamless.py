"""`--seamless` on the flow-matching transformers (FLUX.1, SD3): no padded convolutions, so the canvas wraps through
tiles that cross the wrap edge, each tile's positions counting on past the edge (tiny random files of
test_flow_txt2img.py)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from clirun import run_cli
from ldmtool.diffusion.cond import Cond
from ldmtool.errors import UsageError
from ldmtool.tiling.fusion import TileConfig, TiledDenoiser
from ldmtool.tiling.memory import Tiling, tiles_across_the_wrap
from test_flow_txt2img import T5_WIDTH, _flux_args, _sd3_args, flux_files, run_ours, sd3_file  # noqa: F401
from test_t5 import tokenizer_dir  # noqa: F401
from test_text3 import towers  # noqa: F401

CANVAS = (8, 12)  # latent pixels: 4 x 6 patches
SEAM_TILE = 10  # with 4-wide tiles every 2 pixels, the tile at column 10 covers columns 10, 11, 0, 1
CONFIG = TileConfig(tile=(8, 4), overlap=2, wrap_x=True, align=2)


def test_a_wrapped_axis_is_always_cut_into_tiles_shorter_than_it():
    assert tiles_across_the_wrap(None, (8, 12), (False, True), patch=2) == Tiling((8, 6), 2, 1)
    assert tiles_across_the_wrap(Tiling((64, 64), 4, 3), (64, 200), (True, True), patch=2) == Tiling((32, 64), 4, 3)
    with pytest.raises(UsageError, match="--seamless: a canvas 8 latent pixels across wraps through tiles smaller"):
        tiles_across_the_wrap(None, (8, 8), (True, True), patch=2, overlap=4)  # a 4-pixel tile cannot overlap by 4


def _recorded(call):
    """`call`, keeping each tile's latent, positions and result."""
    calls = []

    def record(x, t, cond):
        out = call(x, t, cond)
        calls.append((x.clone(), cond.position.clone(), out))
        return out

    return record, calls


def _seam_tile(recipe, bundle, x, cond, guidance):
    from ldmtool.pipelines.flow_engine import positions

    call, calls = _recorded(recipe.network(bundle, CANVAS, guidance, torch.float32))
    TiledDenoiser(call, CONFIG)(x, torch.tensor([0.7]), replace(cond, position=positions(CANVAS, 1, "cpu")))
    (seam,) = [c for c in calls if int(c[1][0, 1, 0, 0]) == SEAM_TILE]
    torch.testing.assert_close(seam[0], torch.roll(x, -SEAM_TILE, dims=-1)[..., :4], rtol=0, atol=0)
    return seam[2]


def _inputs(y_width):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, *CANVAS, generator=g)
    return x, Cond(crossattn=torch.randn(1, 5, T5_WIDTH, generator=g), y=torch.randn(1, y_width, generator=g))


def test_a_flux_tile_across_the_seam_takes_the_wrapped_latent_and_rotary_ids_past_the_edge(flux_files):  # noqa: F811
    from ldmtool.families.flux_flow import FluxFlow, pack, unpack

    net = flux_files[1]["dev"]
    bundle = type("Bundle", (), {"denoiser": net})()
    x, cond = _inputs(64)
    ids = torch.zeros(4, 2, 3)  # rows 0..3, columns 5, 6 in patches: column 6 is past the 6-patch canvas
    ids[..., 1] = torch.arange(4)[:, None]
    ids[..., 2] = torch.arange(5, 7)[None]
    with torch.no_grad():
        got = _seam_tile(FluxFlow(), bundle, x, cond, 3.5)
        rolled = torch.roll(x, -SEAM_TILE, dims=-1)[..., :4]
        want = unpack(net(pack(rolled), ids.reshape(1, 8, 3), cond.crossattn, torch.zeros(1, 5, 3),
                          torch.tensor([0.7]), cond.y, guidance=torch.tensor([3.5])), 8, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_sd3_tile_across_the_seam_takes_the_grid_positions_past_the_edge(sd3_file):  # noqa: F811
    from ldmtool import load_model
    from ldmtool.families.sd3_flow import SD3Flow

    _, net, _ = sd3_file
    bundle = load_model(sd3_file[0])
    x, cond = _inputs(192)
    m = net.config.pos_embed_max_size  # the 4 x 6 patch canvas sits at (2, 1) of the stored 8 x 8 grid
    top, left = (m - 4) // 2, (m - 6) // 2
    grid = net.pos_embed.view(m, m, -1)[top:top + 4, left:left + 7]  # the canvas and one column past it
    rolled = torch.roll(x, -SEAM_TILE, dims=-1)[..., :4]

    def by_hand(columns):
        tokens = net.x_embedder(rolled) + grid[:, columns].reshape(1, 8, -1)
        c = net.conditioning(torch.tensor([700.0]), cond.y, 1, torch.float32)
        text = net.context_embedder(cond.crossattn)
        for block in net.joint_blocks:
            text, tokens = block(text, tokens, c)
        return net.unpatchify(net.final_layer(tokens, c), 4, 2)

    with torch.no_grad():
        got = _seam_tile(SD3Flow(), bundle, x, cond, None)
        want = by_hand(torch.tensor([5, 6]))  # canvas column 5, then 6: the first past the edge
        broken = by_hand(torch.tensor([5, 0]))  # the positions the seam would jump back to
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - broken).abs().max() > 1e-2


def _wrap_jump(image: np.ndarray) -> float:
    """The mean step across the wrap edge (last column to first), in units of the median step between neighbouring
    columns."""
    steps = np.abs(np.diff(image, axis=1)).mean(axis=(0, 2))
    return float(np.abs(image[:, 0] - image[:, -1]).mean() / np.median(steps))


def _tiles_seen(monkeypatch, recipe_class) -> list[tuple[int, int]]:
    """(left, width) in latent pixels of every network call the family's recipe makes from now on."""
    seen = []
    network = recipe_class.network

    def recording(self, bundle, canvas_hw, guidance, dtype):
        call = network(self, bundle, canvas_hw, guidance, dtype)

        def velocity(x_t, t, cond):
            seen.extend((int(left), x_t.shape[-1]) for left in cond.position[:, 1, 0, 0].tolist())
            return call(x_t, t, cond)

        return velocity

    monkeypatch.setattr(recipe_class, "network", recording)
    return seen


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_txt2img_seamless_x_runs_tiles_across_the_wrap_edge(tmp_path, monkeypatch, flux_files, sd3_file,  # noqa: F811
                                                            tokenizer_dir, family):  # noqa: F811
    """A 64 px image (8 latent pixels) fits one tile, yet --seamless x tiles it with tiles that cross the edge. The
    output has no visible wrap edge (measured: the step across it is 1.1x (FLUX.1) and 1.0x (SD3) the median step
    between neighbouring columns, 1.9x and 2.2x without --seamless; at this size the autoencoder's circular padding
    alone gives most of that, so the tiles are checked directly)."""
    from ldmtool.families.flux_flow import FluxFlow
    from ldmtool.families.sd3_flow import SD3Flow

    args = _sd3_args(sd3_file, tokenizer_dir) if family == "sd3" else _flux_args(flux_files, tokenizer_dir)
    seen = _tiles_seen(monkeypatch, SD3Flow if family == "sd3" else FluxFlow)
    plain, _ = run_ours(*args, "-o", tmp_path / "plain.png")
    assert set(seen) == {(0, 8)}
    seen.clear()
    image, recipe = run_ours(*args, "--seamless", "x", "-o", tmp_path / "seamless.png")
    assert recipe["parameters"]["seamless"] == "x"
    assert all(width < 8 and left % 2 == 0 for left, width in seen) and any(left + width > 8 for left, width in seen)
    assert _wrap_jump(image) < 1.3 < 1.6 < _wrap_jump(plain)


def test_seamless_with_tile_0_is_a_one_line_usage_error(tmp_path, flux_files, tokenizer_dir):  # noqa: F811
    result = run_cli("txt2img", "--prompt", "p", *_flux_args(flux_files, tokenizer_dir), "--seamless", "x",
                     "--tile", 0, "-o", tmp_path / "x.png")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "--seamless with --tile 0" in lines[0], result.stderr


def test_tiles_of_a_plain_tiled_run_start_on_whole_patches(tmp_path, monkeypatch, flux_files, tokenizer_dir):  # noqa: F811
    """A 34-pixel latent in 16-pixel tiles overlapping by 2 would spread its tiles to 0, 9, 18 (a tile's positions
    would then be half a patch off): they start on whole 2x2 patches instead."""
    from ldmtool.families.flux_flow import FluxFlow

    seen = _tiles_seen(monkeypatch, FluxFlow)
    run_ours(*_flux_args(flux_files, tokenizer_dir), "-W", 272, "-H", 16, "--steps", 1, "--tile", 16,
             "--tile-overlap", 2, "-o", tmp_path / "x.png")
    lefts = sorted({left for left, _ in seen})
    assert len(lefts) == 3 and all(left % 2 == 0 for left in lefts), lefts
