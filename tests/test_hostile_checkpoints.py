"""Hand-made checkpoints and configs that must give one-line errors (DESIGN.md §6), never a traceback."""
import pytest
import torch
import yaml

from ldmtool import load_model
from ldmtool.checkpoints.files import save_safetensors
from ldmtool.checkpoints.tiny import tiny_model
from ldmtool.errors import CheckpointError
from test_hostile_tools import assert_one_line
from test_models_cli import run

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def kl_f4():
    return tiny_model("kl-f4")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_integer_weights_are_a_mismatch_not_a_crash(tmp_path, capsys, kl_f4, dtype):
    state = dict(kl_f4.state_dict())
    state["encoder.conv_in.bias"] = state["encoder.conv_in.bias"].to(dtype)
    save_safetensors(state, tmp_path / "int.safetensors")
    with pytest.raises(CheckpointError, match="not floating point .*encoder.conv_in.bias"):
        load_model(tmp_path / "int.safetensors", config=kl_f4.config)
    (tmp_path / "int.yaml").write_text(yaml.safe_dump(kl_f4.config))  # found beside the weights
    code, out, err = run(capsys, "models", "convert", tmp_path / "int.safetensors", tmp_path / "out.safetensors")
    assert_one_line(code, err, "int.safetensors", codes=(3,))
    assert not (tmp_path / "out.safetensors").exists()
