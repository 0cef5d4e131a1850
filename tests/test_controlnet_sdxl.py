"""SDXL ControlNets (diffusers layout, as they are shared) against diffusers 0.42.1 on tiny random weights:
the residuals with SDXL's added embeddings, and a whole `txt2img --controlnet` run against
`StableDiffusionXLControlNetPipeline`."""
import numpy as np
import pytest
import torch

from ldmtool.addons.controlnet import base_heads, load_controlnet
from ldmtool.checkpoints.files import save_safetensors
from ldmtool.checkpoints.tiny import randomise_, tiny_model

SCALE, NET_SCALE = 0.1, 0.1


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """A tiny SDXL base file, a diffusers ControlNet for it (from its UNet, random weights) as a file."""
    import yaml
    from diffusers import ControlNetModel

    from test_sdxl import diffusers_unet

    bundle = randomise_(tiny_model("sdxl-base"), seed=5, scale=SCALE).eval()
    randomise_(bundle.first_stage_model, seed=6, scale=0.3)  # a decoder whose pixels follow the latent
    folder = tmp_path_factory.mktemp("xl")
    model = folder / "sdxl-tiny.safetensors"
    save_safetensors(bundle.state_dict(), model)
    model.with_suffix(".yaml").write_text(yaml.safe_dump(bundle.config, sort_keys=False))
    theirs = randomise_(ControlNetModel.from_unet(diffusers_unet(bundle)), seed=9, scale=NET_SCALE).eval()
    path = folder / "controlnet-canny-sdxl.safetensors"
    save_safetensors(theirs.state_dict(), path)
    return bundle, model, path, theirs


def test_sdxl_controlnet_residuals_equal_diffusers(xl):
    bundle, _model, path, theirs = xl
    ours = load_controlnet(path, heads=base_heads(bundle))
    g = torch.Generator().manual_seed(0)
    x, context, pooled = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g), torch.randn(1, 32, generator=g)
    hint, t = torch.rand(1, 3, 64, 64, generator=g), torch.tensor([555])
    sizes = {"original_size_as_tuple": (64, 64), "crop_coords_top_left": (0, 0), "target_size_as_tuple": (64, 64)}
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32)
    with torch.no_grad():
        mine = ours(x, hint, t, context, bundle.conditioner.vector(pooled, sizes))
        down, mid = theirs(x, t, context, controlnet_cond=hint, return_dict=False,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    assert len(mine) == len(down) + 1
    for a, b in zip(mine, [*down, mid]):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-4


def test_sdxl_txt2img_with_a_controlnet_equals_diffusers_xl_controlnet_pipeline(tmp_path, xl):
    from PIL import Image

    from test_controlnet import STEPS, run_ours
    from test_sd_vs_diffusers import CFG, SEED
    from test_sdxl import PROMPT, diffusers_xl_pipeline

    bundle, model, path, theirs = xl
    size = 64
    hint = Image.fromarray(np.random.default_rng(3).integers(0, 256, (size, size, 3), dtype=np.uint8))
    hint.save(tmp_path / "hint.png")
    args = ("txt2img", "--prompt", PROMPT, "--model", model, "-W", size, "-H", size)
    ours, _ = run_ours(*args, "--controlnet", f"{path}:2", "--control-image", tmp_path / "hint.png",
                       "-o", tmp_path / "c.png")
    plain, _ = run_ours(*args, "-o", tmp_path / "p.png")
    pipe = diffusers_xl_pipeline(bundle, "StableDiffusionXLControlNetPipeline", controlnet=theirs)
    with torch.no_grad():
        reference = pipe(PROMPT, image=hint, height=size, width=size, num_inference_steps=STEPS, guidance_scale=CFG,
                         eta=0.0, controlnet_conditioning_scale=2.0, generator=torch.Generator("cpu").manual_seed(SEED),
                         output_type="np").images[0]
    assert np.abs(ours - reference).max() <= 1 / 255
    assert np.abs(ours - plain).max() > 10 / 255  # the comparison is sensitive to control


def test_sdxl_preset_has_the_shapes_of_diffusers_sdxl_controlnet():
    """The full-size preset on the meta device against diffusers' ControlNetModel in the configuration of the
    released SDXL ControlNets, renamed to the released layout."""
    from diffusers import ControlNetModel

    import ldmtool
    from ldmtool.addons.controlnet_keys import read_diffusers

    ours = ldmtool.build_model("controlnet-sdxl", device="meta")
    with torch.device("meta"):
        theirs = ControlNetModel(
            addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
            block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], layers_per_block=2,
            projection_class_embeddings_input_dim=2816, transformer_layers_per_block=[1, 2, 10],
            use_linear_projection=True)
    renamed = read_diffusers(theirs.state_dict(), "diffusers")
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
