"""The pipeline engine never writes a wrong image: non-finite results are recomputed in fp32, then fail."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldmtool.checkpoints.files import save_safetensors
from ldmtool.checkpoints.tiny import tiny_model
from ldmtool.cli.app import main
from ldmtool.errors import ItemError
from ldmtool.pipelines.engine import Engine, ModelChoice, SamplingChoice


@pytest.fixture
def half_engine(monkeypatch):
    monkeypatch.setattr(Engine, "_load", lambda self, dtype: f"bundle in {dtype}")
    engine = Engine(ModelChoice(), SamplingChoice())
    engine.device, engine.dtype = torch.device("cpu"), torch.float16
    return engine


def test_non_finite_half_precision_result_is_recomputed_in_fp32(half_engine):
    seen = []

    def compute(engine):
        seen.append(engine.dtype)
        return torch.tensor([float("nan")]) if engine.dtype == torch.float16 else torch.ones(1)

    assert half_engine.finite(compute, "a.png").item() == 1.0
    assert seen == [torch.float16, torch.float32]


def test_non_finite_even_in_fp32_fails_the_item(half_engine):
    with pytest.raises(ItemError, match=r"a\.png: .*not finite"):
        half_engine.finite(lambda engine: torch.tensor([float("inf")]), "a.png")


def test_a_model_that_gives_nan_writes_no_image_and_exits_1(tmp_path, capsys):
    bundle = tiny_model("ldm-bsr-sr")
    state = bundle.state_dict()
    state["first_stage_model.decoder.conv_out.bias"] = torch.full_like(state["first_stage_model.decoder.conv_out.bias"], float("nan"))
    model = tmp_path / "broken.safetensors"
    save_safetensors(state, model)
    import yaml

    model.with_suffix(".yaml").write_text(yaml.safe_dump(bundle.config))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as exit:
        main(["superres", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--model", str(model),
              "--steps", "1", "--sampler", "euler", "--seed", "1", "--quiet"])
    assert exit.value.code == 1
    assert "not finite" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.png"))


def test_non_finite_pixels_are_recomputed_in_fp32_too(half_engine):
    from ldmtool.pipelines.engine import NonFiniteResult

    seen = []

    def compute(engine):
        seen.append(engine.dtype)
        if engine.dtype == torch.float16:
            raise NonFiniteResult
        return torch.zeros(1, 2, 2, 3, dtype=torch.uint8)

    assert half_engine.finite(compute, "a.png").dtype == torch.uint8
    assert seen == [torch.float16, torch.float32]


@pytest.mark.parametrize("vae_tile", [0, 8])  # whole, and tiles of 8 latent pixels
def test_decode_and_decode_pixels_agree_tiled_or_not(tmp_path, vae_tile):
    from ldmtool.checkpoints.tiny import save_tiny_checkpoint
    from ldmtool.io.images import to_uint8

    path = tmp_path / "bsr.safetensors"
    save_tiny_checkpoint(path, "ldm-bsr-sr", seed=2, with_config=True)
    engine = Engine(ModelChoice(model=str(path), device="cpu"), SamplingChoice(vae_tile=vae_tile)).open()
    latents = torch.randn(1, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    floats = engine.decode(latents)
    pixels = engine.decode_pixels(latents)
    assert floats.shape == (1, 3, 96, 128) and pixels.shape == (1, 96, 128, 3) and pixels.dtype == torch.uint8
    expected = to_uint8(floats[0].permute(1, 2, 0).numpy())
    assert np.abs(pixels[0].numpy().astype(int) - expected.astype(int)).max() <= (0 if vae_tile == 0 else 1)
    whole = Engine(ModelChoice(model=str(path), device="cpu"), SamplingChoice(vae_tile=0)).open().decode(latents)
    assert (floats - whole).abs().max() <= 1 / 255
