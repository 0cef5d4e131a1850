"""`ldmtool models list|inspect|convert`, driven through the CLI entry point."""
import json
import os

import pytest
import torch
import yaml

from clirun import run_cli
from ldmtool import load_model
from ldmtool.checkpoints.presets import RELEASED_FAMILIES, preset_names
from ldmtool.checkpoints.tiny import save_tiny_checkpoint, tiny_config
from ldmtool.checkpoints.weights import ema_key
from ldmtool.cli.app import main

torch.set_num_threads(1)


def run(capsys, *argv):
    try:
        main(list(map(str, argv)))
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_shows_every_preset(capsys):
    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and all(name in out for name in preset_names()) and "Shipped models" in out
    code, out, _ = run(capsys, "models", "list", "--json")
    data = json.loads(out)
    assert [p["name"] for p in data["presets"]] == preset_names() and isinstance(data["shipped"], list)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """One small random checkpoint per family, with its config written beside it as <family>.cfg.yaml."""
    folder = tmp_path_factory.mktemp("tiny")
    for family in RELEASED_FAMILIES:
        save_tiny_checkpoint(folder / f"{family}.safetensors", family, seed=2)
        (folder / f"{family}.cfg.yaml").write_text(yaml.safe_dump(tiny_config(family), sort_keys=False))
    return folder


@pytest.mark.parametrize("family", RELEASED_FAMILIES)
def test_inspect_names_the_family_with_and_without_config(capsys, tiny_files, family):
    ckpt = tiny_files / f"{family}.safetensors"
    code, out, _ = run(capsys, "models", "inspect", ckpt, "--json")
    report = json.loads(out)
    assert family in (report["detected_family"], *report["detected_alternatives"])
    assert code == (0 if report["matches"] else 3)  # tiny UNet widths do not load as the full-size preset
    code, out, _ = run(capsys, "models", "inspect", ckpt, "--config", tiny_files / f"{family}.cfg.yaml", "--json")
    report = json.loads(out)
    assert code == 0 and report["family"] == family and report["matches"] and report["problem"] is None
    assert report["dtype"] == "float32" and not report["ema_present"]
    assert report["parameters_total"] == sum(report["parameters"].values()) > 0


def test_inspect_text_output_and_mismatch(capsys, tiny_files):
    code, out, _ = run(capsys, "models", "inspect", tiny_files / "sd1.safetensors", "--preset", "sd2")
    assert code == 3  # the report, and the exit code scripts need: the file would not load as sd2
    assert "family:          sd2" in out and "detected:        sd1" in out and "matches config:  no" in out
    assert "unet:" in out and "cond_stage:" in out
    code, _, err = run(capsys, "models", "inspect", "sd1")
    assert code == 2 and "is a preset" in err and len(err.strip().splitlines()) == 1


def test_inspect_exits_3_when_the_file_would_not_load_as_described(capsys, tiny_files, tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "bad.yaml").write_text("a: [\n")
    ckpt = tiny_files / "sd1.safetensors"
    for config in ("folder.yaml", "fifo.yaml", "bad.yaml"):
        code, out, _ = run(capsys, "models", "inspect", ckpt, "--config", tmp_path / config, "--json")
        report = json.loads(out)
        assert code == 3 and not report["matches"] and config in report["problem"]
    code, out, _ = run(capsys, "models", "inspect", ckpt, "--preset", "sd2", "--json")
    assert code == 3 and "does not match the sd2 architecture" in json.loads(out)["problem"]
    code, _, err = run(capsys, "models", "inspect", ckpt, "--config", tmp_path / "missing.yaml")
    assert code == 2 and "config file not found" in err


def _with_ema(tmp_path, family):
    bundle = save_tiny_checkpoint(tmp_path / "raw.safetensors", family, seed=4)
    state = bundle.state_dict()
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v * 0.5 for k, v in state.items() if k.startswith("model.")}
    torch.save({"state_dict": {**state, **ema, "model_ema.num_updates": torch.tensor(3)}}, tmp_path / "in.ckpt")
    return bundle, state


def test_convert_merges_ema_and_reloads_with_identical_outputs(capsys, tmp_path):
    bundle, state = _with_ema(tmp_path, "sd2-x4-upscaler")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(bundle.config))
    code, out, err = run(capsys, "models", "convert", tmp_path / "in.ckpt", tmp_path / "out.safetensors", "--config", cfg)
    assert code == 0, err
    assert "EMA merged" in out
    direct = load_model(tmp_path / "in.ckpt", config=cfg)
    converted = load_model(tmp_path / "out.safetensors")  # config travels in the file's metadata
    assert converted.family == "sd2-x4-upscaler" and converted.parameterization == "v"
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(converted.state_dict()[key], state[key] * 0.5)
    x = torch.randn(1, 7, 8, 8)
    t, y, ctx = torch.tensor([50]), torch.tensor([20]), torch.randn(1, 5, 32)
    with torch.no_grad():
        a, b = direct.unet(x, t, context=ctx, y=y), converted.unet(x, t, context=ctx, y=y)
    assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert set(converted.state_dict()) == set(bundle.state_dict())


def test_partial_ema_is_merged_as_the_reference_does_and_said_in_one_line(capsys, tmp_path):
    bundle = save_tiny_checkpoint(tmp_path / "raw.safetensors", "ldm-celebahq256", seed=4)
    state = bundle.state_dict()
    network = [k for k in state if k.startswith("model.")]
    half = network[: len(network) // 2]
    torch.save({"state_dict": {**state, **{ema_key(k): state[k] * 0.5 for k in half}}}, tmp_path / "part.ckpt")
    (tmp_path / "part.yaml").write_text(yaml.safe_dump(bundle.config))  # found beside the weights
    note = f"part.ckpt: EMA copies (model_ema.*) for only {len(half)} of {len(network)} network weights"
    code, out, err = run(capsys, "models", "convert", tmp_path / "part.ckpt", tmp_path / "out.safetensors")
    assert code == 0 and "EMA merged" in out and err.count("ldmtool: warning:") == 1 and note in err
    merged = load_model(tmp_path / "out.safetensors").state_dict()
    assert all(torch.equal(merged[k], state[k] * (0.5 if k in half else 1)) for k in network)
    code, out, _ = run(capsys, "models", "inspect", tmp_path / "part.ckpt", "--json")
    report = json.loads(out)
    assert code == 0 and report["ema_missing"] == len(network) - len(half) and note in report["ema_note"]
    result = run_cli("sample", "--model", tmp_path / "part.ckpt", "--steps", 1, "--width", 32, "--height", 32,
                     "-o", tmp_path / "samples")
    assert result.exit_code == 0 and result.stderr.count(note) == 1, result.output
    code, _, err = run(capsys, "models", "convert", tmp_path / "part.ckpt", tmp_path / "raw2.safetensors", "--no-ema")
    assert code == 0 and "warning" not in err


def test_convert_fp16_and_no_ema(capsys, tmp_path):
    bundle, state = _with_ema(tmp_path, "ldm-cin256-v2")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(bundle.config))
    code, out, _ = run(capsys, "models", "convert", tmp_path / "in.ckpt", tmp_path / "h.safetensors", "--config", cfg,
                       "--fp16", "--no-ema", "--json")
    result = json.loads(out)
    assert code == 0 and result["dtype"] == "float16" and result["ema_used"] is False
    from safetensors.torch import load_file

    raw = load_file(tmp_path / "h.safetensors")
    key = "model.diffusion_model.out.2.weight"
    assert raw[key].dtype == torch.float16 and raw["alphas_cumprod"].dtype == torch.float32
    assert torch.equal(raw[key], state[key].half())
    code, out, _ = run(capsys, "models", "inspect", tmp_path / "h.safetensors", "--json")
    report = json.loads(out)
    assert report["family"] == "ldm-cin256-v2" and report["matches"] and report["dtype"] == "float16"
    assert report["config_used"] == "config stored in the file"


def test_convert_refuses_other_output_types(capsys, tmp_path):
    save_tiny_checkpoint(tmp_path / "a.safetensors", "kl-f4")
    code, _, err = run(capsys, "models", "convert", tmp_path / "a.safetensors", tmp_path / "b.ckpt")
    assert code == 2 and ".safetensors" in err


def test_convert_to_a_path_under_a_file_says_that_it_is_a_file(capsys, tmp_path):
    save_tiny_checkpoint(tmp_path / "a.safetensors", "kl-f4")
    (tmp_path / "afile").write_text("x")
    for dst in (tmp_path / "afile" / "b.safetensors", tmp_path / "afile" / "sub" / "b.safetensors"):
        code, _, err = run(capsys, "models", "convert", tmp_path / "a.safetensors", dst)
        assert code == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in err and "does not exist" not in err
    code, _, err = run(capsys, "models", "convert", tmp_path / "a.safetensors", tmp_path / "none" / "b.safetensors")
    assert code == 2 and "output folder does not exist" in err


def test_convert_fp16_keeps_the_latent_scale_exact(capsys, tmp_path):
    code, _, err = run(capsys, "models", "convert", "default-txt2img", tmp_path / "h.safetensors", "--fp16")
    assert code == 0, err
    original = load_model("default-txt2img", dtype=None).state_dict()["scale_factor"]
    converted = load_model(tmp_path / "h.safetensors", dtype=None).state_dict()["scale_factor"]
    assert converted.dtype == torch.float32 and torch.equal(converted, original)


def test_inspect_reports_a_controlnet(capsys):
    code, out, err = run(capsys, "models", "inspect", "default-canny", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["matches"] is True and report["family"] == "default-canny"
    assert report["parameters"] == {"controlnet": report["parameters_total"]} and report["parameterization"] is None
