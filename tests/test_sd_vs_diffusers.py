"""End to end against diffusers 0.42.1's Stable Diffusion pipelines (test-only oracle) on tiny random SD 1.x
checkpoints: the files ldmtool writes for `txt2img`, `img2img` and `inpaint` (9-channel model) with DDIM and
guidance equal diffusers' images within 1/255.

Same weights (our checkpoint converted with diffusers' own single-file converters), same initial latents
(the item's seeded noise), DDIM with the matching schedule (scaled-linear betas, "leading" spacing with
offset 1, final step to alpha = 1), the same prompt through the same bundled CLIP tokenizer.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmtool.checkpoints.files import save_safetensors
from ldmtool.checkpoints.tiny import TINY_CLIP_TEXT, randomise_, tiny_model
from ldmtool.cli.app import main
from ldmtool.nets.encoders import CLIP_VIT_L_TEXT
from ldmtool.runtime.seeds import NoiseSource

PROMPT = "a red fox jumping over a fence"
SIZE, STEPS, CFG, SEED = 64, 10, 7.5, 123
# Weights larger than the tiny-checkpoint default, so prompt and guidance change the image by many levels
# (with the default 0.05 the text path barely moves the output and agreement would prove little).
WEIGHT_SCALE = 0.3


def diffusers_pipeline(bundle, kind="StableDiffusionPipeline"):
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from clip_oracles import transformers_clip_tokenizer

    checkpoint = bundle.state_dict()
    config = bundle.config
    unet_config = create_unet_diffusers_config_from_ldm(config, checkpoint, image_size=SIZE)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae_config = create_vae_diffusers_config_from_ldm(config, checkpoint, image_size=SIZE)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**CLIP_VIT_L_TEXT, **TINY_CLIP_TEXT}))
    converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()}
    text_encoder.load_state_dict(converted, strict=True)
    params = config["model"]["params"]
    scheduler = DDIMScheduler(beta_start=params["linear_start"], beta_end=params["linear_end"],
                              beta_schedule="scaled_linear", num_train_timesteps=params["timesteps"],
                              clip_sample=False, set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading")
    pipe = getattr(diffusers, kind)(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=transformers_clip_tokenizer(),
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_checkpoint(path, preset="sd1"):
    """A tiny random SD 1.x checkpoint in the original key layout, its CompVis config beside it."""
    import yaml

    bundle = randomise_(tiny_model(preset), seed=7, scale=WEIGHT_SCALE)
    save_safetensors(bundle.state_dict(), path)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(bundle.config, sort_keys=False))
    return bundle


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "sd1-tiny.safetensors"
    return path, save_checkpoint(path)


def run_ours(*args, steps: int = STEPS):
    """The CLI in-process with DDIM (eta 0), guidance and the fixed base seed; returns (pixels, recipe)."""
    out = Path(args[args.index("-o") + 1])
    try:
        main([*map(str, args), "--sampler", "ddim", "--eta", "0", "--steps", str(steps), "--cfg", str(CFG),
              "--seed", str(SEED), "--quiet"])
    except SystemExit as exit:
        assert not exit.code
    with Image.open(out) as image:
        return np.asarray(image).astype(np.float64) / 255, json.loads(image.info["ldmtool"])


def test_txt2img_file_equals_diffusers_stable_diffusion_pipeline(tmp_path, sd1):
    """`--seed N` for one prompt is seed N as diffusers means it: the pipeline given
    `generator=torch.Generator("cpu").manual_seed(N)` draws the same initial latent and makes the same image."""
    model, bundle = sd1
    ours, recipe = run_ours("txt2img", "--prompt", PROMPT, "--model", model, "-W", SIZE, "-H", SIZE,
                            "-o", tmp_path / "fox.png")
    assert recipe["seed"] == SEED
    with Image.open(tmp_path / "fox.png") as image:
        assert f"Seed: {SEED}," in image.info["parameters"]
    pipe = diffusers_pipeline(bundle)

    def theirs(prompt, cfg):
        with torch.no_grad():
            return pipe(prompt, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=cfg, eta=0.0,
                        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]

    reference = theirs(PROMPT, CFG)
    assert ours.shape == reference.shape == (SIZE, SIZE, 3)
    assert np.abs(ours - reference).max() <= 1 / 255
    # controls: the comparison is sensitive to the prompt and to guidance
    assert np.abs(ours - theirs("a blue bird", CFG)).max() > 10 / 255
    assert np.abs(ours - theirs(PROMPT, 1.0)).max() > 10 / 255


def test_img2img_file_equals_diffusers_img2img_pipeline(tmp_path, sd1):
    """Same strength rule (the last floor(strength * steps) DDIM steps, the latent noised to the first of
    them) and the same noise (the item's first draw). Diffusers gets our image latent directly (a 4-channel
    `image` is taken as latents), since it would sample the VAE posterior where ldmtool takes its mean."""
    model, bundle = sd1
    rng = np.random.default_rng(0)
    source = tmp_path / "in.png"
    Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(source)
    ours, recipe = run_ours("img2img", source, "--prompt", PROMPT, "--strength", 0.6, "--model", model,
                            "-o", tmp_path / "out.png")
    with Image.open(source) as image:
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    with torch.no_grad():
        latent = bundle.first_stage.encode(pixels) * bundle.scale_factor
        pipe = diffusers_pipeline(bundle, "StableDiffusionImg2ImgPipeline")
        theirs = pipe(PROMPT, image=latent, strength=0.6, num_inference_steps=STEPS, guidance_scale=CFG, eta=0.0,
                      generator=torch.Generator().manual_seed(recipe["seed"]), output_type="np").images[0]
    assert ours.shape == theirs.shape == (SIZE, SIZE, 3)
    assert np.abs(ours - theirs).max() <= 1 / 255
    assert np.abs(ours - (pixels[0].permute(1, 2, 0).numpy() + 1) / 2).max() > 10 / 255  # it did change


def test_sd_inpainting_file_equals_diffusers_inpaint_pipeline_inside_the_mask(tmp_path):
    """The 9-channel model: same mask (binarized, nearest to latent size), same masked-image latent (given
    to diffusers directly: it would sample the VAE posterior where ldmtool takes its mean), same start
    noise. With --feather 0 the written file is diffusers' image inside the mask and the input outside."""
    model = tmp_path / "sd1-inpainting-tiny.safetensors"
    bundle = save_checkpoint(model, "sd1-inpainting")
    rng = np.random.default_rng(1)
    source, mask_file = tmp_path / "in.png", tmp_path / "hole.png"
    Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(source)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[12:44, 20:52] = 255
    Image.fromarray(mask).save(mask_file)
    ours, recipe = run_ours("inpaint", source, mask_file, "--prompt", PROMPT, "--feather", 0, "--model", model,
                            "-o", tmp_path / "out.png")
    with Image.open(source) as image:
        before = np.asarray(image).astype(np.float64) / 255
    pixels = torch.from_numpy(before).permute(2, 0, 1)[None].float() * 2 - 1
    hole = torch.from_numpy(mask > 127)[None, None]
    with torch.no_grad():
        masked_latent = bundle.first_stage.encode(pixels * ~hole) * bundle.scale_factor
        pipe = diffusers_pipeline(bundle, "StableDiffusionInpaintPipeline")
        theirs = pipe(PROMPT, image=Image.open(source), mask_image=Image.open(mask_file),
                      masked_image_latents=masked_latent, num_inference_steps=STEPS, guidance_scale=CFG, eta=0.0,
                      latents=NoiseSource([recipe["seed"]]).randn((4, SIZE // 8, SIZE // 8)),
                      output_type="np").images[0]
    inside = mask > 127
    assert np.abs(ours[inside] - theirs[inside]).max() <= 1 / 255
    assert np.array_equal(ours[~inside], before[~inside])
    assert np.abs(ours[inside] - before[inside]).mean() > 10 / 255
