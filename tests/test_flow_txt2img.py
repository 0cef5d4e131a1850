"""txt2img on the flow-matching transformer families (issue 24) against diffusers 0.42.1's StableDiffusion3Pipeline and
FluxPipeline (test-only oracles), on tiny random files in the released layouts: an SD3.5 single file with its text
encoders embedded, a FLUX.1 transformer file beside `ae.safetensors` and standalone CLIP-L / T5 files.

Same weights (diffusers' side converted from ours with diffusers' own single-file converters), the same initial
latent (the item's seeded noise, given to the pipeline as `latents`), the same schedule (the scheduler configs of
the released models: SD3 shift 3.0; FLUX.1 dev's resolution shift; schnell none), fp32 throughout.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clirun import run_cli
from ldmtool.checkpoints.files import save_safetensors
from ldmtool.checkpoints.tiny import randomise_
from ldmtool.diffusion.cond import Cond
from ldmtool.nets.autoencoder import AutoEncoder
from ldmtool.nets.flux import Flux
from ldmtool.nets.mmdit import MMDiT, MMDiTConfig
from ldmtool.runtime.seeds import NoiseSource
from test_flux import _convert_autoencoder, _convert_transformer, _diffusers_transformer
from test_mmdit import _converted as _convert_mmdit, _diffusers_transformer as _diffusers_mmdit
from test_t5 import tokenizer_dir  # noqa: F401  (the tiny T5 tokenizer.json fixture)
from test_text3 import T5_WIDTH, _clip_tokenizer, _released, clip_tokenizer_dir, towers  # noqa: F401

torch.set_num_threads(1)

PROMPT, NEGATIVE = "a photo of a red cat", "a dog"
SIZE, STEPS, SEED = 64, 2, 123
AE = dict(resolution=64, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 2, 2, 2], num_res_blocks=1, z_channels=16)
MMDIT = MMDiTConfig(depth=2, pos_embed_max_size=8, adm_in_channels=64 + 128, context_in_channels=T5_WIDTH,
                    qk_norm=True, dual_attention_layers=(0,))
FLUX = dict(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=T5_WIDTH, hidden_size=128, num_heads=1,
            depth=1, depth_single_blocks=1, mlp_ratio=4.0, axes_dim=[16, 56, 56])


def _autoencoder(seed: int) -> AutoEncoder:
    return randomise_(AutoEncoder(**AE), seed, scale=0.12).eval()


@pytest.fixture(scope="module")
def sd3_file(towers, tmp_path_factory):  # noqa: F811
    """An SD3.5-medium-like single file: MMDiT, VAE and the three text encoders, as the released file holds them."""
    net = randomise_(MMDiT(MMDIT), 1, scale=0.3).eval()
    with torch.no_grad():  # a buffer (randomise_ fills parameters): the stored grid, random so positions matter
        net.pos_embed.copy_(torch.randn(net.pos_embed.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    vae = _autoencoder(2)
    state = {"model.diffusion_model." + k: v for k, v in net.state_dict().items()}
    state.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    for kind, model in towers.items():
        state.update(_released(kind, model, f"text_encoders.{kind}.transformer."))
    path = tmp_path_factory.mktemp("sd3") / "sd3.5_tiny.safetensors"
    save_safetensors(state, path)
    return path, net, vae


@pytest.fixture(scope="module")
def flux_files(towers, tmp_path_factory):  # noqa: F811
    """FLUX.1 dev and schnell transformer files, ae.safetensors, clip_l.safetensors and t5xxl.safetensors."""
    folder = tmp_path_factory.mktemp("flux")
    nets = {}
    for name, guidance in (("dev", True), ("schnell", False)):
        nets[name] = randomise_(Flux(**FLUX, guidance_embed=guidance), 3, scale=0.1).eval()
        save_safetensors(nets[name].state_dict(), folder / f"flux1-{name}.safetensors")
    ae = _autoencoder(4)
    save_safetensors(ae.state_dict(), folder / "ae.safetensors")
    save_safetensors(_released("clip_l", towers["clip_l"]), folder / "clip_l.safetensors")
    save_safetensors(_released("t5xxl", towers["t5xxl"]), folder / "t5xxl.safetensors")
    return folder, nets, ae


def run_ours(*args) -> tuple[np.ndarray, dict]:
    out = Path(args[args.index("-o") + 1])
    result = run_cli("txt2img", "--prompt", PROMPT, "-W", SIZE, "-H", SIZE, "--steps", STEPS, "--seed", SEED,
                     "--quiet", *args)
    assert result.exit_code == 0, result.stderr
    with Image.open(out) as image:
        return np.asarray(image).astype(np.float64) / 255, json.loads(image.info["ldmtool"])


def _noise() -> torch.Tensor:
    return NoiseSource([SEED]).randn((16, SIZE // 8, SIZE // 8))


def _vae(ours: AutoEncoder, scale: float, shift: float):
    """diffusers' AutoencoderKL on our autoencoder's weights, with the family's latent constants."""
    from diffusers import AutoencoderKL

    levels = len(AE["ch_mult"])
    theirs = AutoencoderKL(latent_channels=16, down_block_types=("DownEncoderBlock2D",) * levels,
                           up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=AE["num_res_blocks"],
                           block_out_channels=tuple(AE["ch"] * m for m in AE["ch_mult"]), use_quant_conv=False,
                           use_post_quant_conv=False, scaling_factor=scale, shift_factor=shift)
    theirs.load_state_dict(_convert_autoencoder(ours.state_dict(), AE), strict=True)
    return theirs


# --- SD3 / SD3.5 --------------------------------------------------------------------------------------------

def _sd3_pipeline(towers, net, vae, clip_tokenizer_dir, tokenizer_dir):  # noqa: F811
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import T5TokenizerFast

    transformer = _diffusers_mmdit(MMDIT)
    transformer.load_state_dict(_convert_mmdit(net.state_dict()), strict=True)
    autoencoder = _vae(vae, 1.5305, 0.0609)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=autoencoder.eval(),
        text_encoder=towers["clip_l"], tokenizer=_clip_tokenizer(clip_tokenizer_dir, "<|endoftext|>"),
        text_encoder_2=towers["clip_g"], tokenizer_2=_clip_tokenizer(clip_tokenizer_dir, "!"),
        text_encoder_3=towers["t5xxl"], tokenizer_3=T5TokenizerFast.from_pretrained(str(tokenizer_dir)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd3_txt2img_equals_the_sd3_pipeline(tmp_path, sd3_file, towers, clip_tokenizer_dir, tokenizer_dir):  # noqa: F811
    path, net, vae = sd3_file
    cfg = 4.0
    ours, recipe = run_ours("--model", path, "--negative", NEGATIVE, "--cfg", cfg, "--tokenizer", tokenizer_dir,
                            "--tile", 0, "-o", tmp_path / "sd3.png")
    assert (recipe["parameters"]["sampler"], recipe["parameters"]["shift"], recipe["parameters"]["cfg"]) == ("euler", 3.0, cfg)
    pipe = _sd3_pipeline(towers, net, vae, clip_tokenizer_dir, tokenizer_dir)

    def theirs(negative: str, scale: float) -> np.ndarray:
        with torch.no_grad():
            return pipe(PROMPT, negative_prompt=negative, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                        guidance_scale=scale, latents=_noise(), output_type="np").images[0]

    reference = theirs(NEGATIVE, cfg)
    assert ours.shape == reference.shape == (SIZE, SIZE, 3)
    assert np.abs(ours - reference).max() <= 1 / 255
    # controls: the comparison sees the negative prompt and the guidance scale
    assert np.abs(ours - theirs("", cfg)).max() > 3 / 255
    assert np.abs(ours - theirs(NEGATIVE, 1.5)).max() > 3 / 255


# --- FLUX.1 -------------------------------------------------------------------------------------------------

def _flux_pipeline(towers, net, ae, clip_tokenizer_dir, tokenizer_dir, dev: bool, in_channels: int = 64):  # noqa: F811
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, T5TokenizerFast

    params = {**FLUX, "in_channels": in_channels, "guidance_embed": dev}
    transformer = _diffusers_transformer(params)
    transformer.load_state_dict(_convert_transformer(net.state_dict(), params), strict=True)
    autoencoder = _vae(ae, 0.3611, 0.1159)
    clip_l = CLIPTextModel(towers["clip_l"].config).eval()  # FluxPipeline's CLIP-L has no projection
    clip_l.load_state_dict({k.removeprefix("text_model."): v for k, v in towers["clip_l"].state_dict().items()
                            if k != "text_projection.weight"})
    # The released scheduler configs (black-forest-labs/FLUX.1-{dev,schnell}/scheduler/scheduler_config.json).
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=256, max_image_seq_len=4096) if dev
                 else FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False))
    pipe = FluxPipeline(scheduler=scheduler, vae=autoencoder.eval(), text_encoder=clip_l,
                        tokenizer=_clip_tokenizer(clip_tokenizer_dir, "<|endoftext|>"), text_encoder_2=towers["t5xxl"],
                        tokenizer_2=T5TokenizerFast.from_pretrained(str(tokenizer_dir)), transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_txt2img_equals_the_flux_pipeline(tmp_path, flux_files, towers, clip_tokenizer_dir, tokenizer_dir,  # noqa: F811
                                               variant):
    folder, nets, ae = flux_files
    dev = variant == "dev"
    guidance = ("--guidance", 2.5) if dev else ()
    ours, recipe = run_ours("--model", folder / f"flux1-{variant}.safetensors", "--vae", folder / "ae.safetensors",
                            "--text-encoder", folder / "clip_l.safetensors", "--text-encoder",
                            folder / "t5xxl.safetensors", "--tokenizer", tokenizer_dir, *guidance, "--tile", 0,
                            "-o", tmp_path / "flux.png")
    params = recipe["parameters"]
    assert params["sampler"] == "euler" and params.get("guidance") == (2.5 if dev else None)
    assert ("mu" in params) == dev and ("shift" in params) != dev
    pipe = _flux_pipeline(towers, nets[variant], ae, clip_tokenizer_dir, tokenizer_dir, dev)

    def theirs(scale: float) -> np.ndarray:
        latents = pipe._pack_latents(_noise(), 1, 16, SIZE // 8, SIZE // 8)
        with torch.no_grad():
            return pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=scale,
                        latents=latents, max_sequence_length=512 if dev else 256, output_type="np").images[0]

    reference = theirs(2.5)
    assert ours.shape == reference.shape == (SIZE, SIZE, 3)
    assert np.abs(ours - reference).max() <= 1 / 255
    if dev:  # control: the guidance input reaches the image
        assert np.abs(ours - theirs(6.0)).max() > 3 / 255


# --- tiles know their place in the canvas -------------------------------------------------------------------

def _tile_call(recipe, bundle, canvas_hw, x, crop, cond):
    """The family's network on one crop of the canvas, its Cond carrying the crop of the canvas positions."""
    from ldmtool.pipelines.flow_engine import positions

    (top, left), (h, w) = crop
    placed = positions(canvas_hw, x.shape[0], "cpu")[..., top:top + h, left:left + w]
    call = recipe.network(bundle, canvas_hw, 3.5 if recipe.takes_guidance(bundle) else None, torch.float32)
    return call(x[..., top:top + h, left:left + w], torch.tensor([0.7]), replace(cond, position=placed))


def test_an_sd3_tile_takes_the_positional_embedding_of_its_place(sd3_file):
    from ldmtool import load_model
    from ldmtool.families.sd3_flow import SD3Flow

    path, net, _ = sd3_file
    bundle = load_model(path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 12, 16, generator=g)
    cond = Cond(crossattn=torch.randn(1, 5, T5_WIDTH, generator=g), y=torch.randn(1, 192, generator=g))
    with torch.no_grad():
        got = _tile_call(SD3Flow(), bundle, (12, 16), x, ((4, 6), (8, 8)), cond)
        # the reference's embedding of the whole 6 x 8 patch canvas, cut at the tile's patches (2..5, 3..6)
        whole = net.cropped_pos_embed(12, 16).reshape(6, 8, -1)[2:6, 3:7].reshape(1, 16, -1)
        tokens = net.x_embedder(x[..., 4:12, 6:14]) + whole
        c = net.conditioning(torch.tensor([700.0]), cond.y, 1, torch.float32)
        text = net.context_embedder(cond.crossattn)
        for block in net.joint_blocks:
            text, tokens = block(text, tokens, c)
        want = net.unpatchify(net.final_layer(tokens, c), 4, 4)
        at_origin = _tile_call(SD3Flow(), bundle, (8, 8), x[..., 4:12, 6:14], ((0, 0), (8, 8)), cond)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - at_origin).abs().max() > 1e-3


def test_a_flux_tile_takes_the_rotary_ids_of_its_place(flux_files):
    from ldmtool.families.flux_flow import FluxFlow, pack, unpack

    _, nets, _ = flux_files
    net = nets["dev"]
    bundle = type("Bundle", (), {"denoiser": net})()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 12, 16, generator=g)
    cond = Cond(crossattn=torch.randn(1, 5, T5_WIDTH, generator=g), y=torch.randn(1, 64, generator=g))
    ids = torch.zeros(4, 4, 3)  # BFL's ids (0, row, column) of the tile's patches in the 6 x 8 patch canvas
    ids[..., 1] = torch.arange(2, 6)[:, None]
    ids[..., 2] = torch.arange(3, 7)[None]
    with torch.no_grad():
        got = _tile_call(FluxFlow(), bundle, (12, 16), x, ((4, 6), (8, 8)), cond)
        want = unpack(net(pack(x[..., 4:12, 6:14]), ids.reshape(1, 16, 3), cond.crossattn, torch.zeros(1, 5, 3),
                          torch.tensor([0.7]), cond.y, guidance=torch.tensor([3.5])), 8, 8)
        at_origin = _tile_call(FluxFlow(), bundle, (8, 8), x[..., 4:12, 6:14], ((0, 0), (8, 8)), cond)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got - at_origin).abs().max() > 1e-3


# --- the tiled engine, fp8 storage and replay through the command ---------------------------------------------

def _sd3_args(sd3_file, tokenizer_dir):  # noqa: F811
    return ("--model", sd3_file[0], "--tokenizer", tokenizer_dir, "--cfg", 3.0)


def _flux_args(flux_files, tokenizer_dir, model="flux1-dev.safetensors"):  # noqa: F811
    folder = flux_files[0]
    return ("--model", folder / model, "--vae", folder / "ae.safetensors", "--text-encoder",
            folder / "clip_l.safetensors", "--text-encoder", folder / "t5xxl.safetensors", "--tokenizer", tokenizer_dir)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_tiled_and_untiled_runs(tmp_path, sd3_file, flux_files, tokenizer_dir, family):  # noqa: F811
    """A 128 px image (16 x 16 latent): one tile covering the latent is the untiled run exactly; 8 x 8 tiles
    (overlap 2, nine tiles) run, each at its place, and stay near the untiled image."""
    args = _sd3_args(sd3_file, tokenizer_dir) if family == "sd3" else _flux_args(flux_files, tokenizer_dir)
    images = {}
    for name, tile in (("untiled", ("--tile", 0)), ("whole", ("--tile", 16)), ("tiled", ("--tile", 8, "--tile-overlap", 2))):
        images[name], _ = run_ours(*args, "-W", 128, "-H", 128, *tile, "-o", tmp_path / f"{name}.png")
    assert np.array_equal(images["whole"], images["untiled"])
    change = np.abs(images["tiled"] - images["untiled"])
    assert 0 < change.mean() < 0.1, change.mean()


def test_an_odd_tile_overlap_is_a_usage_error_for_a_patch_model(tmp_path, flux_files, tokenizer_dir):  # noqa: F811
    result = run_cli("txt2img", "--prompt", PROMPT, "-W", 128, "-H", 128, "--steps", 1, "--tile", 8,
                     "--tile-overlap", 3, *_flux_args(flux_files, tokenizer_dir), "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and "--tile-overlap 3" in result.stderr and "multiple of 2" in result.stderr


def test_fp8_stored_transformer_runs_as_its_upcast_values(tmp_path, flux_files, tokenizer_dir):  # noqa: F811
    folder, nets, _ = flux_files
    stored = {k: v.to(torch.float8_e4m3fn) for k, v in nets["schnell"].state_dict().items()}
    save_safetensors(stored, folder / "fp8.safetensors")
    save_safetensors({k: v.float() for k, v in stored.items()}, folder / "upcast.safetensors")
    fp8, _ = run_ours(*_flux_args(flux_files, tokenizer_dir, "fp8.safetensors"), "-o", tmp_path / "fp8.png")
    upcast, _ = run_ours(*_flux_args(flux_files, tokenizer_dir, "upcast.safetensors"), "-o", tmp_path / "up.png")
    assert np.array_equal(fp8, upcast)


def test_replay_redoes_a_flux_dev_output_exactly(tmp_path, flux_files, tokenizer_dir):  # noqa: F811
    ours, recipe = run_ours(*_flux_args(flux_files, tokenizer_dir), "--guidance", 4.0, "-o", tmp_path / "a.png")
    assert recipe["parameters"]["guidance"] == 4.0 and "mu" in recipe["parameters"]
    result = run_cli("replay", tmp_path / "a.png", "-o", tmp_path / "again.png", "--verify")
    assert result.exit_code == 0, result.stderr
    with Image.open(tmp_path / "again.png") as image:
        assert np.array_equal(np.asarray(image).astype(np.float64) / 255, ours)


def test_diffusers_encoder_folders_through_the_python_api(tmp_path, flux_files, towers, clip_tokenizer_dir,  # noqa: F811
                                                           tokenizer_dir):  # noqa: F811
    """`text_encoder/`, `text_encoder_2/` and `tokenizer_2/` as diffusers saves FLUX.1's, given to the Python API's
    `ldmtool.txt2img`: the pixels of the CLI on the standalone encoder files."""
    import shutil

    import ldmtool

    folder, nets, ae = flux_files
    pipe = _flux_pipeline(towers, nets["dev"], ae, clip_tokenizer_dir, tokenizer_dir, dev=True)
    saved = tmp_path / "FLUX.1-tiny"
    pipe.text_encoder_2.save_pretrained(saved / "text_encoder_2")
    (saved / "text_encoder").mkdir()  # the released folder's names (transformers 5 saves CLIPTextModel without text_model.)
    save_safetensors({"text_model." + k: v for k, v in pipe.text_encoder.state_dict().items()},
                     saved / "text_encoder" / "model.safetensors")
    shutil.copytree(tokenizer_dir, saved / "tokenizer_2")
    [image] = ldmtool.txt2img(PROMPT, model=str(folder / "flux1-dev.safetensors"), vae=folder / "ae.safetensors",
                              text_encoder=[saved / "text_encoder", saved / "text_encoder_2"],
                              tokenizer=str(saved / "tokenizer_2"), width=SIZE, height=SIZE, steps=STEPS, seed=SEED,
                              tile=0)
    ours, _ = run_ours(*_flux_args(flux_files, tokenizer_dir), "--tile", 0, "-o", tmp_path / "cli.png")
    assert np.array_equal(np.asarray(image).astype(np.float64) / 255, ours)


# --- img2img and masked inpainting ----------------------------------------------------------------------------

def _photo(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_sd3_img2img_equals_the_sd3_img2img_pipeline(tmp_path, sd3_file, towers, clip_tokenizer_dir,  # noqa: F811
                                                     tokenizer_dir):  # noqa: F811
    """4 steps at strength 0.5 (n s whole: the same steps as diffusers' rule); diffusers gets our image latent
    (it would sample the VAE posterior where ldmtool takes its mean) and the item's seed."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    path, net, vae = sd3_file
    source = _photo(tmp_path / "in.png")
    result = run_cli("img2img", source, "--model", path, "--tokenizer", tokenizer_dir, "--prompt", PROMPT, "--negative",
                     NEGATIVE, "--strength", 0.5, "--steps", 4, "--cfg", 3.0, "--seed", SEED, "--quiet",
                     "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.stderr
    with Image.open(tmp_path / "out.png") as image:
        ours, recipe = np.asarray(image).astype(np.float64) / 255, json.loads(image.info["ldmtool"])
    with Image.open(source) as image:
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    pipe = StableDiffusion3Img2ImgPipeline(**_sd3_pipeline(towers, net, vae, clip_tokenizer_dir, tokenizer_dir).components)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        latent = (vae.encode(pixels) - 0.0609) * 1.5305
        theirs = pipe(PROMPT, negative_prompt=NEGATIVE, image=latent, strength=0.5, num_inference_steps=4,
                      guidance_scale=3.0, generator=torch.Generator().manual_seed(recipe["seed"]),
                      output_type="np").images[0]
    assert np.abs(ours - theirs).max() <= 1 / 255
    assert np.abs(ours - (pixels[0].permute(1, 2, 0).numpy() + 1) / 2).max() > 10 / 255  # it did change


def test_flux_masked_inpaint_keeps_the_unmasked_pixels(tmp_path, flux_files, tokenizer_dir):  # noqa: F811
    source, hole = _photo(tmp_path / "in.png", 1), tmp_path / "hole.png"
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 8:40] = 255
    Image.fromarray(mask).save(hole)
    result = run_cli("inpaint", source, hole, "--prompt", PROMPT, "--steps", STEPS, "--feather", 0, "--quiet",
                     *_flux_args(flux_files, tokenizer_dir), "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.stderr
    with Image.open(tmp_path / "out.png") as image, Image.open(source) as before:
        out, before_pixels = np.asarray(image), np.asarray(before)
    inside = mask > 127
    assert np.array_equal(out[~inside], before_pixels[~inside])
    assert np.abs(out[inside].astype(int) - before_pixels[inside]).mean() > 10


def test_tile_synth_samples_a_large_sd3_canvas_tile_by_tile(tmp_path, sd3_file, tokenizer_dir):  # noqa: F811
    """A 192 x 128 canvas (24 x 16 latent) in 8 x 8 tiles: every tile inside the 8 x 8 patch grid's canvas."""
    result = run_cli("tile-synth", "--prompt", PROMPT, "-W", 192, "-H", 128, "--steps", 1, "--tile", 8,
                     "--tile-overlap", 2, "--seed", SEED, "--quiet", *_sd3_args(sd3_file, tokenizer_dir),
                     "-o", tmp_path / "canvas.png")
    assert result.exit_code == 2 and "places at most 128 pixels a side (its grid of positions)" in result.stderr
    result = run_cli("tile-synth", "--prompt", PROMPT, "-W", 128, "-H", 96, "--steps", 1, "--tile", 8,
                     "--tile-overlap", 2, "--seed", SEED, "--quiet", *_sd3_args(sd3_file, tokenizer_dir),
                     "-o", tmp_path / "canvas.png")
    assert result.exit_code == 0, result.stderr
    with Image.open(tmp_path / "canvas.png") as image:
        assert image.size == (128, 96) and np.asarray(image).std() > 5


def test_a_canvas_past_the_sd3_position_grid_is_refused_when_the_model_opens(tmp_path, sd3_file, tokenizer_dir):  # noqa: F811
    """The tiny MMDiT's 8 x 8 patch grid places at most 128 px a side: -W/-H past it failed every item (exit 1),
    tiled or not; now one usage error when the model opens. A JSON line's own size fails only its item."""
    for tile in (0, 8):
        result = run_cli("txt2img", "--prompt", PROMPT, "-W", 256, "-H", 128, "--steps", 1, "--n", 2, "--tile", tile,
                         *_sd3_args(sd3_file, tokenizer_dir), "-o", tmp_path / "out")
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.stderr
        assert "a 256x128 canvas: sd3.5_tiny.safetensors places at most 128 pixels a side (its grid of positions), " \
            "tiled or not; make the image smaller" in lines[0]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "big", "width": 256, "height": 64}\n{"prompt": "small"}\n')
    result = run_cli("txt2img", "--prompts", prompts, "-W", 64, "-H", 64, "--steps", 1, "--json",
                     *_sd3_args(sd3_file, tokenizer_dir), "-o", tmp_path / "lines")
    assert result.exit_code == 1, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(e["event"] for e in events if e["event"] in ("done", "failed")) == ["done", "failed"]
    (failed,) = [e for e in events if e["event"] == "failed"]
    assert "a 256x64 canvas: sd3.5_tiny.safetensors places at most 128 pixels a side" in failed["error"]


def test_the_dry_run_plans_a_flux_canvas_with_the_memory_the_run_refuses_it_with(tmp_path, monkeypatch, flux_files,
                                                                                 tokenizer_dir):  # noqa: F811
    """At 16384² the dry run planned ~5.1 GB (4 latent channels, no working memory: the model unknown) and let
    it run; the run, once the model was open, refused it needing ~20 GB. Both now plan with the model as its
    file's header describes it (16 channels, the transformer's tiles), and refuse it alike, before any load."""
    import re

    import ldmtool.pipelines.planning as planning

    monkeypatch.setattr(planning, "available_host_memory", lambda: 8 << 30)
    monkeypatch.setattr(planning, "resident_bytes", lambda: 0)
    needs = []
    for extra in (["--dry-run"], []):
        result = run_cli("txt2img", "--prompt", PROMPT, "-W", 16384, "-H", 16384, "--steps", 1,
                         *_flux_args(flux_files, tokenizer_dir), "-o", tmp_path / "big.png", *extra)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.stderr
        needs.append(re.search(r"needs about .* at its peak \(.*\)", lines[0]).group(0))
    assert needs[0] == needs[1] and "latents 2.5 GB, working" in needs[0], needs
    assert not (tmp_path / "big.png").exists()


def test_flux_fill_inpaint_equals_the_flux_fill_pipeline_inside_the_mask(tmp_path, monkeypatch, flux_files,
                                                                         towers, clip_tokenizer_dir,  # noqa: F811
                                                                         tokenizer_dir):  # noqa: F811
    """The 384-wide input (noise, masked image latent, the mask's 8x8 blocks), guidance 30 (the preset's); diffusers
    encodes the masked image to its posterior's mean, as ldmtool does (it would sample the posterior)."""
    from diffusers import FluxFillPipeline

    folder, _, ae = flux_files
    net = randomise_(Flux(**{**FLUX, "in_channels": 384}, guidance_embed=True), 6, scale=0.1).eval()
    save_safetensors(net.state_dict(), folder / "flux1-fill.safetensors")
    source, hole = _photo(tmp_path / "in.png", 2), tmp_path / "hole.png"
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:40, 16:56] = 255
    Image.fromarray(mask).save(hole)
    result = run_cli("inpaint", source, hole, "--prompt", PROMPT, "--steps", STEPS, "--feather", 0, "--quiet",
                     *_flux_args(flux_files, tokenizer_dir, "flux1-fill.safetensors"), "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.stderr
    with Image.open(tmp_path / "out.png") as image:
        ours, recipe = np.asarray(image).astype(np.float64) / 255, json.loads(image.info["ldmtool"])
    with Image.open(source) as image:
        before = np.asarray(image).astype(np.float64) / 255
    parts = _flux_pipeline(towers, net, ae, clip_tokenizer_dir, tokenizer_dir, dev=True, in_channels=384).components
    pipe = FluxFillPipeline(**{name: parts[name] for name in ("scheduler", "vae", "text_encoder", "tokenizer",
                                                              "text_encoder_2", "tokenizer_2", "transformer")})
    pipe.set_progress_bar_config(disable=True)
    import diffusers.pipelines.flux.pipeline_flux_fill as fill_module

    def posterior_mean(output, generator=None, sample_mode="sample"):  # ldmtool encodes to the posterior's mean
        return output.latent_dist.mode()

    monkeypatch.setattr(fill_module, "retrieve_latents", posterior_mean)
    noise = pipe._pack_latents(NoiseSource([recipe["seed"]]).randn((16, SIZE // 8, SIZE // 8)), 1, 16, 8, 8)
    with torch.no_grad(), Image.open(source) as image, Image.open(hole) as hole_image:
        theirs = pipe(PROMPT, image=image, mask_image=hole_image, latents=noise, height=SIZE, width=SIZE,
                      num_inference_steps=STEPS, guidance_scale=30.0, output_type="np").images[0]
    hole_pixels = mask > 127
    assert np.abs(ours[hole_pixels] - theirs[hole_pixels]).max() <= 1 / 255
    assert np.array_equal(ours[~hole_pixels], before[~hole_pixels])


@pytest.mark.parametrize(("family", "options", "message"), [
    ("flux", ("--sampler", "lcm"), "--sampler lcm does not apply to flow-matching models (choose one of euler, "),
    ("flux", ("--cfg", 3.0), "--cfg 3.0: FLUX.1 has no unconditional input, so classifier-free guidance cannot run; "
                            "drop --cfg; it takes --guidance instead"),
    ("sd3", ("--guidance", 3.5), "--guidance 3.5: this SD3 model takes no guidance input"),
    ("sd3", ("--karras",), "--karras/--no-karras: a flow-matching model samples on its own schedule"),
    ("flux", ("--tcd-gamma", 0.5), "--tcd-gamma 0.5 does not apply to the euler sampler"),
    ("sd3", ("--tcd-gamma", 0.5), "--tcd-gamma 0.5 does not apply to the euler sampler"),
    ("sd3", ("--tile", 8, "--tile-overlap", 3), "--tile-overlap 3: this model's tiles must start on its 2x2 patches"),
    ("flux", ("--prediction", "v"), "--prediction v: flux1-dev.safetensors is a flow-matching model; drop --prediction"),
    ("sd3", ("--prediction", "eps"), "--prediction eps: sd3.5_tiny.safetensors is a flow-matching model"),
])
def test_options_a_flow_model_cannot_take_are_one_line_usage_errors(tmp_path, sd3_file, flux_files,
                                                                   tokenizer_dir, family, options, message):  # noqa: F811
    args = _sd3_args(sd3_file, tokenizer_dir) if family == "sd3" else _flux_args(flux_files, tokenizer_dir)
    result = run_cli("txt2img", "--prompt", PROMPT, *args, *options, "-o", tmp_path / "x.png")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_controlnets_adapters_and_refiners_are_refused_with_flow_models_before_any_item(tmp_path, sd3_file, flux_files,
                                                                                    tokenizer_dir):  # noqa: F811
    """Each was refused per item (exit 1) or asked a flow refiner for text encoders; now one usage error (exit 2)."""
    from ldmtool.checkpoints.api import build_model
    from ldmtool.checkpoints.tiny import save_tiny_checkpoint, tiny_config

    controlnet = tmp_path / "control_sd15.safetensors"
    save_safetensors(build_model(tiny_config("controlnet-sd15")).state_dict(), controlnet)
    base = tmp_path / "sdxl-base.safetensors"
    save_tiny_checkpoint(base, "sdxl-base", with_config=True)
    hint = _photo(tmp_path / "hint.png")
    flux = _flux_args(flux_files, tokenizer_dir)
    for args, message in [
        ((*flux, "--controlnet", controlnet, "--control-image", hint), "ControlNets and T2I-Adapters do not run with FLUX.1"),
        ((*flux, "--refiner", base), "--refiner: the hand-off does not run with flux1-dev models"),
        (("--model", base, "--refiner", sd3_file[0], "--tokenizer", tokenizer_dir),
         f"--refiner {sd3_file[0]}: a sd3.5-medium model (flow matching) cannot refine yet"),
    ]:
        result = run_cli("txt2img", "--prompt", PROMPT, "--steps", 1, "-W", 64, "-H", 64, "--n", 2, *args,
                         "-o", tmp_path / "out")
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_flux_img2img_equals_the_flux_img2img_pipeline(tmp_path, flux_files, towers, clip_tokenizer_dir,  # noqa: F811
                                                       tokenizer_dir):  # noqa: F811
    """FLUX.1 dev, 4 steps at strength 0.5 with the resolution shift; diffusers gets our scaled image latent."""
    from diffusers import FluxImg2ImgPipeline

    folder, nets, ae = flux_files
    source = _photo(tmp_path / "in.png", 3)
    result = run_cli("img2img", source, "--prompt", PROMPT, "--strength", 0.5, "--steps", 4, "--seed", SEED, "--quiet",
                     *_flux_args(flux_files, tokenizer_dir), "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.stderr
    with Image.open(tmp_path / "out.png") as image:
        ours, recipe = np.asarray(image).astype(np.float64) / 255, json.loads(image.info["ldmtool"])
    with Image.open(source) as image:
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    parts = _flux_pipeline(towers, nets["dev"], ae, clip_tokenizer_dir, tokenizer_dir, dev=True).components
    pipe = FluxImg2ImgPipeline(**{name: parts[name] for name in ("scheduler", "vae", "text_encoder", "tokenizer",
                                                                 "text_encoder_2", "tokenizer_2", "transformer")})
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        latent = (ae.encode(pixels) - 0.1159) * 0.3611
        theirs = pipe(PROMPT, image=latent, strength=0.5, num_inference_steps=4, guidance_scale=3.5, height=SIZE,
                      width=SIZE, generator=torch.Generator().manual_seed(recipe["seed"]), output_type="np").images[0]
    assert np.abs(ours - theirs).max() <= 1 / 255
    assert np.abs(ours - (pixels[0].permute(1, 2, 0).numpy() + 1) / 2).max() > 10 / 255  # it did change


def test_each_text_is_encoded_once_and_t5_is_freed_after_each_batch(sd3_file, tokenizer_dir):  # noqa: F811
    from ldmtool.options import ModelChoice, SamplingChoice
    from ldmtool.pipelines.engine import Engine

    engine = Engine(ModelChoice(model=str(sd3_file[0]), tokenizer=tokenizer_dir, device="cpu", precision="fp32"),
                    SamplingChoice()).open()
    texts = engine.flow.texts(engine)
    cond, uncond = texts.conds(engine, [PROMPT, PROMPT], [NEGATIVE, NEGATIVE], (SIZE, SIZE))
    assert texts.encoded == 2 and not texts.t5_open  # the prompt and the negative, each once
    assert cond.crossattn.shape == (2, 77 + 256, T5_WIDTH) and uncond.y.shape == (2, 192)
    assert cond.crossattn[:, 77:].abs().amax() > 0  # T5's tokens, not the zeros that stand in for a missing T5
    again, _ = texts.conds(engine, [PROMPT], [NEGATIVE], (SIZE, SIZE))
    assert texts.encoded == 2 and torch.equal(again.crossattn[0], cond.crossattn[0])
    texts.conds(engine, ["a red dog"], [NEGATIVE], (SIZE, SIZE))
    assert texts.encoded == 3 and not texts.t5_open  # T5 opened again for the new prompt, then freed


def test_tile_synth_samples_a_flux_canvas_tile_by_tile(tmp_path, flux_files, tokenizer_dir):  # noqa: F811
    """FLUX.1 dev on a 128 x 96 canvas in 8 x 8 tiles (rotary ids have no grid to run out of): one tile covering the
    whole latent is the plain txt2img image exactly, and the tiled canvas is a real image of the asked size."""
    common = ("--prompt", PROMPT, "-W", 128, "-H", 96, "--steps", 1, "--seed", SEED, "--quiet",
              *_flux_args(flux_files, tokenizer_dir))
    result = run_cli("tile-synth", *common, "--tile", 8, "--tile-overlap", 2, "-o", tmp_path / "canvas.png")
    assert result.exit_code == 0, result.stderr
    assert run_cli("tile-synth", *common, "--tile", 16, "-o", tmp_path / "one.png").exit_code == 0
    assert run_cli("txt2img", *common, "--tile", 0, "-o", tmp_path / "plain.png").exit_code == 0
    with Image.open(tmp_path / "canvas.png") as canvas, Image.open(tmp_path / "one.png") as one, \
            Image.open(tmp_path / "plain.png") as plain:
        assert canvas.size == (128, 96) and np.asarray(canvas).std() > 5
        assert np.array_equal(np.asarray(one), np.asarray(plain))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_img2img_and_inpaint_with_the_tiled_engine(tmp_path, sd3_file, flux_files, tokenizer_dir, family):  # noqa: F811
    """img2img and masked inpaint on a 128 px image (16 x 16 latent): one tile over the latent is the untiled run
    exactly, 8 x 8 tiles (overlap 2) run, stay near it, and inpaint keeps every unmasked pixel either way."""
    args = _sd3_args(sd3_file, tokenizer_dir) if family == "sd3" else _flux_args(flux_files, tokenizer_dir)
    rng = np.random.default_rng(5)
    source, hole = tmp_path / "in.png", tmp_path / "hole.png"
    Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(source)
    mask = np.zeros((128, 128), np.uint8)
    mask[32:96, 40:104] = 255
    Image.fromarray(mask).save(hole)
    tasks = {"img2img": ("img2img", source, "--strength", 0.5), "inpaint": ("inpaint", source, hole, "--feather", 0)}
    for name, task in tasks.items():
        outputs = {}
        for tile in (0, 16, 8):
            out = tmp_path / f"{name}-{tile}.png"
            result = run_cli(*task, "--prompt", PROMPT, "--steps", 2, "--seed", SEED, "--quiet", "--tile", tile,
                             *(("--tile-overlap", 2) if tile == 8 else ()), *args, "-o", out)
            assert result.exit_code == 0, result.stderr
            with Image.open(out) as image:
                outputs[tile] = np.asarray(image).astype(int)
        assert np.array_equal(outputs[16], outputs[0]), name
        assert np.abs(outputs[8] - outputs[0]).mean() < 8, name
        if name == "inpaint":
            with Image.open(source) as image:
                kept = np.asarray(image).astype(int)[mask == 0]
            assert all(np.array_equal(out[mask == 0], kept) for out in outputs.values())


@pytest.mark.parametrize("name", ["default-superres", "default-txt2img", "default-semantic2img"])
def test_describing_a_model_reads_only_its_header_and_builds_what_loading_builds(name, monkeypatch):
    """The dry run's description mapped the whole file through read_state_dict: a workflow then counted two reads
    of each model where the model cache promises one."""
    from ldmtool.checkpoints import api

    loaded = api.load_model(name)

    def no_read(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(api, "read_state_dict", no_read)
    described = api.describe_model(name)
    assert described.info == loaded.info
    assert {k: v.shape for k, v in described.state_dict().items()} == {k: v.shape for k, v in loaded.state_dict().items()}


def test_a_text_encoder_file_rewritten_in_place_mid_run_stops_it(tmp_path, flux_files, tokenizer_dir,  # noqa: F811
                                                                  monkeypatch):
    """`--text-encoder` files are mapped when the model opens and read again for each batch (runtime/watch.py)."""
    from test_model_file_changed import _after_first_write, _rewrite_in_place

    t5 = tmp_path / "t5xxl.safetensors"
    t5.write_bytes((flux_files[0] / "t5xxl.safetensors").read_bytes())
    args = [str(a) for a in _flux_args(flux_files, tokenizer_dir)]
    args[args.index(str(flux_files[0] / "t5xxl.safetensors"))] = str(t5)
    _after_first_write(monkeypatch, lambda: _rewrite_in_place(t5, t5.read_bytes()[:-4] + b"\x7f\x7f\x7f\x7f"))
    (tmp_path / "p.txt").write_text("a red cat\na blue dog\n")
    result = run_cli("txt2img", "--prompts", tmp_path / "p.txt", "-W", SIZE, "-H", SIZE, "--steps", 1, "--seed", SEED,
                     "--quiet", *args, "-o", tmp_path / "out")
    assert result.exit_code == 3 and f"{t5} changed while this run used it" in result.stderr, result.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
