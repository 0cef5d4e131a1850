"""A1111's names where users read them (issue 19): sampler names and 'Schedule type' in the PNG `parameters`,
'Denoising strength', 'Lora hashes', no empty first line; `--sampler` takes A1111's names. sd-parsers (a
test-only dependency, an independent reader of A1111's format) reads them back from an ldmtool PNG."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldmtool.addons.networks import network_hash
from ldmtool.checkpoints.files import save_safetensors
from ldmtool.checkpoints.tiny import save_tiny_checkpoint
from ldmtool.cli.app import main
from ldmtool.diffusion.names import A1111_SAMPLERS, KARRAS_BY_DEFAULT, SIGMA_SAMPLERS, sampler_name
from ldmtool.diffusion.samplers import SAMPLERS
from ldmtool.diffusion.schedules import Spacing


def test_every_sampler_has_an_a1111_name_that_names_it_back():
    assert set(A1111_SAMPLERS) == set(SAMPLERS)
    for name, label in A1111_SAMPLERS.items():
        assert sampler_name(label) == (name, None) and sampler_name(label.upper()) == (name, None)
    assert sampler_name("DPM++ 2M Karras") == ("dpmpp_2m", True)
    assert KARRAS_BY_DEFAULT == {n for n, info in SAMPLERS.items() if info.spacing is Spacing.KARRAS}
    assert SIGMA_SAMPLERS == {n for n, info in SAMPLERS.items() if info.spacing is not Spacing.LEADING}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("names")
    path = folder / "sd1.safetensors"
    save_tiny_checkpoint(path, "sd1", with_config=True)
    lora = folder / "fox-style.safetensors"
    g = torch.Generator().manual_seed(1)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_safetensors({f"{key}.lora_down.weight": torch.randn(2, 32, generator=g),
                      f"{key}.lora_up.weight": torch.randn(32, 2, generator=g), f"{key}.alpha": torch.tensor(1.0)},
                     lora)
    return path, lora


def _run(*args):
    try:
        main([*map(str, args), "--steps", "2", "--seed", "3", "--quiet"])
    except SystemExit as exit:
        assert not exit.code


def test_sampler_option_takes_a1111_names(model, tmp_path):
    path, _ = model
    for name, out in (("dpmpp_2m", "a.png"), ("DPM++ 2M", "b.png")):
        _run("txt2img", "--prompt", "a fox", "--model", path, "-W", 64, "-H", 64, "--sampler", name, "-o", tmp_path / out)
    a, b = (Image.open(tmp_path / name) for name in ("a.png", "b.png"))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale" in b.info["parameters"]
    _run("txt2img", "--prompt", "a fox", "--model", path, "-W", 64, "-H", 64, "--sampler", "Euler a", "-o",
         tmp_path / "c.png")
    assert "Sampler: Euler a, Schedule type: Uniform," in Image.open(tmp_path / "c.png").info["parameters"]


def test_sd_parsers_reads_sampler_schedule_strength_and_lora_hashes(model, tmp_path):
    from sd_parsers import ParserManager

    path, lora = model
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(source)
    out = tmp_path / "out.png"
    _run("img2img", source, "--prompt", "a red fox", "--negative", "blurry", "--strength", 0.6, "--model", path,
         "--sampler", "DPM++ 2M", "--lora", f"{lora}:0.7", "-o", out)
    text = Image.open(out).info["parameters"]
    assert not text.startswith("\n")
    assert f'Lora hashes: "fox-style: {network_hash(lora)}"' in text
    info = ParserManager().parse(out)
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    (sampler,) = info.samplers
    assert sampler.name == "DPM++ 2M"
    assert sampler.parameters["scheduler"] == "Karras"
    assert [p.value for p in sampler.prompts] == ["a red fox"]
    assert [p.value for p in sampler.negative_prompts] == ["blurry"]
    assert info.metadata["Denoising strength"] == "0.6"
    assert info.metadata["Hashes"]["lora:fox-style"] == network_hash(lora)
