"""T2I-Adapters with the tiled engine: the features are computed once per image at its full size and packed
at latent resolution (`pack_features`); the tiler cuts them like a hint, and tiles start on the cells of the
coarsest feature map (8 latent pixels for SD 1.x/2.x adapters, `TileConfig.align`), so every tile's crop
unpacks to exactly the whole image's features at its place."""
import numpy as np
import pytest
import torch

from ldmtool.addons.controlnet import ControlledNetwork, pack_features
from ldmtool.checkpoints.tiny import randomise_
from ldmtool.diffusion.cond import Cond
from ldmtool.nets.t2i_adapter import FullAdapter
from ldmtool.tiling.fusion import TileConfig, TiledDenoiser
from ldmtool.tiling.planner import aligned_spans, axis_spans

WIDTHS = [32, 64, 128, 128]
FACTORS = [1, 2, 4, 8]  # each map's size: the latent's over this


@pytest.mark.parametrize("length, tile, overlap, align, wrap", [(72, 32, 4, 8, False), (136, 32, 4, 8, False),
                                                                (200, 48, 6, 4, False), (96, 32, 4, 8, True)])
def test_aligned_spans_start_on_cells_cover_the_axis_and_keep_the_overlap(length, tile, overlap, align, wrap):
    spans = aligned_spans(length, tile, overlap, align, wrap=wrap)
    starts = [s.start for s in spans]
    assert all(start % align == 0 for start in starts) and starts[0] == 0
    covered = np.zeros(length, dtype=bool)
    for s in spans:
        covered[np.arange(s.start, s.start + s.length) % length] = True
    assert covered.all()
    ends = [s.start + s.length for s in spans]
    assert all(end - start >= overlap for start, end in zip(starts[1:], ends[:-1]))
    if not wrap:
        assert ends[-1] == length


def test_the_plain_plan_would_cut_adapter_cells():
    """Why the alignment is needed: unaligned, the middle tile of a 72-wide canvas starts at 20."""
    assert [s.start for s in axis_spans(72, 32, 4)] == [0, 20, 40]
    assert [s.start for s in aligned_spans(72, 32, 4, 8)] == [0, 16, 40]


def adapter_and_features(hint):
    adapter = randomise_(FullAdapter(3, WIDTHS, 2), seed=3, scale=0.1).eval()
    with torch.no_grad():
        return adapter(hint)


def features_each_tile_sees(features, latent_hw, tile=(16, 32), overlap=4):
    """Run the tiled engine over a ControlledNetwork whose UNet records the adapter features of every call."""
    seen = []

    def unet(x, t, context=None, y=None, control=None, adapter=None):
        seen.append(adapter)
        return torch.zeros_like(x)

    network = ControlledNetwork(unet, [], adapter_widths=WIDTHS, adapter_factors=FACTORS)
    tiled = TiledDenoiser(lambda x, sigma, cond: network(x, sigma, adapter=cond.adapter),
                          TileConfig(tile=tile, overlap=overlap, align=network.tile_align))
    x = torch.zeros(1, 4, *latent_hw)
    tiled(x, torch.ones(1), Cond(adapter=pack_features(features, FACTORS)))
    return tiled.plan(*latent_hw).tiles, seen


def crop(features, rect):
    return [f[..., rect.top // k:(rect.top + rect.height) // k, rect.left // k:(rect.left + rect.width) // k]
            for f, k in zip(features, FACTORS)]


def test_each_tile_sees_exactly_the_whole_images_adapter_features_at_its_place():
    latent_hw = (16, 72)
    hint = torch.rand(1, 3, latent_hw[0] * 8, latent_hw[1] * 8, generator=torch.Generator().manual_seed(0))
    features = adapter_and_features(hint)
    tiles, seen = features_each_tile_sees(features, latent_hw)
    assert [r.left for r in tiles] == [0, 16, 40] and len(seen) == 3
    for rect, got in zip(tiles, seen):
        for a, b in zip(got, crop(features, rect)):
            assert torch.equal(a, b)


def test_one_tile_as_large_as_the_latent_sees_the_untiled_features():
    latent_hw = (16, 32)
    hint = torch.rand(1, 3, 128, 256, generator=torch.Generator().manual_seed(1))
    features = adapter_and_features(hint)
    _tiles, seen = features_each_tile_sees(features, latent_hw, tile=latent_hw)
    assert len(seen) == 1 and all(torch.equal(a, b) for a, b in zip(seen[0], features))


def test_a_hint_with_one_marked_pixel_changes_only_the_tiles_that_reach_its_features():
    """The features are the whole image's, so a marked pixel moves them within the adapter's reach around it
    (as in the untiled run): exactly the tiles overlapping that footprint see a change, the far ones none."""
    latent_hw = (16, 136)
    blank = torch.zeros(1, 3, 128, 1088)
    marked = blank.clone()
    marked[..., 20, 30] = 1.0  # latent pixel (2, 3)
    before, after = adapter_and_features(blank), adapter_and_features(marked)
    footprint = torch.zeros(latent_hw[1], dtype=torch.bool)  # latent columns whose features moved
    for a, b, k in zip(before, after, FACTORS):
        moved = (a != b).flatten(0, 2).any(0)
        footprint |= moved.repeat_interleave(k)
    tiles, seen_before = features_each_tile_sees(before, latent_hw)
    _, seen_after = features_each_tile_sees(after, latent_hw)
    changed = [any(not torch.equal(a, b) for a, b in zip(x, y)) for x, y in zip(seen_before, seen_after)]
    reaches = [bool(footprint[r.left:r.left + r.width].any()) for r in tiles]
    assert changed == reaches
    assert changed[0] and not changed[-1]  # the tile holding the pixel, and one beyond the adapter's reach


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import yaml
    from PIL import Image

    from ldmtool.checkpoints.files import save_safetensors
    from ldmtool.checkpoints.tiny import tiny_model

    folder = tmp_path_factory.mktemp("tiled")
    bundle = randomise_(tiny_model("sd1"), seed=7, scale=0.1)
    model = folder / "sd1-tiny.safetensors"
    save_safetensors(bundle.state_dict(), model)
    model.with_suffix(".yaml").write_text(yaml.safe_dump(bundle.config, sort_keys=False))
    adapter = randomise_(FullAdapter(3, WIDTHS, 2), seed=3, scale=0.1)
    save_safetensors({f"adapter.{k}": v for k, v in adapter.state_dict().items()}, folder / "adapter.safetensors")
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 192, 3), dtype=np.uint8)).save(folder / "hint.png")
    return model, folder / "adapter.safetensors", folder / "hint.png"


def test_txt2img_with_an_adapter_runs_tiled_with_the_features_in_every_tiled_call(tmp_path, files, monkeypatch):
    from clirun import run_cli

    model, adapter, hint = files
    plans = []
    fused = TiledDenoiser._fused
    monkeypatch.setattr(TiledDenoiser, "_fused", lambda self, plan, x, sigma, cond:
                        plans.append((plan, cond.cond.adapter is not None)) or fused(self, plan, x, sigma, cond))
    result = run_cli("txt2img", "--prompt", "x", "--model", model, "-W", 192, "-H", 64, "--tile", 16, "--tile-overlap", 4,
                     "--steps", 1, "--adapter", adapter, "--control-image", hint, "-o", tmp_path / "a.png", "--quiet")
    assert result.exit_code == 0, result.output
    assert plans and all(with_adapter for _plan, with_adapter in plans)  # guided: cond and uncond both carry them
    assert len(plans[0][0].tiles) == 2 and all(r.left % 8 == 0 for r in plans[0][0].tiles)


def test_a_tile_too_small_for_the_adapters_cells_fails_the_item_in_one_line(tmp_path, files, capsys):
    from ldmtool.cli.app import main

    model, adapter, hint = files
    with pytest.raises(SystemExit) as exit:
        main(["txt2img", "--prompt", "x", "--model", str(model), "-W", "192", "-H", "64", "--tile", "8",
              "--adapter", str(adapter), "--control-image", str(hint), "-o", str(tmp_path / "o.png"), "--quiet"])
    assert exit.value.code == 1  # the tile is planned per item (its canvas); the item fails, the run goes on
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--adapter: tiles start on the 8-latent-pixel cells" in err
