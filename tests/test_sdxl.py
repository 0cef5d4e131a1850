"""SDXL (issue 18): the sgm config format, presets, released key layouts, detection, and the networks
against diffusers 0.42.1 / transformers (test-only oracles) on the same tiny random weights."""
import math

import pytest
import torch

from ldmtool import build_model
from ldmtool.checkpoints.detect import detect_family
from ldmtool.checkpoints.presets import load_preset
from ldmtool.checkpoints.tiny import tiny_config, tiny_model
from ldmtool.errors import CheckpointError
from ldmtool.families.info import Conditioning, InpaintKind, Parameterization
from test_sd_vs_diffusers import CFG, SEED, SIZE, STEPS, run_ours as run_sd_cli

SDXL = ["sdxl-base", "sdxl-refiner", "sdxl-inpainting"]
BIGG_SLOT = {"sdxl-base": 1, "sdxl-refiner": 0, "sdxl-inpainting": 1}


def _shapes(state) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def _count(state, prefix: str) -> int:
    return sum(math.prod(v.shape) for k, v in state.items() if k.startswith(prefix))


# --- full size, on the meta device: the released single-file keys -----------------------------------------

@pytest.fixture(scope="module")
def full_size():
    return {name: build_model(name, device="meta").state_dict() for name in SDXL}


@pytest.mark.parametrize("name", SDXL)
def test_full_size_sdxl_converts_with_diffusers_single_file_code_into_its_models_exactly(name, full_size):
    """Every key and shape of the bundle is one diffusers' single-file converters map onto its
    UNet2DConditionModel / AutoencoderKL / CLIP text models, built from the configs diffusers itself derives
    from the sgm reference YAML; the parameter counts match, so nothing is left over."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    doc, state = load_preset(name), full_size[name]
    assert sfu.infer_diffusers_model_type(state) == {"sdxl-base": "xl_base", "sdxl-refiner": "xl_refiner",
                                                     "sdxl-inpainting": "xl_inpaint"}[name]
    unet_config = sfu.create_unet_diffusers_config_from_ldm(doc, state)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(doc, state)
    bigg = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          hidden_act="gelu", projection_dim=1280)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
        text_2 = CLIPTextModelWithProjection(bigg)
    assert _shapes(sfu.convert_ldm_unet_checkpoint(state, unet_config)) == _shapes(unet.state_dict())
    assert _shapes(sfu.convert_ldm_vae_checkpoint(state, vae_config)) == _shapes(vae.state_dict())
    prefix = f"conditioner.embedders.{BIGG_SLOT[name]}.model."
    assert _shapes(sfu.convert_open_clip_checkpoint(text_2, state, prefix=prefix)) == _shapes(text_2.state_dict())
    assert _count(state, "model.diffusion_model.") == sum(p.numel() for p in unet.parameters())
    assert _count(state, "first_stage_model.") == sum(p.numel() for p in vae.parameters())
    assert _count(state, prefix) == sum(p.numel() for p in text_2.parameters()) + 1  # open_clip's logit_scale
    conditioner = {k for k in state if k.startswith("conditioner.")}
    if name == "sdxl-refiner":
        assert all(k.startswith(prefix) for k in conditioner)
        return
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    with torch.device("meta"):
        text_1 = CLIPTextModel(clip_l)
    converted = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(state).items()}
    assert _shapes(converted) == _shapes(text_1.state_dict())
    assert all(k.startswith((prefix, "conditioner.embedders.0.transformer.text_model.")) for k in conditioner)


def test_sdxl_parameter_counts_match_published_figures(full_size):
    base = full_size["sdxl-base"]
    assert _count(base, "model.diffusion_model.") == 2_567_463_684  # SDXL base UNet ("2.6B", Podell et al.)
    assert _count(base, "conditioner.embedders.0.") == 123_060_480  # CLIP ViT-L/14 text
    assert _count(base, "conditioner.embedders.1.") == 694_659_841  # OpenCLIP ViT-bigG/14 text (+ logit_scale)
    assert _count(base, "first_stage_model.") == 83_653_863  # the kl-f8 VAE of SD, retrained
    assert _count(full_size["sdxl-refiner"], "model.diffusion_model.") == 2_259_526_660
    # the inpainting UNet: 5 more input channels on the first conv (3 x 3 x 320 each)
    assert _count(full_size["sdxl-inpainting"], "model.diffusion_model.") == 2_567_463_684 + 5 * 9 * 320


def test_sdxl_unet_levels_follow_the_reference_config(full_size):
    """Base: no attention at the first level, transformer depth 2 then 10 (10 in the middle block), y 2816
    wide; refiner: attention at the middle two of four levels, depth 4, y 2560 wide."""
    base, refiner = full_size["sdxl-base"], full_size["sdxl-refiner"]

    def depth(state, block):
        prefix = f"model.diffusion_model.{block}.1.transformer_blocks."
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    assert [depth(base, f"input_blocks.{i}") for i in (1, 4, 7)] == [0, 2, 10]
    assert depth(base, "middle_block") == 10
    assert [depth(refiner, f"input_blocks.{i}") for i in (1, 4, 7, 10)] == [0, 4, 4, 0]
    assert base["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert refiner["model.diffusion_model.label_emb.0.0.weight"].shape == (1536, 2560)


# --- the sgm config format, presets, detection ----------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sdxl-base", dict(conditioning=Conditioning.CROSSATTN_ADM, parameterization=Parameterization.EPS,
                           latent_channels=4, downsampling=8, pixel_multiple=32, native_latent=128,
                           inpaint_kind=InpaintKind.MASKED, takes_text=True, concat_channels=0)),
        ("sdxl-refiner", dict(conditioning=Conditioning.CROSSATTN_ADM, pixel_multiple=64, takes_text=True)),
        ("sdxl-inpainting", dict(conditioning=Conditioning.HYBRID_ADM, inpaint_kind=InpaintKind.SD_HYBRID,
                                 concat_channels=5)),
    ],
)
def test_sdxl_model_info(name, expected):
    bundle = build_model(name, device="meta")
    assert {field: getattr(bundle.info, field) for field in expected} == expected
    assert bundle.scale_factor == 0.13025 and bundle.info.defaults.size == (1024, 1024)


def test_sgm_config_builds_from_a_yaml_path_and_a_dict_like_compvis(tmp_path):
    import yaml

    doc = tiny_config("sdxl-base")
    path = tmp_path / "sd_xl_base.yaml"
    path.write_text(yaml.safe_dump({"model": doc["model"]}))
    from_path, from_dict = build_model(path), build_model(doc)
    assert _shapes(from_path.state_dict()) == _shapes(from_dict.state_dict())
    assert type(from_path.denoiser).__module__ == "ldmtool.nets.sgm" and from_path.unet is from_path.denoiser
    # the schedule is sgm's LegacyDDPMDiscretization (SD's scaled-linear betas), computed and not stored
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert torch.allclose(from_path.alphas_cumprod, ref, atol=1e-6)
    assert not any(k.startswith(("betas", "alphas")) for k in from_path.state_dict())


def test_sgm_config_options_ldmtool_cannot_honour_are_one_line_errors():
    doc = tiny_config("sdxl-base")
    doc["model"]["params"]["denoiser_config"]["params"]["discretization_config"]["target"] = "x.EDMDiscretization"
    with pytest.raises(CheckpointError, match="EDMDiscretization"):
        build_model(doc)
    doc = tiny_config("sdxl-base")
    doc["model"]["params"]["conditioner_config"]["params"]["emb_models"][2]["input_key"] = "fps"
    with pytest.raises(CheckpointError, match="'fps'"):
        build_model(doc)
    doc = tiny_config("sdxl-refiner")
    doc["model"]["params"]["denoiser_config"]["params"]["scaling_config"]["target"] = "sgm.x.VScaling"
    assert build_model(doc).parameterization == "v"


@pytest.mark.parametrize("name", SDXL)
def test_sdxl_detection_full_size_and_tiny(name, full_size):
    assert detect_family(_shapes(full_size[name])).family == name
    small = build_model(tiny_config(name), device="meta").state_dict()
    assert detect_family(_shapes(small)).family == name


def test_sd_checkpoints_are_not_taken_for_sdxl():
    for family in ("sd1", "sd2", "sd2-inpainting"):
        assert detect_family(_shapes(build_model(tiny_config(family), device="meta").state_dict())).family == family


def test_tiny_sdxl_checkpoint_round_trips_with_the_released_key_names(tmp_path):
    from ldmtool import load_model
    from ldmtool.checkpoints.tiny import save_tiny_checkpoint

    path = tmp_path / "tiny-sdxl.safetensors"
    bundle = save_tiny_checkpoint(path, "sdxl-base", seed=3, with_config=True)
    loaded = load_model(path)
    assert loaded.info.family == "sdxl-base" and loaded.load_info.config_used == "tiny-sdxl.yaml beside the weights"
    state = loaded.state_dict()
    assert list(state) == list(bundle.state_dict())
    for key, value in bundle.state_dict().items():
        assert torch.equal(state[key], value), key
    assert torch.equal(loaded.alphas_cumprod, bundle.alphas_cumprod)  # schedule computed, not stored


# --- tiny random weights: every network against diffusers / transformers ----------------------------------

BIGG_TINY = dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 hidden_act="gelu", projection_dim=32, max_position_embeddings=77, layer_norm_eps=1e-5)
WEIGHT_SCALE = 0.3  # larger than the tiny default, so text and y move the outputs by a lot


def diffusers_unet(bundle):
    """diffusers' UNet2DConditionModel in the SDXL configuration ("text_time" added embeddings), with our
    weights through diffusers' own converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    state = bundle.state_dict()
    config = sfu.create_unet_diffusers_config_from_ldm(bundle.config, state)
    # diffusers recognises SDXL by its full context width (2048 / 1280); the tiny one is 64 / 32 wide
    config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state, config), strict=True)
    return unet.eval()


def diffusers_text_encoders(bundle):
    """(CLIPTextModel or None, CLIPTextModelWithProjection) with our weights through diffusers' converters."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldmtool.checkpoints.tiny import TINY_CLIP_TEXT
    from ldmtool.nets.encoders import CLIP_VIT_L_TEXT

    state = bundle.state_dict()
    slot = 1 if "conditioner.embedders.1.model.text_projection" in state else 0
    bigg = CLIPTextModelWithProjection(CLIPTextConfig(**BIGG_TINY))
    converted = sfu.convert_open_clip_checkpoint(bigg, state, prefix=f"conditioner.embedders.{slot}.model.")
    bigg.load_state_dict(converted, strict=True)
    if slot == 0:
        return None, bigg.eval()
    clip_l = CLIPTextModel(CLIPTextConfig(**{**CLIP_VIT_L_TEXT, **TINY_CLIP_TEXT}))
    converted = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(state).items()}
    clip_l.load_state_dict(converted, strict=True)
    return clip_l.eval(), bigg.eval()


@pytest.fixture(scope="module")
def base():
    from ldmtool.checkpoints.tiny import randomise_

    return randomise_(tiny_model("sdxl-base"), seed=5, scale=WEIGHT_SCALE).eval()


def test_sdxl_unet_with_micro_conditioning_equals_diffusers_unet2dconditionmodel(base):
    """y = pooled text + sinusoidal embeddings of (original size, crop, target size), as diffusers builds
    its "text_time" embedding from `text_embeds` and `time_ids`."""
    unet = diffusers_unet(base)
    g = torch.Generator().manual_seed(0)
    x, context, pooled = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g), torch.randn(2, 32, generator=g)
    t = torch.tensor([999, 321])
    sizes = {"original_size_as_tuple": (1024, 768), "crop_coords_top_left": (16, 0), "target_size_as_tuple": (512, 512)}
    time_ids = torch.tensor([[1024, 768, 16, 0, 512, 512]] * 2, dtype=torch.float32)
    with torch.no_grad():
        ours = base.unet(x, t, context, base.conditioner.vector(pooled, sizes))
        theirs = unet(x, t, encoder_hidden_states=context,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        other = unet(x, t, encoder_hidden_states=context,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.flip(1)}).sample
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours - other).abs().max() > 1e-2  # control: the micro-conditioning reaches the output


def test_sdxl_text_encoders_equal_diffusers_encode_prompt(base):
    """Both towers: CLIP-L's and bigG's penultimate hidden states side by side, and bigG's pooled projection,
    as StableDiffusionXLPipeline.encode_prompt makes them from the same tokenizers."""
    from diffusers import StableDiffusionXLPipeline

    from clip_oracles import transformers_clip_tokenizer

    clip_l, bigg = diffusers_text_encoders(base)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=clip_l, text_encoder_2=bigg, tokenizer=transformers_clip_tokenizer(),
                                     tokenizer_2=transformers_clip_tokenizer(pad_with_zero=True), unet=None, scheduler=None)
    prompts = ["a red fox jumping over a fence", "x"]
    with torch.no_grad():
        ours = base.conditioner.encode_text(prompts)
        context, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert ours.context.shape == context.shape == (2, 77, 64)
    assert (ours.context - context).abs().max() <= 1e-4
    assert (ours.pooled - pooled).abs().max() <= 1e-4
    assert (ours.context[0] - ours.context[1]).abs().max() > 1e-2  # control: the prompt matters


def test_sdxl_refiner_text_encoder_equals_clip_text_model_with_projection():
    from ldmtool.checkpoints.tiny import randomise_

    refiner = randomise_(tiny_model("sdxl-refiner"), seed=6, scale=WEIGHT_SCALE).eval()
    _, bigg = diffusers_text_encoders(refiner)
    tokens = refiner.conditioner.text_embedders[0].tokenize(["a castle at dusk"])
    with torch.no_grad():
        ours = refiner.conditioner.encode_text(["a castle at dusk"])
        out = bigg(tokens, output_hidden_states=True)
    assert (ours.context - out.hidden_states[-2]).abs().max() <= 1e-4
    assert (ours.pooled - out.text_embeds).abs().max() <= 1e-4


def test_sdxl_vae_equals_diffusers_autoencoderkl(base):
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu

    state = base.state_dict()
    config = sfu.create_vae_diffusers_config_from_ldm(base.config, state)
    vae = AutoencoderKL(**config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, config), strict=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = base.first_stage.encode(image)
        assert (z - vae.encode(image).latent_dist.mean).abs().max() <= 1e-4
        latent = z * base.scale_factor
        assert config["scaling_factor"] == base.scale_factor == 0.13025
        ours = base.first_stage.decode(latent / base.scale_factor)
        theirs = vae.decode(latent / vae.config.scaling_factor).sample
    assert (ours - theirs).abs().max() <= 1e-4


# --- whole runs on a tiny random SDXL single file against diffusers' SDXL pipelines ------------------------

PROMPT = "a red fox jumping over a fence"


def diffusers_xl_pipeline(bundle, kind="StableDiffusionXLPipeline", **options):
    """diffusers' SDXL pipeline on our weights, with the DDIM schedule ldmtool's `--sampler ddim` takes
    (scaled-linear betas, "leading" spacing with offset 1, final step to alpha = 1)."""
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler
    from diffusers.loaders import single_file_utils as sfu

    from clip_oracles import transformers_clip_tokenizer

    state = bundle.state_dict()
    vae_config = sfu.create_vae_diffusers_config_from_ldm(bundle.config, state)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    clip_l, bigg = diffusers_text_encoders(bundle)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading")
    pipe = getattr(diffusers, kind)(vae=vae.eval(), text_encoder=clip_l, text_encoder_2=bigg,
                                    tokenizer=transformers_clip_tokenizer() if clip_l is not None else None,
                                    tokenizer_2=transformers_clip_tokenizer(pad_with_zero=True), unet=diffusers_unet(bundle),
                                    scheduler=scheduler, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_checkpoint(path, preset, seed):
    """A tiny random SDXL single file in the released key layout, its sgm config beside it."""
    import yaml

    from ldmtool.checkpoints.files import save_safetensors
    from ldmtool.checkpoints.tiny import randomise_

    bundle = randomise_(tiny_model(preset), seed=seed, scale=WEIGHT_SCALE).eval()
    save_safetensors(bundle.state_dict(), path)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(bundle.config, sort_keys=False))
    return bundle


@pytest.fixture(scope="module")
def base_file(tmp_path_factory, base):
    import yaml

    from ldmtool.checkpoints.files import save_safetensors

    path = tmp_path_factory.mktemp("sdxl") / "sdxl-base-tiny.safetensors"
    save_safetensors(base.state_dict(), path)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(base.config, sort_keys=False))
    return path, base


@pytest.fixture(scope="module")
def refiner_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl-refiner") / "sdxl-refiner-tiny.safetensors"
    return path, save_checkpoint(path, "sdxl-refiner", seed=8)


def run_ours(*args):
    """The CLI in-process with the SD 1.x comparison's sampler, guidance and seed; pixels in [0, 1]."""
    return run_sd_cli(*args)[0]


def test_sdxl_txt2img_file_equals_diffusers_stable_diffusion_xl_pipeline(tmp_path, base_file):
    """Micro-conditioning (original = target = the image's size, no crop) and the empty negative prompt as
    zero embeddings (diffusers' `force_zeros_for_empty_prompt`, the reference's zeroed unconditional text)."""
    import numpy as np

    model, bundle = base_file
    ours = run_ours("txt2img", "--prompt", PROMPT, "--model", model, "-W", SIZE, "-H", SIZE, "-o", tmp_path / "fox.png")
    pipe = diffusers_xl_pipeline(bundle)

    def theirs(prompt, **options):
        with torch.no_grad():
            return pipe(prompt, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG, eta=0.0,
                        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", **options).images[0]

    reference = theirs(PROMPT)
    assert ours.shape == reference.shape == (SIZE, SIZE, 3)
    assert np.abs(ours - reference).max() <= 1 / 255
    # controls: the comparison is sensitive to the prompt, the negative prompt and the micro-conditioning
    assert np.abs(ours - theirs("a blue bird")).max() > 10 / 255
    assert np.abs(ours - theirs(PROMPT, negative_prompt="")).max() > 10 / 255
    assert np.abs(ours - theirs(PROMPT, original_size=(4 * SIZE, 4 * SIZE))).max() > 4 / 255


def test_sdxl_base_to_refiner_handoff_equals_diffusers_denoising_end_and_start(tmp_path, base_file, refiner_file):
    """`--refiner FILE --refiner-at 0.8`: the base runs the steps at t >= 200, the refiner (bigG text, aesthetic
    score 6 / 2.5, its own VAE) the rest from the base's latent, as diffusers' ensemble of experts."""
    import numpy as np

    model, base = base_file
    refiner_path, refiner = refiner_file
    ours = run_ours("txt2img", "--prompt", PROMPT, "--model", model, "--refiner", refiner_path, "--refiner-at", 0.8,
                    "-W", SIZE, "-H", SIZE, "-o", tmp_path / "fox.png")
    first = diffusers_xl_pipeline(base)
    second = diffusers_xl_pipeline(refiner, "StableDiffusionXLImg2ImgPipeline", requires_aesthetics_score=True,
                                   force_zeros_for_empty_prompt=False)

    def theirs(at):
        common = dict(num_inference_steps=STEPS, guidance_scale=CFG, eta=0.0)
        with torch.no_grad():
            latents = first(PROMPT, height=SIZE, width=SIZE, denoising_end=at, output_type="latent",
                            generator=torch.Generator("cpu").manual_seed(SEED), **common).images
            return second(PROMPT, image=latents, denoising_start=at, output_type="np", **common).images[0]

    reference = theirs(0.8)
    assert ours.shape == reference.shape == (SIZE, SIZE, 3)
    assert np.abs(ours - reference).max() <= 1 / 255
    assert np.abs(ours - theirs(0.5)).max() > 4 / 255  # control: the hand-off point matters


def test_sdxl_img2img_handoff_equals_diffusers_img2img_denoising_end_and_start(tmp_path, base_file, refiner_file):
    """`img2img --strength 0.6 --refiner R --refiner-at 0.8`: the base runs the strength's steps at t >= 200 from
    the noised image latent, the refiner the rest from the base's latent, as diffusers' SDXL img2img pipelines
    with `denoising_end` / `denoising_start` (the base given our image latent, as the SD 1.x img2img test)."""
    import numpy as np
    from PIL import Image

    (model, base), (refiner_path, refiner) = base_file, refiner_file
    source = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(source)
    ours, recipe = run_sd_cli("img2img", source, "--prompt", PROMPT, "--strength", 0.6, "--model", model,
                              "--refiner", refiner_path, "--refiner-at", 0.8, "-o", tmp_path / "out.png")
    assert recipe["parameters"]["refiner"] == refiner_path.name and recipe["parameters"]["refiner_at"] == 0.8
    with Image.open(source) as image:
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    first = diffusers_xl_pipeline(base, "StableDiffusionXLImg2ImgPipeline")
    second = diffusers_xl_pipeline(refiner, "StableDiffusionXLImg2ImgPipeline", requires_aesthetics_score=True,
                                   force_zeros_for_empty_prompt=False)
    common = dict(num_inference_steps=STEPS, guidance_scale=CFG, eta=0.0)

    def theirs(at):
        with torch.no_grad():
            latent = base.first_stage.encode(pixels) * base.scale_factor
            handed = first(PROMPT, image=latent, strength=0.6, denoising_end=at, output_type="latent",
                           generator=torch.Generator().manual_seed(recipe["seed"]), **common).images
            return second(PROMPT, image=handed, denoising_start=at, output_type="np", **common).images[0]

    reference = theirs(0.8)
    assert ours.shape == reference.shape == (SIZE, SIZE, 3)
    assert np.abs(ours - reference).max() <= 1 / 255
    assert np.abs(ours - theirs(0.9)).max() > 4 / 255  # control: the hand-off point matters

def test_handoff_splits_one_schedule_where_diffusers_does():
    """diffusers' rule: the base runs the steps at t >= round(1000 - 1000 a); the two parts meet at one noise
    level. A schedule without integer timesteps (Karras sigmas) is cut at that timestep's noise level."""
    from ldmtool.checkpoints.schedule import schedule_buffers
    from ldmtool.diffusion.handoff import Handoff, first_model_steps, split
    from ldmtool.diffusion.samplers import default_schedule
    from ldmtool.errors import UsageError

    ac = schedule_buffers(linear_start=0.00085, linear_end=0.012)["alphas_cumprod"]
    ddim = default_schedule("ddim", ac, 10)
    assert ddim.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert first_model_steps(ddim, ac, 0.8) == 8 and first_model_steps(ddim, ac, 0.5) == 5
    karras = default_schedule("dpmpp_2m", ac, 12, karras=True)
    for schedule in (ddim, karras):
        head, tail = split(schedule, ac, Handoff(0.8, first=True)), split(schedule, ac, Handoff(0.8, first=False))
        assert head.steps + tail.steps == schedule.steps and head.steps > tail.steps > 0
        assert head.sigmas[-1] == tail.sigmas[0]
        sigma_200 = float(((1 - ac[200]) / ac[200]) ** 0.5)
        assert float(head.sigmas[-2]) >= sigma_200 > float(tail.sigmas[0])
    with pytest.raises(UsageError, match="--refiner-at 1.0"):
        Handoff(1.0, first=True)
