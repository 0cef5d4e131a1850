"""The lossless patch first stage (`--first-stage patch:4`, default-superres's): an exact pixel unshuffle,
decoded and encoded in strips exactly, trained on and run by the superres command like a KL first stage."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import ldmtool
from ldmtool.errors import UsageError
from ldmtool.nets.patch_autoencoder import PATCH_TARGET, PatchAutoencoder
from ldmtool.pipelines.engine import Engine, ModelChoice, PixelCanvas, SamplingChoice
from ldmtool.tiling.vae import PixelSource, VAETiling, tiled_decode, tiled_encode
from ldmtool.train import diffusion_parts as parts
from ldmtool.train.degrade import degradation, degrade
from residual_models import residual_model as make_residual_model


def test_each_latent_cell_holds_its_patch_and_decoding_inverts_encoding_exactly():
    first = PatchAutoencoder(patch_size=4)
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = first.encode(x)
    assert z.shape == (2, 48, 4, 6) and first.embed_dim == 48
    # channel c * 16 + 4 * dy + dx of cell (i, j) is pixel (4i + dy, 4j + dx) of colour c
    assert z[1, 2 * 16 + 4 * 3 + 1, 2, 5] == x[1, 2, 4 * 2 + 3, 4 * 5 + 1]
    assert torch.equal(first.decode(z), x)
    assert list(first.parameters()) == []


def test_strips_decode_and_encode_exactly():
    first = PatchAutoencoder(patch_size=4)
    z = torch.randn(1, 48, 7, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tiled_decode(first, z, VAETiling(tile=3)), first.decode(z))
    canvas = tiled_decode(first, z, VAETiling(tile=2), output=PixelCanvas)
    whole = PixelCanvas((1, 3, 28, 20))
    whole.paste(first.decode(z), 0, 0)
    assert torch.equal(canvas.pixels, whole.pixels)
    pixels = np.random.default_rng(2).integers(0, 256, size=(26, 19, 3), dtype=np.uint8)
    padded = PixelSource(pixels, (28, 20))  # edges repeated, as the engine pads
    expected = first.encode(padded.crop(0, 28, 0, 20))
    assert torch.equal(tiled_encode(first, padded, VAETiling(tile=9)), expected)
    with pytest.raises(ldmtool.errors.ItemError, match="multiples of 4"):
        tiled_encode(first, torch.zeros(1, 3, 10, 8), VAETiling(tile=8))


def test_patch_spec_is_the_only_weightless_first_stage():
    stage = parts.load_first_stage(Path("patch:4"), "cpu")
    assert stage.target == PATCH_TARGET and stage.factor == 4 and stage.channels == 48
    with pytest.raises(UsageError, match="patch size must be 2, 4 or 8"):
        parts.load_first_stage(Path("patch:3"), "cpu")


def test_clean_degradation_is_an_area_downscale():
    image = np.random.default_rng(3).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    low = degrade(image, degradation("clean", 4), np.random.default_rng(4))
    assert np.array_equal(low, cv2.resize(image, (12, 8), interpolation=cv2.INTER_AREA))


@pytest.fixture(scope="module")
def patch_model(tmp_path_factory) -> Path:
    """A tiny superres model trained two steps on the patch first stage through the CLI."""
    from ldmtool.cli.app import main

    folder = tmp_path_factory.mktemp("patch")
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)).save(folder / "a.png")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "diffusion", "--task", "superres", "--first-stage", "patch:4", "--data", str(folder),
              "--channels", "32", "--channel-mult", "1,2", "--attention-at", "2", "--crop", "32", "--batch-size", "1",
              "--prediction", "v", "--degradation", "clean", "--steps", "2", "--device", "cpu", "--quiet",
              "-o", str(folder / "run")])
    assert exit_info.value.code in (0, None)
    return folder / "run" / "model.safetensors"


def test_trained_model_records_the_patch_first_stage_and_ships_no_weights_for_it(patch_model):
    config = yaml.safe_load(patch_model.with_name("model.yaml").read_text())
    first = config["model"]["params"]["first_stage_config"]
    assert first == {"target": PATCH_TARGET, "params": {"patch_size": 4, "in_channels": 3}}
    assert not any(k.startswith("first_stage_model.") for k in load_file(str(patch_model)))
    bundle = ldmtool.load_model(patch_model)
    assert isinstance(bundle.first_stage, PatchAutoencoder)
    assert bundle.info.downsampling == 4 and bundle.info.latent_channels == 48 and bundle.info.concat_channels == 3


@pytest.mark.parametrize("vae_tile", [0, 3])  # whole, and strips of 3 latent rows
def test_engine_decodes_patch_latents_the_same_whole_or_in_strips(patch_model, vae_tile):
    engine = Engine(ModelChoice(model=str(patch_model), device="cpu"), SamplingChoice(vae_tile=vae_tile)).open()
    latents = torch.randn(1, 48, 10, 7, generator=torch.Generator().manual_seed(6))
    pixels = engine.decode_pixels(latents)[0].numpy()
    raw = PatchAutoencoder().decode(latents / engine.bundle.scale_factor)[0]
    expected = (((raw + 1) / 2).clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(pixels, expected)


def test_superres_command_runs_a_patch_model(patch_model, tmp_path):
    from ldmtool.cli.app import main

    source = tmp_path / "in.png"
    yy, xx = np.mgrid[0:10, 0:13]
    smooth = np.stack([60 + 8 * xx, 80 + 9 * yy, 120 + 3 * (xx + yy)], -1).astype(np.uint8)  # back-projection stays in range
    Image.fromarray(smooth).save(source)
    with pytest.raises(SystemExit) as exit_info:
        main(["superres", str(source), "--model", str(patch_model), "--steps", "2", "--seed", "1", "--device", "cpu",
              "--consistency", "--quiet", "-o", str(tmp_path / "out.png")])
    assert exit_info.value.code in (0, None)
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == (40, 52, 3)
    low = cv2.resize(out, (13, 10), interpolation=cv2.INTER_AREA).astype(int)  # back-projected onto the input
    assert np.abs(low - np.asarray(Image.open(source)).astype(int)).max() <= 2


def test_residual_training_learns_the_detail_over_the_bicubic_upscale(tmp_path):
    """`--residual`: the target latent is the image's minus its low-res input's bicubic upscale's (the
    conditioning the UNet sees), and scale_factor normalises that residual."""
    import torch.nn.functional as F

    from ldmtool.train import diffusion as df

    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(8).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)).save(folder / "a.png")
    trainer = _patch_trainer(folder, batch_size=2)
    trainer.scale_factor = trainer.estimate_scale_factor()
    batch = trainer.batch(0)
    crops, _ = trainer.samples(0)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    low = torch.from_numpy(np.stack([cv2.resize(c, (8, 8), interpolation=cv2.INTER_AREA) for c in crops]))
    low = low.permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(batch.concat, low)
    residual = x - F.interpolate(low, size=(32, 32), mode="bicubic", align_corners=False)
    torch.testing.assert_close(batch.z0, trainer.scale_factor * F.pixel_unshuffle(residual, 4))
    assert 2 < trainer.scale_factor < 50  # 1 / std of a residual, well above an image's (about 2)
    with pytest.raises(UsageError, match="--residual is for --task superres"):
        df.DiffusionTraining(task=df.Task.INPAINT, residual=True)


@pytest.fixture(scope="module")
def residual_model(tmp_path_factory) -> Path:
    """A residual patch model shipped with a trailing default spacing, its UNet zeroed: it predicts v = 0."""

    return make_residual_model(tmp_path_factory.mktemp("residual"), "residual", torch.zeros_like, seed=9)


def test_residual_model_that_predicts_nothing_gives_the_bicubic_upscale(residual_model, tmp_path):
    import torch.nn.functional as F

    from ldmtool.cli.app import main

    bundle = ldmtool.load_model(residual_model)
    assert bundle.info.residual_base == "bicubic" and bundle.info.defaults.spacing == "trailing"
    source = tmp_path / "in.png"
    pixels = np.random.default_rng(10).integers(0, 256, size=(8, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(source)
    with pytest.raises(SystemExit) as exit_info:
        main(["superres", str(source), "--model", str(residual_model), "--seed", "1", "--device", "cpu",
              "--no-consistency", "--no-colour-fix", "--quiet", "-o", str(tmp_path / "out.png")])
    assert exit_info.value.code in (0, None)
    low = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    up = F.interpolate(low, size=(32, 48), mode="bicubic", align_corners=False)[0]
    expected = (((up + 1) / 2).clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1  # x0 = sqrt(a) x_T with x_T = 0: nothing added


def test_default_spacing_applies_unless_the_run_chooses_one(residual_model):
    engine = Engine(ModelChoice(model=str(residual_model), device="cpu"), SamplingChoice()).open()
    assert engine.resolved()["spacing"] == "trailing"
    chosen = Engine(ModelChoice(model=str(residual_model), device="cpu"), SamplingChoice(spacing="leading")).open()
    assert chosen.resolved()["spacing"] == "leading"
    karras = Engine(ModelChoice(model=str(residual_model), device="cpu"), SamplingChoice(karras=True)).open()
    assert karras.resolved()["spacing"] == "karras"


@pytest.mark.parametrize("factor", [(4, 4), (2, 8), (3, 3)])
def test_bicubic_window_is_the_whole_upscale_cut_out_bit_for_bit(factor):
    """Bit for bit where the factors are powers of two (every sample position is then exact in float), within
    float rounding otherwise."""
    from ldmtool.pipelines.superres import bicubic_base, bicubic_window

    low = torch.rand(2, 3, 13, 17, generator=torch.Generator().manual_seed(3)) * 2 - 1
    size = (13 * factor[0], 17 * factor[1])
    whole = bicubic_base(low, size)
    for top, left, height, width in [(0, 0, *size), (0, 0, 1, 1), (5, 7, 9, 11), (size[0] - 3, size[1] - 2, 3, 2),
                                     (8, 0, 8, size[1]), (1, 30, 20, 4)]:
        window = bicubic_window(low, size, top, left, height, width)
        cut = whole[..., top : top + height, left : left + width]
        if factor == (3, 3):
            torch.testing.assert_close(window, cut, rtol=0, atol=1e-5)
        else:
            assert torch.equal(window, cut), (top, left, height, width)


@pytest.mark.parametrize("vae_tile", [0, 2])
def test_residual_upscale_added_per_decoded_strip_equals_adding_its_latent(residual_model, vae_tile, monkeypatch):
    """A pointwise first stage gets the bicubic upscale added in pixels, strip by strip as the decode pastes them
    (no full-size upscale or latent of it): the same pixels as decoding the latent plus the upscale's latent."""
    from ldmtool.pipelines.superres import bicubic_base

    engine = Engine(ModelChoice(model=str(residual_model), device="cpu", precision="fp32"),
                    SamplingChoice(vae_tile=vae_tile)).open()
    low = torch.rand(1, 3, 10, 12, generator=torch.Generator().manual_seed(4)) * 2 - 1
    z = torch.randn(1, 48, 10, 12, generator=torch.Generator().manual_seed(5))  # patch 4: the latent of a ×4 output
    monkeypatch.setattr(engine, "sample", lambda *args, **kwargs: z)
    pixels = _upscale(engine, low)
    whole = engine.decode_pixels(z + engine.encode(bicubic_base(low, (40, 48))))
    assert pixels.shape == whole.shape == (1, 40, 48, 3)
    assert (pixels.int() - whole.int()).abs().max() <= 1
    untiled = Engine(ModelChoice(model=str(residual_model), device="cpu", precision="fp32"),
                     SamplingChoice(vae_tile=0)).open()
    monkeypatch.setattr(untiled, "sample", lambda *args, **kwargs: z)
    assert torch.equal(pixels, _upscale(untiled, low))


def _upscale(engine: Engine, low: torch.Tensor) -> torch.Tensor:
    from ldmtool.pipelines.superres import SuperresTask

    task = SuperresTask(engine, scale=4)
    task.check_model(engine)
    return task._sample_and_decode(engine, low=low, latent_hw=(10, 12), seed=0)


def test_a_given_scale_factor_is_kept_instead_of_measured(tmp_path):
    """`--scale-factor`: a fine-tune from --init keeps the latent scale its UNet learnt (a new estimate on
    other crops differs by a few per cent)."""
    from ldmtool.cli.app import main

    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(11).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)).save(folder / "a.png")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "diffusion", "--task", "superres", "--first-stage", "patch:4", "--data", str(folder),
              "--channels", "32", "--channel-mult", "1,2", "--attention-at", "2", "--crop", "32", "--batch-size", "1",
              "--prediction", "v", "--residual", "--degradation", "clean", "--steps", "1", "--scale-factor", "6.5",
              "--device", "cpu", "--quiet", "-o", str(tmp_path / "run")])
    assert exit_info.value.code in (0, None)
    assert float(load_file(str(tmp_path / "run" / "model.safetensors"))["scale_factor"]) == 6.5


def _patch_trainer(folder: Path, **training):
    """A tiny residual superres trainer (v-prediction) on the patch first stage over `folder/a.png`."""
    from ldmtool.train import diffusion as df

    config = df.DiffusionTraining(task=df.Task.SUPERRES, crop=32, residual=True, degradation="clean", prediction="v",
                                  **training)
    arch = df.UNetArch(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_head_channels=32)
    return df.DiffusionTrainer(arch, config, parts.load_first_stage(Path("patch:4"), "cpu"), [folder / "a.png"],
                               torch.device("cpu"), torch.float32)


def _terminal_trainer(folder: Path, share: float):
    trainer = _patch_trainer(folder, batch_size=64, x0_loss=True, terminal_share=share)
    trainer.scale_factor = 4.0
    return trainer


def test_terminal_share_trains_what_the_one_step_default_samples_from(tmp_path):
    """`--terminal-share`: that share of a batch sits at the last timestep with x_t = 0, the input a one-step,
    trailing, temperature-0 DDIM run gives the UNet, and its loss is then the image's MSE from the conditioning
    alone; the rest of the batch keeps its timesteps and noise (share 0 changes nothing)."""
    from ldmtool.diffusion.schedules import spaced_timesteps

    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(12).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)).save(folder / "a.png")
    plain, half, every = (_terminal_trainer(folder, share) for share in (0.0, 0.5, 1.0))
    last = plain.training.timesteps - 1
    assert spaced_timesteps("trailing", 1, plain.training.timesteps).tolist() == [last]
    z0 = plain.batch(3).z0
    noise, t = plain.noise_and_timesteps(z0, 3)
    generator = torch.Generator("cpu").manual_seed(_noise_seed(plain, 3))
    assert torch.equal(t, torch.randint(0, 1000, (64,), generator=generator))  # the stream without the option
    assert torch.equal(noise, torch.randn(z0.shape, generator=generator))

    a = plain.buffers["alphas_cumprod"][last]
    half_noise, half_t = half.noise_and_timesteps(z0, 3)
    moved = half_t != t
    assert 16 < int(moved.sum()) < 48 and bool((half_t[moved] == last).all())
    assert torch.equal(half_noise[~moved], noise[~moved])
    x_t = a.sqrt() * z0[moved] + (1 - a).sqrt() * half_noise[moved]
    assert x_t.abs().max() < 1e-5

    every_noise, every_t = every.noise_and_timesteps(z0, 3)
    assert bool((every_t == last).all())
    batch = every.batch(3)
    every.unet.eval()
    with torch.no_grad():
        v = every.unet(torch.cat([torch.zeros_like(batch.z0), batch.concat], dim=1), every_t, context=None)
        loss = every.loss(batch, every_noise, every_t)
    x0 = -(1 - a).sqrt() * v  # DDIM's x0 from x_T = 0 with v-prediction
    torch.testing.assert_close(loss, (x0 - batch.z0).pow(2).mean(), rtol=1e-4, atol=1e-6)
    with pytest.raises(UsageError, match="--terminal-share"):
        _terminal_trainer(folder, 1.5)


def _noise_seed(trainer, step: int) -> int:
    from ldmtool.train.diffusion import derive_seed

    return derive_seed(trainer.training.seed, f"noise/{step}")
