"""Checkpoints: released key layouts for every family, safe reading, EMA, strict loading, detection."""
import gzip
import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from clirun import run_cli
from ldmtool import build_model, load_model
from ldmtool.checkpoints.api import _load_into
from ldmtool.checkpoints.detect import detect_family
from ldmtool.checkpoints.files import read_state_dict, save_safetensors, weights_only_vulnerabilities
from ldmtool.checkpoints.presets import RELEASED_FAMILIES, load_preset, preset_names
from ldmtool.checkpoints.tiny import save_tiny_checkpoint, tiny_config, tiny_model
from ldmtool.checkpoints.transformer_bundle import TRANSFORMER_BUNDLE
from ldmtool.checkpoints.weights import prepare_weights
from ldmtool.errors import CheckpointError, UsageError
from ldmtool.train.common import STATE_FILE, load_state

torch.set_num_threads(1)
DATA = Path(__file__).parent / "data"
SD_FAMILIES = ["sd1", "sd1-inpainting", "sd2", "sd2-v", "sd2-inpainting", "sd2-x4-upscaler"]
# Families without reference configs (ldmtool.TransformerBundle: FLUX.1, SD3) have no entry in the key
# list below: their released keys are checked against diffusers' own models in their test files.
FAMILIES = sorted(f for f in RELEASED_FAMILIES if load_preset(f)["model"]["target"] != TRANSFORMER_BUNDLE)


def _expected_keys() -> dict:
    """Key -> shape of each family's released checkpoint (minus training-only extras such as model_ema.*,
    loss.*, CLIP position_ids). Established from the reference configs; the SD entries are cross-checked
    below with diffusers' converters and the LDM ones with the parameter counts the papers publish."""
    return json.loads(gzip.decompress((DATA / "checkpoint_keys.json.gz").read_bytes()))


def _shapes(state) -> dict:
    return {k: list(v.shape) for k, v in state.items()}


# --- full-size presets: exactly the released keys and shapes, on the meta device -----------------------

def test_every_family_has_a_preset_and_an_expected_key_list():
    assert len(FAMILIES) == 30 and set(SD_FAMILIES) <= set(FAMILIES)
    assert sorted(_expected_keys()) == FAMILIES and set(FAMILIES) <= set(preset_names())


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_preset_on_meta_has_the_released_keys_and_shapes(family):
    bundle = build_model(family, device="meta")
    assert all(p.is_meta for p in bundle.parameters())
    assert _shapes(bundle.state_dict()) == _expected_keys()[family]


def _count(keys: dict, prefix: str) -> int:
    return sum(math.prod(shape) for k, shape in keys.items() if k.startswith(prefix))


def test_parameter_counts_match_published_figures():
    keys = _expected_keys()
    unet, first, cond = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
    assert _count(keys["sd1"], unet) == 859_520_964  # SD 1.x UNet
    assert _count(keys["sd2"], unet) == 865_910_724  # SD 2.x UNet
    assert _count(keys["sd1"], first) == 83_653_863  # kl-f8 VAE
    assert _count(keys["sd1"], cond) == 123_060_480  # CLIP ViT-L/14 text
    assert _count(keys["kl-f8"], "") == 83_653_863
    # LDM paper (Rombach et al. 2022) model sizes, in millions
    for family, millions in [("ldm-celebahq256", 274), ("ldm-ffhq256", 274), ("ldm-lsun-bedrooms256", 274),
                             ("ldm-lsun-churches256", 294), ("ldm-cin256-v2", 400), ("ldm-inpainting-big", 387)]:
        assert _count(keys[family], unet) // 1_000_000 == millions, family
    assert round((_count(keys["ldm-txt2img-1p4b"], unet) + _count(keys["ldm-txt2img-1p4b"], cond)) / 1e7) == 145


@pytest.mark.parametrize("family", SD_FAMILIES)
def test_sd_presets_convert_with_diffusers_into_its_models_strictly(family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    doc = load_preset(family)
    state = build_model(doc, device="meta").state_dict()
    unet_config = sfu.create_unet_diffusers_config_from_ldm(doc, state)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(doc, state)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
    assert _shapes(sfu.convert_ldm_unet_checkpoint(state, unet_config)) == _shapes(unet.state_dict())
    assert _shapes(sfu.convert_ldm_vae_checkpoint(state, vae_config)) == _shapes(vae.state_dict())


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_sd_text_encoders_convert_with_diffusers_into_clip_text_model_strictly(family):
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    state = build_model(family, device="meta").state_dict()
    if family == "sd1":
        config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        with torch.device("meta"):
            text = CLIPTextModel(config)
        converted = sfu.convert_ldm_clip_checkpoint(state)
    else:  # diffusers' SD 2 text encoder: 23 layers of ViT-H (the penultimate output)
        config = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                                hidden_act="gelu", projection_dim=1024)
        with torch.device("meta"):
            text = CLIPTextModel(config)
        converted = sfu.convert_open_clip_checkpoint(text, state)
        converted.pop("text_projection.weight", None)  # CLIPTextModel has no projection
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    assert _shapes(converted) == _shapes(text.state_dict())


def test_sd_schedule_buffers_equal_diffusers_scaled_linear_schedule():
    from diffusers import DDPMScheduler

    bundle = build_model(tiny_config("sd1"))
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert torch.allclose(bundle.alphas_cumprod, ref, atol=1e-6)
    assert bundle.alphas_cumprod.dtype == torch.float32 and bundle.scale_factor == 0.18215


# --- detection -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_detection_names_the_family_of_a_small_model(family):
    with torch.device("meta"):
        state = build_model(tiny_config(family), device="meta").state_dict()
    found = detect_family({k: tuple(v.shape) for k, v in state.items()})
    assert found is not None and family in (found.family, *found.alternatives)
    full = detect_family({k: tuple(v) for k, v in _expected_keys()[family].items()})
    assert full == found


# --- loading: round trips, EMA, extras, strictness -------------------------------------------------

def _unet_inputs(bundle, batch=2, size=8):
    p = bundle.config["model"]["params"]["unet_config"]["params"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, p["in_channels"], size, size, generator=g)
    t = torch.tensor([10, 500])[:batch]
    ctx = torch.randn(batch, 5, p["context_dim"], generator=g) if p.get("context_dim") else None
    y = torch.tensor([3, 7])[:batch] if p.get("num_classes") else None
    return x, t, ctx, y


@pytest.mark.parametrize("family, suffix", [("sd1", ".safetensors"), ("sd2-x4-upscaler", ".ckpt"),
                                            ("ldm-inpainting-big", ".safetensors")])
def test_saved_then_loaded_model_gives_identical_outputs(tmp_path, family, suffix):
    original = save_tiny_checkpoint(tmp_path / f"m{suffix}", family, seed=1)
    loaded = load_model(tmp_path / f"m{suffix}", config=original.config)
    assert loaded.family == family and not loaded.training
    loaded_state = loaded.state_dict()
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded_state[name], tensor), name
    # Weights are bit-identical; outputs may differ in the last bit because memory-mapped tensors can
    # sit at other alignments, which changes the CPU kernels' summation order.
    x, t, ctx, y = _unet_inputs(original)
    with torch.no_grad():
        assert torch.allclose(loaded.unet(x, t, context=ctx, y=y), original.unet(x, t, context=ctx, y=y), rtol=0, atol=1e-6)
        z = torch.randn(1, original.first_stage.post_quant_conv.in_channels, 4, 4)
        assert torch.allclose(loaded.first_stage.decode(z), original.first_stage.decode(z), rtol=0, atol=1e-6)


def test_loading_assigns_checkpoint_tensors_without_copying():
    bundle = build_model(tiny_config("kl-f4"), device="meta")
    state = tiny_model("kl-f4").state_dict()
    _load_into(bundle, prepare_weights(state), source="mem", family="kl-f4", detection=None)
    assert all(bundle.state_dict()[k].data_ptr() == v.data_ptr() for k, v in state.items())


def test_ema_weights_are_used_unless_disabled(tmp_path):
    bundle = tiny_model("ldm-cin256-v2")
    state = bundle.state_dict()
    key = "model.diffusion_model.out.2.weight"
    ema = {"model_ema." + k[len("model."):].replace(".", ""): torch.full_like(v, 0.5)
           for k, v in state.items() if k.startswith("model.")}
    torch.save({"state_dict": {**state, **ema, "model_ema.decay": torch.tensor(0.9999),
                               "model_ema.num_updates": torch.tensor(7)}}, tmp_path / "ema.ckpt")
    with_ema = load_model(tmp_path / "ema.ckpt", config=bundle.config)
    without = load_model(tmp_path / "ema.ckpt", config=bundle.config, use_ema=False)
    assert with_ema.state_dict()[key].eq(0.5).all() and with_ema.load_info.ema_present
    assert torch.equal(without.state_dict()[key], state[key])
    assert torch.equal(with_ema.first_stage.encoder.conv_in.weight, bundle.first_stage.encoder.conv_in.weight)


def test_harmless_extras_are_dropped_and_schedule_buffers_may_be_absent(tmp_path):
    bundle = tiny_model("sd1")
    state = {k: v for k, v in bundle.state_dict().items() if k not in ("betas", "alphas_cumprod")}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    state["model_ema.decay"] = torch.tensor(0.999)
    save_safetensors(state, tmp_path / "x.safetensors")
    loaded = load_model(tmp_path / "x.safetensors", config=bundle.config)
    assert torch.equal(loaded.alphas_cumprod, bundle.alphas_cumprod)
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" not in loaded.state_dict()
    with torch.inference_mode():
        assert torch.equal(loaded.cond_stage.encode(["a red fox"]), bundle.cond_stage.encode(["a red fox"]))


def test_scale_factor_buffer_of_scale_by_std_models_round_trips(tmp_path):
    bundle = tiny_model("ldm-lsun-churches256")
    state = bundle.state_dict()
    assert float(state["scale_factor"]) == pytest.approx(0.22765929)
    state["scale_factor"] = torch.tensor(0.5)
    save_safetensors(state, tmp_path / "c.safetensors")
    assert load_model(tmp_path / "c.safetensors", config=bundle.config).scale_factor == 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_a_stored_scale_factor_is_harmless_for_every_family(tmp_path, family):
    """Only scale_by_std models take the file's value (the reference keeps it as a buffer then); the others
    keep the config's, as the reference's non-strict load ignores the key."""
    bundle = tiny_model(family)
    state = bundle.state_dict()
    state["scale_factor"] = torch.tensor(0.5)
    save_safetensors(state, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors", config=bundle.config)
    takes_stored = bundle.config["model"].get("params", {}).get("scale_by_std", False)
    assert loaded.scale_factor == (0.5 if takes_stored else bundle.scale_factor)


def test_shared_first_and_cond_stage_load_from_either_copy(tmp_path):
    bundle = tiny_model("ldm-inpainting-big")
    state = {k: v for k, v in bundle.state_dict().items() if not k.startswith("cond_stage_model.")}
    save_safetensors(state, tmp_path / "i.safetensors")
    loaded = load_model(tmp_path / "i.safetensors", config=bundle.config)
    assert loaded.cond_stage is loaded.first_stage and loaded.conditioning_key == "concat"


def test_prediction_comes_from_config_and_can_be_overridden(tmp_path):
    save_tiny_checkpoint(tmp_path / "v.safetensors", "sd2-v")
    assert load_model(tmp_path / "v.safetensors", config=tiny_config("sd2-v")).parameterization == "v"
    assert load_model(tmp_path / "v.safetensors", config=tiny_config("sd2-v"), prediction="eps").parameterization == "eps"
    with pytest.raises(UsageError):
        load_model(tmp_path / "v.safetensors", config=tiny_config("sd2-v"), prediction="velocity")


def test_other_family_gives_one_line_error_naming_the_likely_family(tmp_path):
    save_tiny_checkpoint(tmp_path / "sd1.safetensors", "sd1")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "sd1.safetensors", config=tiny_config("ldm-cin256-v2"))
    message = str(err.value)
    assert "\n" not in message and "ldm-cin256-v2" in message and "look like sd1" in message
    assert "missing" in message and "unexpected" in message


def test_fp16_load_keeps_schedule_in_fp32(tmp_path):
    save_tiny_checkpoint(tmp_path / "h.safetensors", "kl-f4")
    save_tiny_checkpoint(tmp_path / "s.safetensors", "sd1")
    assert load_model(tmp_path / "h.safetensors", config=tiny_config("kl-f4")).first_stage.encoder.conv_in.weight.dtype == torch.float32
    half = load_model(tmp_path / "s.safetensors", config=tiny_config("sd1"), dtype=torch.float16)
    assert half.unet.out[2].weight.dtype == torch.float16 and half.alphas_cumprod.dtype == torch.float32


# --- unsafe and broken files -----------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode(str(marker))}, tmp_path / "evil.ckpt")
    assert not marker.exists()
    with pytest.raises(CheckpointError) as err:
        read_state_dict(tmp_path / "evil.ckpt")
    assert "never runs" in str(err.value) and "safetensors" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_legacy_pickle_with_code_is_refused_too(tmp_path):
    marker = tmp_path / "pwned2"
    with open(tmp_path / "old.pt", "wb") as f:
        pickle.dump({"x": _RunsCode(str(marker))}, f, protocol=2)
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "old.pt")
    assert not marker.exists()


@pytest.mark.parametrize("version, cves", [
    ("2.1.0", ["CVE-2025-32434", "CVE-2026-24747"]), ("2.5.1+cu121", ["CVE-2025-32434", "CVE-2026-24747"]),
    ("2.6.0", ["CVE-2026-24747"]), ("2.9.1+cpu", ["CVE-2026-24747"]), ("2.10.0", []), ("2.10.0a0+git1a2b", []),
    ("2.13.0+cpu", []), ("3.0", []), ("not a version", ["CVE-2025-32434", "CVE-2026-24747"]),
])
def test_weights_only_vulnerabilities_compare_releases_numerically(version, cves):
    assert weights_only_vulnerabilities(version) == cves


def test_pickle_checkpoints_are_refused_on_a_vulnerable_torch_and_safetensors_still_load(tmp_path, monkeypatch):
    save_tiny_checkpoint(tmp_path / "t.ckpt", "kl-f4")
    save_tiny_checkpoint(tmp_path / "t.safetensors", "kl-f4")
    torch.save({}, tmp_path / STATE_FILE)  # a training run's --resume state
    monkeypatch.setattr(torch, "__version__", "2.9.1+cpu")
    for path, read in [(tmp_path / "t.ckpt", read_state_dict), (tmp_path / STATE_FILE, lambda p: load_state(p.parent, {}))]:
        with pytest.raises(CheckpointError) as err:
            read(path)
        message = str(err.value)
        assert message.startswith(f"{path}: ") and "\n" not in message
        assert "CVE-2026-24747" in message and "safetensors" in message and "2.10" in message
    assert load_model(tmp_path / "t.safetensors", config=tiny_config("kl-f4")).family == "kl-f4"


def test_the_cli_refuses_a_pickle_checkpoint_on_a_vulnerable_torch_in_one_line(tmp_path, monkeypatch):
    save_tiny_checkpoint(tmp_path / "t.ckpt", "kl-f4")
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    result = run_cli("models", "inspect", tmp_path / "t.ckpt", "--preset", "kl-f4")
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "t.ckpt" in lines[0] and "CVE-2025-32434" in lines[0], result.output


def test_truncated_files_give_one_line_errors(tmp_path):
    save_tiny_checkpoint(tmp_path / "t.safetensors", "kl-f4")
    save_tiny_checkpoint(tmp_path / "t.ckpt", "kl-f4")
    for name in ("t.safetensors", "t.ckpt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError) as err:
            load_model(tmp_path / name)
        assert "\n" not in str(err.value) and name in str(err.value)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(tmp_path / "empty.safetensors")


def test_model_names_resolve_to_files_or_explain(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="is a preset"):
        load_model("sd1")
    with pytest.raises(UsageError, match="not a file, a shipped model"):
        load_model("no-such-model")
    with pytest.raises(UsageError, match="no such checkpoint file"):  # a missing file: usage error, exit 2
        load_model(tmp_path / "missing.ckpt")
    save_tiny_checkpoint(tmp_path / "mine.safetensors", "ldm-bsr-sr", with_config=True)
    bundle = load_model(tmp_path / "mine.safetensors")
    assert bundle.family == "ldm-bsr-sr" and "beside the weights" in bundle.load_info.config_used


def test_sd1_files_without_the_text_model_level_load(tmp_path):
    bundle = tiny_model("sd1")
    state = {k.replace("transformer.text_model.", "transformer."): v for k, v in bundle.state_dict().items()}
    save_safetensors(state, tmp_path / "old.safetensors")
    loaded = load_model(tmp_path / "old.safetensors", config=bundle.config)
    assert torch.equal(loaded.cond_stage.transformer.text_model.final_layer_norm.weight,
                       bundle.cond_stage.transformer.text_model.final_layer_norm.weight)


def test_lightning_checkpoint_with_callbacks_and_numpy_counters_loads(tmp_path, monkeypatch):
    """Released LDM .ckpt files carry a ModelCheckpoint callback and numpy scalars next to the weights."""
    import sys
    import types

    import numpy as np

    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    callback = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = callback
    bundle = tiny_model("kl-f4")
    torch.save({"state_dict": bundle.state_dict(), "callbacks": {callback: {"best_model_score": torch.tensor(0.5)}},
                "global_step": np.int64(10), "epoch": 3}, tmp_path / "last.ckpt")
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    loaded = load_model(tmp_path / "last.ckpt", config=tiny_config("kl-f4"))
    assert torch.equal(loaded.first_stage.decoder.conv_out.weight, bundle.first_stage.decoder.conv_out.weight)
