"""`--vae FILE` (issue 19): a standalone VAE written in the CompVis layout and in diffusers' `AutoencoderKL`
layout (by diffusers' own converter, the test-only oracle) gives the image of a checkpoint that holds the
same VAE weights inside it; the tiled decode agrees with the untiled one with it; bad files are one line."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldmtool.checkpoints.files import save_safetensors
from ldmtool.checkpoints.tiny import randomise_, tiny_model
from ldmtool.cli.app import main
from ldmtool.options import ModelChoice, SamplingChoice
from ldmtool.pipelines.engine import Engine

PREFIX = "first_stage_model."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import yaml
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    folder = tmp_path_factory.mktemp("vae")
    base = randomise_(tiny_model("sd1"), seed=7, scale=0.3)
    other = randomise_(tiny_model("sd1"), seed=8, scale=0.3)  # its first stage is "the fine-tuned VAE"
    state = base.state_dict()
    vae = {k: v for k, v in other.state_dict().items() if k.startswith(PREFIX)}
    config = yaml.safe_dump(base.config, sort_keys=False)
    save_safetensors(state, folder / "model.safetensors")
    save_safetensors({**state, **vae}, folder / "merged.safetensors")  # the same VAE inside the checkpoint
    for name in ("model", "merged"):
        (folder / f"{name}.yaml").write_text(config)
    save_safetensors({k.removeprefix(PREFIX): v for k, v in vae.items()}, folder / "vae-compvis.safetensors")
    diffusers_config = create_vae_diffusers_config_from_ldm(base.config, vae)
    converted = convert_ldm_vae_checkpoint(vae, diffusers_config)
    assert any(k.startswith("decoder.up_blocks.") for k in converted)
    save_safetensors({k: v.contiguous() for k, v in converted.items()}, folder / "vae-diffusers.safetensors")
    return folder


def _txt2img(folder, model, name, *extra):
    out = folder / f"{name}.png"
    try:
        main(["txt2img", "--prompt", "a red fox", "--model", str(folder / model), "-W", "64", "-H", "64", "--steps",
              "3", "--seed", "4", "--quiet", "-o", str(out), *extra])
    except SystemExit as exit:
        assert not exit.code
    with Image.open(out) as image:
        return np.asarray(image).astype(int), image.info["parameters"]


def test_vae_files_in_both_layouts_give_the_image_of_the_checkpoint_holding_that_vae(files):
    merged, _ = _txt2img(files, "merged.safetensors", "merged")
    own, _ = _txt2img(files, "model.safetensors", "own")
    compvis, text = _txt2img(files, "model.safetensors", "compvis", "--vae", str(files / "vae-compvis.safetensors"))
    diffusers, _ = _txt2img(files, "model.safetensors", "diffusers", "--vae", str(files / "vae-diffusers.safetensors"))
    assert np.array_equal(compvis, merged)
    assert np.abs(diffusers - merged).max() <= 1  # layout conversion only: the same weights
    assert np.abs(own - merged).max() > 10  # control: the VAE matters
    assert "VAE: vae-compvis.safetensors" in text and "VAE hash: " in text


def test_tiled_decode_agrees_with_the_untiled_one_with_an_external_vae(files):
    choice = ModelChoice(model=str(files / "model.safetensors"), vae=files / "vae-diffusers.safetensors", device="cpu")
    latent = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    untiled = Engine(choice, SamplingChoice(vae_tile=0)).open().decode_pixels(latent)
    tiled = Engine(choice, SamplingChoice(vae_tile=8)).open().decode_pixels(latent)
    assert (tiled.int() - untiled.int()).abs().max() <= 1


def test_a_vae_for_another_model_is_one_clear_error(files, tmp_path, capsys):
    save_safetensors({"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, tmp_path / "bad.safetensors")
    save_safetensors({"unet.x": torch.zeros(2)}, tmp_path / "odd.safetensors")
    for name, words in (("bad", "missing"), ("odd", "not a VAE file")):
        with pytest.raises(SystemExit) as exit:
            main(["txt2img", "--prompt", "x", "--model", str(files / "model.safetensors"), "--vae",
                  str(tmp_path / f"{name}.safetensors"), "--quiet", "-o", str(tmp_path / "x.png")])
        assert exit.value.code == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{name}.safetensors" in err[0] and words in err[0]
