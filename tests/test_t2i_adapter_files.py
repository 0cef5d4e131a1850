"""T2I-Adapter files as users hold them (TencentARC's original `Adapter` / `Adapter_light` .pth files, diffusers'
full, light and SDXL adapters), written by the tests on tiny random weights, against diffusers 0.42.1's
`T2IAdapter`, `StableDiffusionAdapterPipeline` and `StableDiffusionXLAdapterPipeline`.

The original layouts are written from diffusers' weights by the renaming of diffusers'
scripts/convert_original_t2i_adapter.py, run backwards: the original `Adapter` (and `Adapter_XL`) keeps its residual blocks in one
flat list (`body.{level * n + block}`, the `in_conv` on a level's first block), `Adapter_light` names a level's
blocks `body.L.body.M` where diffusers says `body.L.resnets.M`."""
import re

import numpy as np
import pytest
import torch

from ldmtool.checkpoints.files import save_safetensors
from ldmtool.checkpoints.tiny import randomise_

WIDTHS = [32, 64, 128, 128]  # the tiny SD 1.x UNet's levels (tests/test_controlnet.py's model)
STEPS = 2  # DDIM steps of the whole runs (the schedule and guidance are those of tests/test_sd_vs_diffusers.py)


def diffusers_adapter(kind, in_channels=3, channels=WIDTHS, seed=4):
    from diffusers import T2IAdapter

    if kind == "light_adapter":
        adapter = T2IAdapter(in_channels=in_channels, channels=channels[:3], num_res_blocks=4, adapter_type=kind)
    else:  # the released SDXL adapters unshuffle by 16 (diffusers' train_t2i_adapter_sdxl.py, TencentARC's Adapter_XL)
        adapter = T2IAdapter(in_channels=in_channels, channels=channels, num_res_blocks=2, adapter_type=kind,
                             downscale_factor=16 if kind == "full_adapter_xl" else 8)
    return randomise_(adapter, seed=seed, scale=0.1).eval()


def original_full(state, blocks=2):
    """diffusers' full adapter keys -> the original `Adapter`'s."""
    def rename(key):
        key = key.removeprefix("adapter.")
        if m := re.fullmatch(r"body\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            return f"body.{int(m.group(1)) * blocks + int(m.group(2))}.{m.group(3)}"
        if m := re.fullmatch(r"body\.(\d+)\.in_conv\.(.+)", key):
            return f"body.{int(m.group(1)) * blocks}.in_conv.{m.group(2)}"
        return key
    return {rename(k): v for k, v in state.items()}


def original_light(state):
    """diffusers' light adapter keys -> the original `Adapter_light`'s."""
    return {re.sub(r"^body\.(\d+)\.resnets\.", r"body.\1.body.", k.removeprefix("adapter.")): v for k, v in state.items()}


LAYOUTS = {  # name: (diffusers adapter_type, hint channels, file name, keys in the file)
    "original canny (1 channel, .pth)": ("full_adapter", 1, "t2iadapter_canny_sd14v1.pth", original_full),
    "original depth, adapter. prefix": ("full_adapter", 3, "t2iadapter_depth_sd15v2.pth",
                                        lambda s: {f"adapter.{k}": v for k, v in original_full(s).items()}),
    "original light (colour)": ("light_adapter", 3, "t2iadapter_color_sd14v1.pth", original_light),
    "diffusers light": ("light_adapter", 3, "t2i-light.safetensors", dict),
    "diffusers sdxl": ("full_adapter_xl", 3, "t2i-adapter-lineart-sdxl.safetensors", dict),
    "original sdxl canny (Adapter_XL)": ("full_adapter_xl", 1, "adapter-xl-canny.pth", original_full),
    "diffusers sdxl canny, no prefix": ("full_adapter_xl", 1, "t2i-adapter-canny-sdxl.safetensors",
                                        lambda s: {k.removeprefix("adapter."): v for k, v in s.items()}),
}


def write(state, path):
    if path.suffix == ".pth":
        torch.save(state, path)
    else:
        save_safetensors(state, path)
    return path


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_loads_with_no_flag_and_gives_diffusers_features(tmp_path, layout):
    from ldmtool.addons.t2i_adapter import load_adapter

    kind, channels, name, keys = LAYOUTS[layout]
    theirs = diffusers_adapter(kind, channels)
    ours = load_adapter(write(keys(theirs.state_dict()), tmp_path / name))
    hint = torch.rand(1, channels, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine, reference = ours(hint), theirs(hint)
    assert ours.in_channels == channels and len(mine) == len(reference) == 4
    for a, b in zip(mine, reference):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * b.abs().max()  # features reach ~100


def test_a_one_channel_adapter_reads_a_grey_rgb_hint_as_diffusers_reads_the_grey_image():
    from ldmtool.nets.t2i_adapter import build_adapter
    from ldmtool.pipelines.control_engine import adapter_features

    theirs = diffusers_adapter("full_adapter", 1)
    ours = build_adapter({k.removeprefix("adapter."): tuple(v.shape) for k, v in theirs.state_dict().items()})
    ours.load_state_dict({k.removeprefix("adapter."): v for k, v in theirs.state_dict().items()})
    grey = np.random.default_rng(5).integers(0, 256, (64, 64), dtype=np.uint8)
    rgb = torch.from_numpy(np.repeat(grey[..., None], 3, axis=2)).permute(2, 0, 1)[None].float() / 255
    as_diffusers = torch.from_numpy(grey)[None, None].float() / 255  # diffusers' np.array of an "L" image, / 255
    with torch.no_grad():
        mine = adapter_features([(ours, 0.5)], [rgb], "cpu", torch.float32)
        reference = [f * 0.5 for f in theirs(as_diffusers)]
    for a, b in zip(mine, reference):
        assert (a - b).abs().max() < 1e-4


def test_a_flat_adapter_file_whose_levels_cannot_be_told_apart_is_one_clear_error(tmp_path):
    from ldmtool.addons.t2i_adapter import load_adapter
    from ldmtool.errors import CheckpointError

    state = {k: v for k, v in original_full(diffusers_adapter("full_adapter").state_dict()).items() if "in_conv" not in k}
    with pytest.raises(CheckpointError, match="t2iadapter_x.pth: a T2I-Adapter whose levels cannot be told apart"):
        load_adapter(write(state, tmp_path / "t2iadapter_x.pth"))


def test_txt2img_with_an_original_light_adapter_equals_diffusers_adapter_pipeline(tmp_path):
    import yaml
    from PIL import Image

    from ldmtool.checkpoints.tiny import tiny_model
    from test_sd_vs_diffusers import run_ours as run_cli_like_diffusers
    from test_t2i_adapter import adapter_pipeline_image

    bundle = randomise_(tiny_model("sd1"), seed=7, scale=0.1)
    randomise_(bundle.first_stage_model, seed=8, scale=0.3)  # a decoder whose pixels follow the latent
    model = tmp_path / "sd1-tiny.safetensors"
    save_safetensors(bundle.state_dict(), model)
    model.with_suffix(".yaml").write_text(yaml.safe_dump(bundle.config, sort_keys=False))
    theirs = diffusers_adapter("light_adapter", seed=6)
    adapter = write(original_light(theirs.state_dict()), tmp_path / "t2iadapter_color_sd14v1.pth")
    hint = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    hint.save(tmp_path / "hint.png")
    prompt = "a lighthouse on a cliff"
    args = ("txt2img", "--prompt", prompt, "--model", model, "-W", 64, "-H", 64)
    ours, _ = run_cli_like_diffusers(*args, "--adapter", f"{adapter}:2", "--control-image", tmp_path / "hint.png",
                                     "-o", tmp_path / "a.png", steps=STEPS)
    plain, _ = run_cli_like_diffusers(*args, "-o", tmp_path / "p.png", steps=STEPS)
    reference = adapter_pipeline_image(bundle, theirs, prompt, hint, 2.0, steps=STEPS)
    assert np.abs(ours - reference).max() <= 1 / 255
    assert np.abs(ours - plain).max() > 5 / 255  # the comparison is sensitive to the adapter


def test_sdxl_txt2img_with_an_sdxl_adapter_equals_diffusers_xl_adapter_pipeline(tmp_path):
    import yaml
    from PIL import Image

    from ldmtool.checkpoints.tiny import tiny_model
    from test_sd_vs_diffusers import CFG, SEED, run_ours as run_cli_like_diffusers
    from test_sdxl import PROMPT, diffusers_xl_pipeline

    bundle = randomise_(tiny_model("sdxl-base"), seed=5, scale=0.1).eval()
    randomise_(bundle.first_stage_model, seed=6, scale=0.3)
    model = tmp_path / "sdxl-tiny.safetensors"
    save_safetensors(bundle.state_dict(), model)
    model.with_suffix(".yaml").write_text(yaml.safe_dump(bundle.config, sort_keys=False))
    theirs = diffusers_adapter("full_adapter_xl", channels=[32, 64, 128, 128], seed=9)
    adapter = write(theirs.state_dict(), tmp_path / "t2i-adapter-sketch-sdxl.safetensors")
    hint = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    hint.save(tmp_path / "hint.png")
    args = ("txt2img", "--prompt", PROMPT, "--model", model, "-W", 64, "-H", 64)
    ours, _ = run_cli_like_diffusers(*args, "--adapter", f"{adapter}:2", "--control-image", tmp_path / "hint.png",
                                     "-o", tmp_path / "a.png", steps=STEPS)
    plain, _ = run_cli_like_diffusers(*args, "-o", tmp_path / "p.png", steps=STEPS)
    pipe = diffusers_xl_pipeline(bundle, "StableDiffusionXLAdapterPipeline", adapter=theirs)
    with torch.no_grad():
        reference = pipe(PROMPT, image=hint, height=64, width=64, num_inference_steps=STEPS, guidance_scale=CFG,
                         eta=0.0, adapter_conditioning_scale=2.0, generator=torch.Generator("cpu").manual_seed(SEED),
                         output_type="np").images[0]
    assert np.abs(ours - reference).max() <= 1 / 255
    assert np.abs(ours - plain).max() > 5 / 255  # the comparison is sensitive to the adapter
