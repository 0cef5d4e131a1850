"""The tiled first stage on the shipped default model: tiled decode and encode match untiled within 1/255."""
import numpy as np
import pytest
import torch

from ldmtool.checkpoints.presets import shipped_model
from ldmtool.io.images import read_image
from ldmtool.tiling.vae import VAETiling, tiled_decode, tiled_encode

pytestmark = pytest.mark.skipif(shipped_model("default-txt2img") is None, reason="default-txt2img is not shipped")


def test_default_superres_first_stage_tiles_exactly():
    from pathlib import Path

    import ldmtool

    first = ldmtool.load_model("default-txt2img").first_stage
    rgb = read_image(Path(__file__).resolve().parents[1] / "examples" / "photos" / "leaf.png").rgb
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None] * 2 - 1  # (1, 3, 80, 120)
    with torch.inference_mode():
        z = first.encode(x)
        untiled = first.decode(z)
        tiled = tiled_decode(first, z, VAETiling(tile=8))
        z_tiled = tiled_encode(first, x, VAETiling(tile=32))
    assert ((tiled - untiled).abs().max() / 2).item() <= 1 / 255  # image space [0, 1]
    assert ((first.decode(z_tiled) - untiled).abs().max() / 2).item() <= 1 / 255
