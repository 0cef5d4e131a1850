"""T2I-Adapter (full adapter, diffusers layout) against diffusers 0.42.1's `T2IAdapter` and its UNet's
`down_intrablock_additional_residuals`, on tiny random weights."""
import pytest
import torch

from ldmtool.checkpoints.tiny import randomise_, tiny_model


@pytest.fixture(scope="module")
def tiny():
    from diffusers import T2IAdapter

    from test_controlnet import diffusers_unet

    bundle = randomise_(tiny_model("sd1"), seed=7, scale=0.1)
    randomise_(bundle.first_stage_model, seed=8, scale=0.3)  # a decoder whose pixels follow the latent
    unet, config = diffusers_unet(bundle)
    theirs = randomise_(T2IAdapter(in_channels=3, channels=list(config["block_out_channels"]), num_res_blocks=2,
                                   adapter_type="full_adapter"), seed=4, scale=0.1).eval()
    return bundle, unet, theirs


@pytest.mark.parametrize("prefixed", [True, False])
def test_full_adapter_features_and_adapted_unet_equal_diffusers(tiny, tmp_path, prefixed):
    from ldmtool.addons.t2i_adapter import load_adapter
    from ldmtool.checkpoints.files import save_safetensors

    bundle, unet, theirs = tiny
    state = theirs.state_dict() if prefixed else {k.removeprefix("adapter."): v for k, v in theirs.state_dict().items()}
    save_safetensors(state, tmp_path / "t2iadapter_canny.safetensors")
    ours = load_adapter(tmp_path / "t2iadapter_canny.safetensors")
    g = torch.Generator().manual_seed(0)
    hint, x = torch.rand(1, 3, 64, 64, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    context, t = torch.randn(1, 77, 32, generator=g), torch.tensor([333])
    with torch.no_grad():
        mine, reference = ours(hint), theirs(hint)
        assert len(mine) == len(reference) == 4
        for a, b in zip(mine, reference):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-6 * b.abs().max()  # features reach ~100
        adapted = bundle.unet(x, t, context=context, adapter=[f * 0.8 for f in mine])
        expected = unet(x, t, context, down_intrablock_additional_residuals=[f * 0.8 for f in reference]).sample
        plain = bundle.unet(x, t, context=context)
    assert (adapted - expected).abs().max() < 1e-4
    assert (adapted - plain).abs().max() > 1e-2  # the features matter


def test_a_file_that_is_not_an_adapter_is_one_clear_error(tmp_path):
    from ldmtool.addons.t2i_adapter import load_adapter
    from ldmtool.checkpoints.files import save_safetensors
    from ldmtool.errors import CheckpointError

    save_safetensors({"conv_in.weight": torch.zeros(2, 2, 3, 3)}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="x.safetensors: not a T2I-Adapter"):
        load_adapter(tmp_path / "x.safetensors")


def test_txt2img_with_an_adapter_equals_diffusers_adapter_pipeline(tmp_path, tiny):
    import numpy as np
    import yaml
    from PIL import Image

    from ldmtool.checkpoints.files import save_safetensors
    from test_controlnet import STEPS, run_ours

    bundle, _unet, theirs = tiny
    model = tmp_path / "sd1-tiny.safetensors"
    save_safetensors(bundle.state_dict(), model)
    model.with_suffix(".yaml").write_text(yaml.safe_dump(bundle.config, sort_keys=False))
    save_safetensors(theirs.state_dict(), tmp_path / "t2iadapter.safetensors")
    hint = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    hint.save(tmp_path / "hint.png")
    prompt = "a lighthouse on a cliff"
    args = ("txt2img", "--prompt", prompt, "--model", model, "-W", 64, "-H", 64)
    ours, recipe = run_ours(*args, "--adapter", f"{tmp_path / 't2iadapter.safetensors'}:1.5",
                            "--control-image", tmp_path / "hint.png", "-o", tmp_path / "a.png")
    plain, _ = run_ours(*args, "-o", tmp_path / "p.png")
    reference = adapter_pipeline_image(bundle, theirs, prompt, hint, 1.5, steps=STEPS)
    assert np.abs(ours - reference).max() <= 1 / 255
    assert np.abs(ours - plain).max() > 5 / 255  # the comparison is sensitive to the adapter
    assert recipe["parameters"]["adapter"] == ["t2iadapter.safetensors:1.5"]


def test_adapter_features_are_computed_once_per_image_not_per_step(tmp_path, tiny, monkeypatch):
    import numpy as np
    import yaml
    from PIL import Image

    from ldmtool.checkpoints.files import save_safetensors
    from ldmtool.nets.t2i_adapter import FullAdapter
    from test_controlnet import run_ours

    bundle, _unet, theirs = tiny
    model = tmp_path / "sd1-tiny.safetensors"
    save_safetensors(bundle.state_dict(), model)
    model.with_suffix(".yaml").write_text(yaml.safe_dump(bundle.config, sort_keys=False))
    save_safetensors(theirs.state_dict(), tmp_path / "adapter.safetensors")
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "hint.png")
    calls = []
    forward = FullAdapter.forward
    def counted(self, hint):  # the check that the adapter fits the model runs on the meta device, computing nothing
        if not hint.is_meta:
            calls.append(hint.shape)
        return forward(self, hint)

    monkeypatch.setattr(FullAdapter, "forward", counted)
    run_ours("txt2img", "--prompt", "x", "--model", model, "-W", 64, "-H", 64, "--adapter", tmp_path / "adapter.safetensors",
             "--control-image", tmp_path / "hint.png", "-o", tmp_path / "a.png")
    assert len(calls) == 1  # 4 steps, guidance: still one adapter pass


def adapter_pipeline_image(bundle, adapter, prompt, hint, scale, *, steps):
    """diffusers' `StableDiffusionAdapterPipeline` over the tiny SD bundle's parts with `adapter` at `scale`: the
    64 px image for `prompt` and the hint image, with the guidance and seed of tests/test_sd_vs_diffusers.py."""
    from diffusers import StableDiffusionAdapterPipeline

    from test_sd_vs_diffusers import CFG, SEED, diffusers_pipeline

    base = diffusers_pipeline(bundle)
    parts = {k: v for k, v in base.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    pipe = StableDiffusionAdapterPipeline(**parts, adapter=adapter, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt, image=hint, height=64, width=64, num_inference_steps=steps, guidance_scale=CFG,
                    adapter_conditioning_scale=scale, generator=torch.Generator("cpu").manual_seed(SEED),
                    output_type="np").images[0]


def test_an_adapter_for_another_model_is_refused_in_one_line(tmp_path, tiny):
    """An SD 1.x adapter on an SDXL model failed every item with torch's 'The size of tensor a (4) must match ...';
    now its features are checked against the UNet's places (on the meta device) and the run stops (exit 3)."""
    import numpy as np
    from PIL import Image

    from clirun import run_cli
    from ldmtool.checkpoints.files import save_safetensors
    from ldmtool.checkpoints.tiny import save_tiny_checkpoint

    _bundle, _unet, theirs = tiny
    model = tmp_path / "sdxl-base.safetensors"
    save_tiny_checkpoint(model, "sdxl-base", with_config=True)
    save_safetensors(theirs.state_dict(), tmp_path / "adapter_sd15.safetensors")
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "hint.png")
    result = run_cli("txt2img", "--prompt", "x", "--model", model, "-W", 64, "-H", 64, "--steps", 1, "--n", 2,
                     "--adapter", tmp_path / "adapter_sd15.safetensors", "--control-image", tmp_path / "hint.png",
                     "-o", tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 3 and len(lines) == 1, result.stderr
    assert "adapter_sd15.safetensors: a T2I-Adapter for another model" in lines[0]
