"""Hand-made checkpoints and configs that must give one-line errors (DESIGN.md §6), never a traceback."""
import concurrent.futures
import copy
import os
from pathlib import Path

import pytest
import torch
import yaml

from ldmtool import load_model
from ldmtool.checkpoints.files import read_state_dict, save_safetensors
from ldmtool.checkpoints.tiny import save_tiny_checkpoint, tiny_config, tiny_model
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


def _unet_params(doc):
    return doc["model"]["params"]["unet_config"]["params"]


BROKEN_CONFIGS = {
    "negative-width": lambda doc: _unet_params(doc).update(model_channels=-5),
    "zero-head-width": lambda doc: _unet_params(doc).update(num_head_channels=0),
    "no-levels": lambda doc: _unet_params(doc).update(channel_mult=[]),
    "params-list": lambda doc: doc["model"].update(params=[1, 2]),
    "negative-timesteps": lambda doc: doc["model"]["params"].update(timesteps=-3),
    "scale-text": lambda doc: doc["model"]["params"].update(scale_factor="x"),
    "ldmtool-list": lambda doc: doc.update(ldmtool=[1]),
    # The messages below came without the config's name, or the configs were taken (an invalid schedule).
    "unknown-target": lambda doc: doc["model"].update(target="os.system"),
    "unexpected-keyword": lambda doc: _unet_params(doc).update(bogus=1),
    "family-list": lambda doc: doc.setdefault("ldmtool", {}).update(family=["sd1", "sd2"]),
    "linear-start-2": lambda doc: doc["model"]["params"].update(linear_start=2.0),
    "linear-end-below-start": lambda doc: doc["model"]["params"].update(linear_start=0.02, linear_end=0.001),
    "negative-linear-start": lambda doc: doc["model"]["params"].update(linear_start=-0.01),
    "nan-linear-end": lambda doc: doc["model"]["params"].update(linear_end=float("nan")),
}


@pytest.mark.parametrize("name", BROKEN_CONFIGS)
def test_a_config_whose_values_cannot_build_a_network_is_one_line(tmp_path, capsys, name):
    doc = copy.deepcopy(tiny_config("ldm-cin256-v2"))
    BROKEN_CONFIGS[name](doc)
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(doc))
    save_tiny_checkpoint(tmp_path / "m.safetensors", "ldm-cin256-v2")
    with pytest.raises(CheckpointError, match=f"{name}.yaml"):
        load_model(tmp_path / "m.safetensors", config=config)
    for command in (["inspect", tmp_path / "m.safetensors"], ["convert", tmp_path / "m.safetensors", tmp_path / "o.safetensors"]):
        code, out, err = run(capsys, "models", *command, "--config", config)
        if out:  # inspect's report names the config that does not fit as its problem (and exits 3)
            assert command[0] == "inspect" and code == 3 and f"{name}.yaml" in out and "matches config:  no" in out
        else:
            assert_one_line(code, err, f"{name}.yaml", codes=(3,))
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_writes_any_valid_file_name_and_leaves_other_writers_temporaries_alone(tmp_path, capsys, kl_f4):
    save_safetensors(kl_f4.state_dict(), tmp_path / "m.safetensors")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(kl_f4.config))
    longest = tmp_path / ("a" * (255 - len(".safetensors")) + ".safetensors")  # 255 bytes: a valid name
    another_writers = tmp_path / ".out.safetensors.tmp"  # what another process was writing to out.safetensors
    another_writers.write_bytes(b"partial")
    for dst in (longest, tmp_path / "out.safetensors"):
        code, out, err = run(capsys, "models", "convert", tmp_path / "m.safetensors", dst)
        assert code == 0, err
        assert load_model(dst).family == "kl-f4"
    assert another_writers.read_bytes() == b"partial"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".out.safetensors.tmp", "m.safetensors", "m.yaml", "out.safetensors", longest.name])


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_checkpoint_pickled_with_protocol_4_is_explained_in_one_line(tmp_path, capsys, recwarn, kl_f4, zip_format):
    path = tmp_path / "p4.ckpt"
    torch.save({"state_dict": kl_f4.state_dict()}, path, pickle_protocol=4, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert "pickle protocol 4" in str(err.value) and "arbitrary code" not in str(err.value)
    code, out, err_text = run(capsys, "models", "inspect", path, "--preset", "kl-f4")
    assert_one_line(code, err_text, "p4.ckpt", codes=(3,))
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]  # torch's warning stays off stderr


def test_config_and_preset_together_are_a_usage_error_not_a_silent_choice(tmp_path, capsys, kl_f4):
    save_safetensors(kl_f4.state_dict(), tmp_path / "m.safetensors")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(kl_f4.config))
    for command in (["inspect", tmp_path / "m.safetensors"], ["convert", tmp_path / "m.safetensors", tmp_path / "o.safetensors"]):
        code, out, err = run(capsys, "models", *command, "--config", tmp_path / "c.yaml", "--preset", "sd1")
        assert_one_line(code, err, "--preset sd1", codes=(2,))
    assert not (tmp_path / "o.safetensors").exists()


def test_a_mismatch_within_the_family_does_not_say_the_weights_look_like_that_family(tmp_path, kl_f4):
    state = dict(kl_f4.state_dict())
    state["encoder.conv_in.bias"] = torch.zeros(0)  # a zero-size tensor where a bias belongs
    save_safetensors(state, tmp_path / "z.safetensors")
    (tmp_path / "z.yaml").write_text(yaml.safe_dump(kl_f4.config))  # its recipe: family kl-f4
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "z.safetensors")
    assert "encoder.conv_in.bias: file (0,)" in str(err.value) and "look like" not in str(err.value)


@pytest.mark.parametrize("fifo", ["vae/diffusion_pytorch_model.safetensors", "transformer/config.json"])
def test_a_fifo_inside_a_diffusers_folder_is_refused_not_waited_on(tmp_path, fifo):
    folder = tmp_path / "pipe"
    (folder / Path(fifo).parent).mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    os.mkfifo(folder / fifo)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        loading = pool.submit(load_model, folder)
        try:
            error = loading.exception(timeout=20)
        except concurrent.futures.TimeoutError:
            with open(folder / fifo, "wb"):  # let the blocked reader go, so the test can end
                pass
            pytest.fail("reading the folder waited on a FIFO")
    assert isinstance(error, CheckpointError) and "a FIFO" in str(error) and fifo in str(error)


def test_a_safetensors_file_without_tensors_says_so(tmp_path, capsys):
    save_safetensors({}, tmp_path / "empty.safetensors", metadata={"note": "nothing here"})
    for command in (["inspect", tmp_path / "empty.safetensors"],
                    ["convert", tmp_path / "empty.safetensors", tmp_path / "o.safetensors"]):
        code, out, err = run(capsys, "models", *command)
        assert_one_line(code, err, "empty.safetensors: contains no tensors", codes=(3,))


@pytest.mark.parametrize("wrap", [lambda sd: {"model": sd, "epoch": 3}, lambda sd: {"ema": sd},
                                  lambda sd: {"state_dict": {"state_dict": sd}}, lambda sd: {"module": sd}],
                         ids=["model", "ema", "state_dict-twice", "module"])
def test_a_checkpoint_whose_tensors_sit_under_one_entry_is_unwrapped(tmp_path, kl_f4, wrap):
    torch.save(wrap(kl_f4.state_dict()), tmp_path / "w.ckpt")
    loaded = load_model(tmp_path / "w.ckpt", config=kl_f4.config)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in kl_f4.state_dict().items())


def test_a_checkpoint_with_several_state_dicts_names_them(tmp_path, capsys, kl_f4):
    torch.save({"model": kl_f4.state_dict(), "ema": kl_f4.state_dict(), "opt": {"state": {}}}, tmp_path / "two.ckpt")
    code, _, err = run(capsys, "models", "inspect", tmp_path / "two.ckpt", "--preset", "kl-f4")
    assert_one_line(code, err, "two.ckpt: holds several state dicts ('model', 'ema')", codes=(3,))


def test_a_looping_or_dangling_link_is_named_as_such(tmp_path, capsys):
    os.symlink("b.safetensors", tmp_path / "a.safetensors")
    os.symlink("a.safetensors", tmp_path / "b.safetensors")
    os.symlink("gone.safetensors", tmp_path / "dangling.safetensors")
    for name in ("a.safetensors", "dangling.safetensors"):
        code, out, err = run(capsys, "models", "inspect", tmp_path / name)
        assert_one_line(code, err, name, codes=(2,))
        assert "symbolic link" in err
