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
