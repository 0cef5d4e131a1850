"""Training: tiny autoencoder and diffusion runs on the CPU, their exports, resume, and a real learning signal."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import ldmtool
from ldmtool.errors import UsageError
from ldmtool.runtime.seeds import derive_seed
from ldmtool.train import autoencoder as ae, common, diffusion as df
from ldmtool.train.masks import random_mask

TINY_AE = ae.AutoencoderArch(factor=4, ch=32, num_res_blocks=1)
TINY_UNET = df.UNetArch(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_head_channels=32)



@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Three small textured images (smooth gradients plus noise), so there is something to learn."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48] / 47.0
    paths = []
    for i in range(3):
        base = np.stack([xx, yy, (xx + yy) / 2], -1)[..., np.roll(np.arange(3), i)] * 200
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"img{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _run(out: Path, steps: int, **kw) -> common.RunOptions:
    return common.RunOptions(out=out, steps=steps, save_every=kw.pop("save_every", 1000), log_every=1,
                             device="cpu", quiet=True, **kw)


@pytest.fixture(scope="module")
def first_stage(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ae")
    training = ae.AutoencoderTraining(crop=32, batch_size=2, lr=1e-3)
    torch.manual_seed(0)
    return ae.train_autoencoder(TINY_AE, training, images, _run(out, steps=6, save_every=3))


def test_autoencoder_export_is_the_compvis_layout(first_stage):
    config = yaml.safe_load(first_stage.with_name("model.yaml").read_text())
    assert config["model"]["target"] == "ldm.models.autoencoder.AutoencoderKL"
    params = config["model"]["params"]
    assert params["embed_dim"] == 3 and params["ddconfig"]["ch_mult"] == [1, 2, 4]
    weights = load_file(str(first_stage))
    assert {k.split(".")[0] for k in weights} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    fresh = ae.build_autoencoder(params)
    fresh.load_state_dict(weights, strict=True)  # every key and shape matches the network built from the YAML
    log = [yaml.safe_load(line) for line in first_stage.with_name("log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5, 6]


def test_autoencoder_learns_a_fixed_batch(images):
    torch.manual_seed(0)
    trainer = ae.AutoencoderTrainer(TINY_AE, ae.AutoencoderTraining(crop=32, batch_size=2, lr=2e-3), images,
                                    torch.device("cpu"), torch.float32)
    losses = [trainer.step(0)["rec"] for _ in range(30)]  # step 0 again and again: the same batch and noise
    assert losses[-1] < 0.5 * losses[0], losses


def test_kl_and_ssim_match_closed_forms():
    mean, logvar = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, np.log(4.0)]])
    expected = 0.5 * ((0.25 + 1 - 1 - 0) + (1.0 + 4.0 - 1 - np.log(4.0)))
    assert ae.kl_divergence(mean, logvar).item() == pytest.approx(expected, rel=1e-6)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert ae.ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert ae.ssim(x, -x).item() < 0.5


def test_autoencoder_resume_equals_uninterrupted_run(images, tmp_path):
    training = ae.AutoencoderTraining(crop=32, batch_size=2, lr=1e-3)
    torch.manual_seed(1)
    whole = ae.train_autoencoder(TINY_AE, training, images, _run(tmp_path / "whole", steps=4))
    torch.manual_seed(1)
    ae.train_autoencoder(TINY_AE, training, images, _run(tmp_path / "split", steps=2))
    torch.manual_seed(99)  # the resumed run must not depend on the global seed
    resumed = ae.train_autoencoder(TINY_AE, training, images, _run(tmp_path / "split", steps=4, resume=True))
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_resume_refuses_missing_state_and_overwrite_needs_resume(images, tmp_path):
    training = ae.AutoencoderTraining(crop=32, batch_size=1)
    with pytest.raises(UsageError, match="does not exist .*point -o at the run"):  # the option is -o/--output
        ae.train_autoencoder(TINY_AE, training, images, _run(tmp_path, steps=1, resume=True))
    ae.train_autoencoder(TINY_AE, training, images, _run(tmp_path, steps=1))
    with pytest.raises(UsageError, match="^-o .* already holds a run"):
        ae.train_autoencoder(TINY_AE, training, images, _run(tmp_path, steps=2))
    other = ae.AutoencoderArch(factor=4, ch=64)
    with pytest.raises(UsageError, match="different ch"):
        ae.train_autoencoder(other, training, images, _run(tmp_path, steps=2, resume=True))


def _superres_trainer(first_stage, images, **kw) -> df.DiffusionTrainer:
    training = df.DiffusionTraining(task=df.Task.SUPERRES, crop=32, batch_size=2, lr=2e-3, scale=4, **kw)
    stage = df.load_first_stage(first_stage, torch.device("cpu"))
    return df.DiffusionTrainer(TINY_UNET, training, stage, images, torch.device("cpu"), torch.float32)


def test_superres_export_is_a_latent_diffusion_file(first_stage, images, tmp_path):
    training = df.DiffusionTraining(task=df.Task.SUPERRES, crop=32, batch_size=2, scale=4)
    path = df.train_diffusion(TINY_UNET, training, first_stage.parent, images, _run(tmp_path, steps=3))
    document = yaml.safe_load(path.with_name("model.yaml").read_text())
    assert document["ldmtool"]["colour_fix"] is True  # superres --colour-fix is this model's default
    config = document["model"]
    params = config["params"]
    assert config["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
    assert params["conditioning_key"] == "concat" and params["cond_stage_key"] == "LR_image"
    assert params["unet_config"]["params"]["in_channels"] == 3 + 3  # latent + low-res image, as LDM BSR
    assert params["image_size"] == 8 and params["channels"] == 3
    weights = load_file(str(path))
    unet = df.build_unet(params["unet_config"]["params"])
    unet.load_state_dict({k[len("model.diffusion_model."):]: v for k, v in weights.items() if k.startswith("model.diffusion_model.")})
    stage = ae.build_autoencoder(params["first_stage_config"]["params"])
    stage.load_state_dict({k[len("first_stage_model."):]: v for k, v in weights.items() if k.startswith("first_stage_model.")})
    assert weights["scale_factor"].item() == pytest.approx(params["scale_factor"])
    from diffusers import DDPMScheduler  # independent oracle for the LDM linear schedule

    oracle = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0155, beta_schedule="scaled_linear")
    torch.testing.assert_close(weights["alphas_cumprod"], oracle.alphas_cumprod.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights["betas"], oracle.betas.float(), rtol=1e-5, atol=1e-7)


def test_scale_factor_normalises_the_latents(first_stage, images):
    trainer = _superres_trainer(first_stage, images, scale_batches=3)
    scale = trainer.estimate_scale_factor()
    latents = torch.cat([trainer.first_stage.model.encode(trainer.images(s)) for s in range(3)])
    assert (scale * latents).std().item() == pytest.approx(1.0, rel=1e-4)


def test_superres_conditioning_is_the_low_res_image_at_latent_size(first_stage, images):
    trainer = _superres_trainer(first_stage, images)
    trainer.scale_factor = 1.0
    batch = trainer.batch(0)
    z0, concat = batch.z0, batch.concat
    assert z0.shape == (2, 3, 8, 8) and concat.shape == (2, 3, 8, 8)
    assert concat.min() >= -1 and concat.max() <= 1


def test_diffusion_learns_a_fixed_batch(first_stage, images):
    torch.manual_seed(0)
    trainer = _superres_trainer(first_stage, images)
    losses = [trainer.step(0)["loss"] for _ in range(40)]  # the same latents, noise and timesteps each time
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("task, concat_channels", [(df.Task.INPAINT, 3 + 1), (df.Task.UNCOND, 0)])
def test_other_tasks_train_and_export(first_stage, images, tmp_path, task, concat_channels):
    training = df.DiffusionTraining(task=task, crop=32, batch_size=2)
    path = df.train_diffusion(TINY_UNET, training, first_stage, images, _run(tmp_path, steps=2))
    document = yaml.safe_load(path.with_name("model.yaml").read_text())
    params = document["model"]["params"]
    assert document["ldmtool"].get("colour_fix", False) is (task == df.Task.INPAINT)  # Telea colours in the hole
    assert params["unet_config"]["params"]["in_channels"] == 3 + concat_channels
    assert params["conditioning_key"] == ("concat" if concat_channels else None)
    assert np.isfinite([yaml.safe_load(line)["loss"] for line in path.with_name("log.jsonl").read_text().splitlines()]).all()


def test_inpaint_conditioning_follows_the_ldm_script(first_stage, images):
    training = df.DiffusionTraining(task=df.Task.INPAINT, crop=32, batch_size=2)
    stage = df.load_first_stage(first_stage, torch.device("cpu"))
    trainer = df.DiffusionTrainer(TINY_UNET, training, stage, images, torch.device("cpu"), torch.float32)
    trainer.scale_factor = 0.5
    concat = trainer.batch(0).concat
    mask_channel = concat[:, 3]
    assert set(mask_channel.unique().tolist()) <= {-1.0, 1.0} and (mask_channel == 1).any()
    crops, _ = trainer.samples(0)
    masks = np.stack([random_mask(32, 32, np.random.default_rng(derive_seed(0, f"cond/{i}"))) for i in range(2)])
    image01 = torch.from_numpy(crops).permute(0, 3, 1, 2).double() / 255
    masked = ((1 - torch.from_numpy(masks)[:, None]) * image01 * 2 - 1).float()  # holes black, as the LDM script
    torch.testing.assert_close(concat[:, :3], stage.model.encode(masked), rtol=1e-4, atol=1e-4)  # unscaled latent


def test_exports_load_with_ldmtool_load_model(first_stage, images, tmp_path):
    stage = ldmtool.load_model(first_stage)
    weights = load_file(str(first_stage))
    torch.testing.assert_close(stage.state_dict()["encoder.conv_in.weight"], weights["encoder.conv_in.weight"])
    training = df.DiffusionTraining(task=df.Task.SUPERRES, crop=32, batch_size=2, scale=4)
    path = df.train_diffusion(TINY_UNET, training, first_stage, images, _run(tmp_path, steps=2))
    bundle = ldmtool.load_model(path)
    saved = load_file(str(path))
    assert bundle.conditioning_key == "concat" and bundle.parameterization == "eps"
    assert bundle.scale_factor == pytest.approx(saved["scale_factor"].item())
    assert set(saved) == set(bundle.state_dict())  # exactly the original layout, nothing missing or extra
    for key, value in bundle.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("task", [df.Task.INPAINT, df.Task.UNCOND])
def test_other_task_exports_load(first_stage, images, tmp_path, task):
    training = df.DiffusionTraining(task=task, crop=32, batch_size=2)
    path = df.train_diffusion(TINY_UNET, training, first_stage, images, _run(tmp_path, steps=1))
    bundle = ldmtool.load_model(path)
    assert bundle.conditioning_key == ("concat" if task == df.Task.INPAINT else None)


def test_semantic_trains_the_spatial_rescaler_jointly(first_stage, tmp_path):
    training = df.DiffusionTraining(task=df.Task.SEMANTIC, crop=32, batch_size=2, lr=1e-2)
    stage = df.load_first_stage(first_stage, torch.device("cpu"))
    trainer = df.DiffusionTrainer(TINY_UNET, training, stage, [], torch.device("cpu"), torch.float32)
    before = trainer.cond_stage.channel_mapper.weight.detach().clone()
    for step in range(3):  # the UNet's output conv starts at zero, so no gradient reaches the input at step 0
        trainer.step(step)
    assert not torch.equal(before, trainer.cond_stage.channel_mapper.weight)
    trainer.scale_factor = 1.0
    concat = trainer.batch(0).concat
    assert concat.shape == (2, 3, 8, 8)
    path = trainer.export(tmp_path, 1)
    bundle = ldmtool.load_model(path)
    assert type(bundle.cond_stage).__name__ == "SpatialRescaler"
    config = yaml.safe_load(path.with_name("model.yaml").read_text())
    assert config["model"]["params"]["cond_stage_trainable"] is True
    assert [c["name"] for c in config["ldmtool"]["classes"]][:2] == ["sky", "grass"]


def _cli(args, capsys):
    from ldmtool.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_trains_both_stages(images, tmp_path, capsys):
    data = str(images[0].parent)
    code, err = _cli(["train", "autoencoder", "--data", data, "--channels", "64", "--crop", "16", "--batch-size", "1",
                      "--steps", "2", "--device", "cpu", "--quiet", "-o", str(tmp_path / "ae")], capsys)
    assert code in (0, None), err
    code, err = _cli(["train", "diffusion", "--task", "superres", "--first-stage", str(tmp_path / "ae"), "--data", data,
                      "--channels", "32", "--channel-mult", "1,2", "--attention-at", "2", "--crop", "32",
                      "--batch-size", "1", "--steps", "2", "--device", "cpu", "--quiet", "-o", str(tmp_path / "sr")], capsys)
    assert code in (0, None), err
    assert ldmtool.load_model(tmp_path / "sr" / "model.safetensors").conditioning_key == "concat"


@pytest.mark.parametrize("args, message", [
    (["--task", "semantic", "--data", "corpus"], "procedural data only"),
    (["--task", "superres"], "needs --data"),
    (["--task", "colour", "--data", "corpus"], "--task 'colour'"),
    (["--task", "superres", "--data", "corpus", "--channel-mult", "1,x"], "comma-separated"),
    (["--task", "semantic", "--data", "procedural", "--box-raster"], "--box-raster is for --task layout"),
])
def test_cli_usage_errors_are_one_line(tmp_path, capsys, args, message):
    code, err = _cli(["train", "diffusion", "--first-stage", str(tmp_path), "-o", str(tmp_path / "run"), *args], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_export_ships_fp16_without_schedule_buffers(first_stage, images, tmp_path, capsys):
    training = df.DiffusionTraining(task=df.Task.SUPERRES, crop=32, batch_size=2, scale=4)
    path = df.train_diffusion(TINY_UNET, training, first_stage, images, _run(tmp_path / "run", steps=1))
    code, err = _cli(["train", "export", str(tmp_path / "run"), "--name", "default-superres",
                      "--dest", str(tmp_path / "ship"), "--recipe", "ldmtool train diffusion ..."], capsys)
    assert code in (0, None), err
    shipped = load_file(str(tmp_path / "ship" / "default-superres.safetensors"))
    assert "alphas_cumprod" not in shipped and shipped["scale_factor"].dtype == torch.float32
    assert shipped["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert (tmp_path / "ship" / "default-superres.safetensors").stat().st_mode & 0o044 == 0o044
    full = ldmtool.load_model(path)
    half = ldmtool.load_model(tmp_path / "ship" / "default-superres.safetensors")
    torch.testing.assert_close(half.alphas_cumprod, full.alphas_cumprod, rtol=0, atol=0)
    assert half.scale_factor == full.scale_factor and half.family == "default-superres"
    config = yaml.safe_load((tmp_path / "ship" / "default-superres.yaml").read_text())
    assert config["ldmtool"]["recipe"] == "ldmtool train diffusion ..." and config["ldmtool"]["task"] == "superres"
    assert config["ldmtool"]["colour_fix"] is True and "consistency" not in config["ldmtool"]  # as trained
    code, err = _cli(["train", "export", str(tmp_path / "run"), "--name", "tuned", "--dest", str(tmp_path / "ship"),
                      "--no-colour-fix", "--consistency", "--default-steps", "20", "--default-cfg", "3",
                      "--default-temperature", "0.6"], capsys)
    assert code in (0, None), err
    tuned = yaml.safe_load((tmp_path / "ship" / "tuned.yaml").read_text())["ldmtool"]
    assert (tuned["colour_fix"], tuned["consistency"], tuned["default_steps"], tuned["default_cfg"],
            tuned["default_temperature"]) == (False, True, 20, 3.0, 0.6)


@pytest.mark.parametrize("task", [df.Task.SUPERRES, df.Task.INPAINT, df.Task.SEMANTIC, df.Task.TXT2IMG, df.Task.LAYOUT])
def test_trained_models_run_their_command(first_stage, images, tmp_path, capsys, task):
    from ldmtool.train.procedural import semantic_sample

    training = df.DiffusionTraining(task=task, crop=32, batch_size=1)
    model = df.train_diffusion(TINY_UNET, training, first_stage, [] if task in df.PROCEDURAL_TASKS else images,
                               _run(tmp_path / "run", steps=1))
    source = tmp_path / "in" / "a.png"
    source.parent.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    Image.fromarray(semantic_sample(1, 16)[1] if task == df.Task.SEMANTIC else pixels).save(source)
    mask = np.zeros((12, 16), np.uint8)
    mask[3:8, 4:10] = 255
    Image.fromarray(mask).save(source.with_name("a_mask.png"))
    layout = tmp_path / "in" / "scene.json"
    layout.write_text('{"size": [32, 32], "objects": [{"label": "Tree", "box": [0.1, 0.1, 0.5, 0.9]}]}')
    command = df.TASK_COMMAND[task]
    inputs = {df.Task.TXT2IMG: ["--prompt", "a red circle above a blue square", "-W", "32", "-H", "16"],
              df.Task.LAYOUT: [str(layout)]}.get(task, [str(source)])
    code, err = _cli([command, *inputs, "--model", str(model), "--steps", "2", "--seed", "1", "--device", "cpu",
                      "--quiet", "-o", str(tmp_path / "out" / "a.png")], capsys)
    assert code in (0, None), err
    written = Image.open(tmp_path / "out" / "a.png")
    expected = {df.Task.SUPERRES: (64, 48), df.Task.INPAINT: (16, 12), df.Task.SEMANTIC: (16, 16), df.Task.TXT2IMG: (32, 16),
                df.Task.LAYOUT: (32, 32)}[task]
    assert written.size == expected


def test_txt2img_trains_the_text_encoder_with_caption_dropout(first_stage, tmp_path):
    training = df.DiffusionTraining(task=df.Task.TXT2IMG, crop=32, batch_size=2, lr=1e-2, text_width=32, text_layers=1)
    stage = df.load_first_stage(first_stage, torch.device("cpu"))
    trainer = df.DiffusionTrainer(TINY_UNET, training, stage, [], torch.device("cpu"), torch.float32)
    assert trainer.unet_params["context_dim"] == 32 and trainer.unet_params["use_spatial_transformer"]
    before = trainer.cond_stage.transformer.token_emb.weight.detach().clone()
    for step in range(3):
        trainer.step(step)
    assert not torch.equal(before, trainer.cond_stage.transformer.token_emb.weight)
    _, captions = trainer.samples(0)
    assert all(c.startswith("a ") for c in captions)
    dropped = trainer.drop_captions(["x"] * 2000, list(range(2000)))
    assert dropped == trainer.drop_captions(["x"] * 2000, list(range(2000)))
    assert 0.07 < dropped.count("") / 2000 < 0.13
    bundle = ldmtool.load_model(trainer.export(tmp_path, 3))
    assert bundle.conditioning_key == "crossattn" and type(bundle.cond_stage).__name__ == "BERTEmbedder"


def test_layout_tokens_follow_the_reference_box_encoding():
    from ldmtool.train.procedural import Box

    tokens = df.layout_tokens([[Box(5, 0.0, 0.0, 1.0, 1.0), Box(4, 0.5, 0.25, 0.75, 1.0)]])  # tree, rock
    sections = 90  # int(sqrt(8192))
    cell = lambda x, y: round(y * (sections - 1)) * sections + round(x * (sections - 1))  # noqa: E731
    tree, building = 215, 263  # OpenImages layout class numbers of "Tree" and "Building"
    expected = [tree, cell(0, 0), cell(1, 1), building, cell(0.5, 0.25), cell(0.75, 1.0)]
    expected += [8191] * (3 * (df.LAYOUT_MAX_OBJECTS - 2)) + [cell(0, 0), cell(1, 1)]
    assert tokens.tolist() == [expected]


def test_patch_discriminator_trains_and_resumes(images, tmp_path):
    loss = ae.AutoencoderLoss(disc_weight=0.1, disc_start=1)
    training = ae.AutoencoderTraining(crop=32, batch_size=1, loss=loss)
    trainer = ae.AutoencoderTrainer(TINY_AE, training, images, torch.device("cpu"), torch.float32)
    before = [p.detach().clone() for p in trainer.disc.parameters()]
    assert "g" not in trainer.step(0)  # before disc_start: no adversarial term
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.disc.parameters()))
    assert "g" in trainer.step(1)
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.disc.parameters()))
    ae.train_autoencoder(TINY_AE, training, images, _run(tmp_path, steps=2))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert "disc" in state and "disc_optimizer" in state
    ae.train_autoencoder(TINY_AE, training, images, _run(tmp_path, steps=3, resume=True))
    assert "disc." not in " ".join(load_file(str(tmp_path / "model.safetensors")))  # never exported


def test_chroma_term_sees_colour_that_grey_output_loses():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    grey = x.mean(1, keepdim=True).expand_as(x)
    assert ae.chroma(grey).abs().max() < 1e-6
    terms = ae.reconstruction_loss(grey, x, ae.AutoencoderLoss(chroma_weight=1.0))
    assert terms["chroma"] > 0.1 and terms["rec"] > ae.reconstruction_loss(grey, x, ae.AutoencoderLoss(chroma_weight=0.0))["rec"]


def test_default_first_stage_is_attention_free_so_tiled_decoding_stays_linear():
    params = TINY_AE.params(32)
    assert params["ddconfig"]["attn_type"] == "none"
    model = ae.build_autoencoder(params)
    assert not list(model.decoder.mid.attn_1.parameters()) and not list(model.encoder.mid.attn_1.parameters())
    from ldmtool.tiling.vae import decoder_stages
    assert not any(stage.has_attention for stage in decoder_stages(model.decoder))
    with_attention = ae.build_autoencoder(ae.AutoencoderArch(factor=4, ch=32, attention=True).params(32))
    assert hasattr(with_attention.decoder.mid, "attn_1") and len(list(with_attention.decoder.mid.attn_1.parameters())) > 0


class _FixedJitter:
    """A stand-in generator for `colour_jitter`: fixed angle, saturation and tint."""

    def __init__(self, angle=0.0, saturation=1.0, tint=(0.0, 0.0)):
        self.values = {(-np.pi, np.pi): angle, (0.6, 1.5): saturation}
        self.tint = np.array(tint)

    def uniform(self, low, high):
        return self.values[(low, high)]

    def normal(self, mean, std, size):
        return self.tint


def test_colour_jitter_keeps_luminance_and_rotates_chroma():
    from ldmtool.train.data import colour_jitter

    crop = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    assert np.abs(colour_jitter(crop, _FixedJitter()).astype(int) - crop).max() <= 1  # identity
    luma = lambda a: a.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # noqa: E731
    rotated = colour_jitter(np.full((4, 4, 3), (200, 60, 60), np.uint8), _FixedJitter(angle=2.0))
    assert np.abs(luma(rotated) - luma(np.array([200, 60, 60]))).max() <= 1.5  # same brightness...
    assert rotated[0, 0, 0] < 150  # ...no longer red
    grey = np.full((4, 4, 3), 120, np.uint8)
    tinted = colour_jitter(grey, _FixedJitter(tint=(0.0, 20.0)))
    assert tinted[0, 0, 0] > tinted[0, 0, 1] + 20  # a grey crop gets a colour cast


def test_colour_jitter_is_part_of_the_deterministic_crop_stream(images):
    from ldmtool.train.data import CropConfig, ImageCrops

    config = CropConfig(size=32, min_scale=1.0, colour_jitter=1.0)
    a, b = ImageCrops(images, config, seed=3), ImageCrops(images, config, seed=3)
    assert np.array_equal(a.batch(5, 2), b.batch(5, 2))
    plain = ImageCrops(images, CropConfig(size=32, min_scale=1.0), seed=3)
    assert not np.array_equal(a.batch(5, 2), plain.batch(5, 2))


def test_init_starts_the_unet_from_a_trained_checkpoint(first_stage, images, tmp_path):
    training = df.DiffusionTraining(task=df.Task.SUPERRES, crop=32, batch_size=2, scale=4)
    trained = df.train_diffusion(TINY_UNET, training, first_stage.parent, images, _run(tmp_path / "a", steps=2))
    trained_unet = {k: v for k, v in load_file(str(trained)).items() if k.startswith(df.UNET_PREFIX)}
    from dataclasses import replace

    trainer = df.DiffusionTrainer(TINY_UNET, replace(training, init=str(trained)), df.load_first_stage(first_stage.parent, torch.device("cpu")),
                                  images, torch.device("cpu"), torch.float32)
    assert trainer.initialised == len(trained_unet)
    for name, value in trainer.unet.state_dict().items():
        torch.testing.assert_close(value, trained_unet[df.UNET_PREFIX + name])
    wider = df.UNetArch(model_channels=64, channel_mult=(1, 2), attention_resolutions=(2,), num_head_channels=32)
    with pytest.raises(UsageError, match="weights match"):
        df.DiffusionTrainer(wider, replace(training, init=str(trained)), df.load_first_stage(first_stage.parent, torch.device("cpu")),
                            images, torch.device("cpu"), torch.float32)


def test_defaults_trained_on_one_first_stage_ship_it_once(first_stage, images, tmp_path, capsys):
    ship = tmp_path / "ship"
    runs = {}
    for task in (df.Task.SUPERRES, df.Task.INPAINT):
        training = df.DiffusionTraining(task=task, crop=32, batch_size=2)
        runs[task] = df.train_diffusion(TINY_UNET, training, first_stage, images, _run(tmp_path / task.value, steps=1))
        code, err = _cli(["train", "export", str(tmp_path / task.value), "--name", f"default-{task.value}", "--dest",
                          str(ship), "--recipe", "ldmtool train ...", "--first-stage-file", "shared-kl.safetensors"], capsys)
        assert code in (0, None), err
    shared = load_file(str(ship / "shared-kl.safetensors"))
    assert {k.split(".")[0] for k in shared} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    for task, run in runs.items():
        shipped = ship / f"default-{task.value}.safetensors"
        assert not [k for k in load_file(str(shipped)) if k.startswith("first_stage_model.")]
        assert yaml.safe_load(shipped.with_suffix(".yaml").read_text())["ldmtool"]["first_stage_weights"] == "shared-kl.safetensors"
        from ldmtool.checkpoints.tools import inspect_checkpoint

        assert inspect_checkpoint(shipped)["matches"]  # `models inspect` sees the shared first stage too
        full, half = ldmtool.load_model(run), ldmtool.load_model(shipped)
        for name, value in full.first_stage_model.state_dict().items():
            torch.testing.assert_close(half.first_stage_model.state_dict()[name], value.half().float())
    other = ae.train_autoencoder(TINY_AE, ae.AutoencoderTraining(crop=32, batch_size=2, lr=1e-3, seed=9), images,
                                 _run(tmp_path / "ae-other", steps=1))
    df.train_diffusion(TINY_UNET, df.DiffusionTraining(crop=32, batch_size=2), other, images, _run(tmp_path / "sr2", steps=1))
    code, err = _cli(["train", "export", str(tmp_path / "sr2"), "--name", "default-other", "--dest", str(ship),
                      "--first-stage-file", "shared-kl.safetensors"], capsys)
    assert code == 2 and "a different first stage is already shipped" in err
    (ship / "shared-kl.safetensors").unlink()
    with pytest.raises(ldmtool.errors.CheckpointError, match="not beside it"):
        ldmtool.load_model(ship / "default-superres.safetensors")


def test_freeze_encoder_keeps_the_latent_space_and_trains_the_decoder(first_stage, images, tmp_path):
    training = ae.AutoencoderTraining(crop=32, batch_size=2, lr=1e-3, init=str(first_stage), freeze_encoder=True)
    tuned = ae.train_autoencoder(TINY_AE, training, images, _run(tmp_path, steps=3))
    before, after = load_file(str(first_stage)), load_file(str(tuned))
    encoder_side = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    decoder_side = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder_side and all(torch.equal(before[k], after[k]) for k in encoder_side)
    assert any(not torch.equal(before[k], after[k]) for k in decoder_side)


def test_autoencoder_init_errors_are_usage_errors(first_stage, images, tmp_path):
    with pytest.raises(UsageError, match="--freeze-encoder needs --init"):
        ae.AutoencoderTraining(freeze_encoder=True)
    wider = ae.AutoencoderArch(factor=4, ch=64)
    with pytest.raises(UsageError, match="differ in shape"):
        ae.AutoencoderTrainer(wider, ae.AutoencoderTraining(crop=32, init=str(first_stage)), images,
                              torch.device("cpu"), torch.float32)
    with pytest.raises(UsageError, match="no such checkpoint"):
        ae.AutoencoderTrainer(TINY_AE, ae.AutoencoderTraining(crop=32, init=str(tmp_path / "none.safetensors")),
                              images, torch.device("cpu"), torch.float32)


def test_procedural_share_mixes_generated_scenes_into_the_crops(images):
    from ldmtool.train.procedural import procedural_image

    def crops(share: float) -> np.ndarray:
        training = ae.AutoencoderTraining(crop=32, batch_size=8, procedural_share=share)
        return ae.AutoencoderTrainer(TINY_AE, training, images, torch.device("cpu"), torch.float32).crops(5)

    plain, half, mixed_again = crops(0.0), crops(0.5), crops(0.5)
    np.testing.assert_array_equal(half, mixed_again)  # deterministic in (seed, step)
    replaced = [i for i in range(8) if not np.array_equal(half[i], plain[i])]
    assert 0 < len(replaced) < 8
    assert procedural_image(7, 32).shape == (32, 32, 3) and procedural_image(7, 32).dtype == np.uint8
    np.testing.assert_array_equal(procedural_image(7, 32), procedural_image(7, 32))


def test_export_with_a_fine_tuned_decoder_swaps_only_the_first_stage(first_stage, images, tmp_path, capsys):
    training = df.DiffusionTraining(task=df.Task.SUPERRES, crop=32, batch_size=2, scale=4)
    df.train_diffusion(TINY_UNET, training, first_stage, images, _run(tmp_path / "run", steps=1))
    tuned = ae.train_autoencoder(TINY_AE, ae.AutoencoderTraining(crop=32, batch_size=2, lr=1e-3, init=str(first_stage),
                                                                 freeze_encoder=True), images, _run(tmp_path / "dec", steps=2))
    code, err = _cli(["train", "export", str(tmp_path / "run"), "--name", "m", "--dest", str(tmp_path / "ship"),
                      "--first-stage", str(tmp_path / "dec")], capsys)
    assert code in (0, None), err
    shipped, decoder = load_file(str(tmp_path / "ship" / "m.safetensors")), load_file(str(tuned))
    for key, value in decoder.items():
        torch.testing.assert_close(shipped["first_stage_model." + key], value.half(), rtol=0, atol=0)
    retrained = ae.train_autoencoder(TINY_AE, ae.AutoencoderTraining(crop=32, batch_size=2, lr=1e-3, init=str(first_stage)),
                                     images, _run(tmp_path / "both", steps=1))
    code, err = _cli(["train", "export", str(tmp_path / "run"), "--name", "m2", "--dest", str(tmp_path / "ship"),
                      "--first-stage", str(retrained)], capsys)
    assert code == 2 and "encoder differs" in err and err.count("\n") == 1, err


def test_uncond_trains_on_procedural_landscapes_and_samples(first_stage, tmp_path, capsys):
    from ldmtool.train.procedural import semantic_sample

    training = df.DiffusionTraining(task=df.Task.UNCOND, crop=32, batch_size=2, procedural=True)
    trainer = df.DiffusionTrainer(TINY_UNET, training, df.load_first_stage(first_stage, torch.device("cpu")), [],
                                  torch.device("cpu"), torch.float32)
    images, sources = trainer.samples(3)
    assert sources is None and images.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(images[0], semantic_sample(derive_seed(0, "uncond/6"), 32)[0])
    code, err = _cli(["train", "diffusion", "--task", "uncond", "--data", "procedural", "--first-stage", str(first_stage),
                      "--channels", "32", "--channel-mult", "1,2", "--attention-at", "2", "--crop", "32", "--batch-size", "1",
                      "--steps", "1", "--device", "cpu", "--quiet", "-o", str(tmp_path / "run")], capsys)
    assert code in (0, None), err
    code, err = _cli(["sample", "--model", str(tmp_path / "run" / "model.safetensors"), "--n", "1", "--steps", "2",
                      "--seed", "1", "--device", "cpu", "--quiet", "-o", str(tmp_path / "out")], capsys)
    assert code in (0, None), err
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_export_leaves_out_the_unused_bert_logits_and_still_loads(first_stage, tmp_path, capsys):
    training = df.DiffusionTraining(task=df.Task.TXT2IMG, crop=32, batch_size=1, text_width=32, text_layers=1)
    path = df.train_diffusion(TINY_UNET, training, first_stage, [], _run(tmp_path / "run", steps=1))
    assert "cond_stage_model.transformer.to_logits.weight" in load_file(str(path))
    code, err = _cli(["train", "export", str(tmp_path / "run"), "--name", "t", "--dest", str(tmp_path / "ship")], capsys)
    assert code in (0, None), err
    shipped = tmp_path / "ship" / "t.safetensors"
    assert not any("to_logits" in k for k in load_file(str(shipped)))
    full, slim = ldmtool.load_model(path), ldmtool.load_model(shipped)
    prompt = ["a red circle above a blue square"]
    with torch.no_grad():
        torch.testing.assert_close(slim.cond_stage_model.encode(prompt).float(), full.cond_stage_model.encode(prompt).float(),
                                   rtol=0, atol=2e-2)  # the fp16 copy of the same encoder


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_prediction_target_matches_diffusers(first_stage, images, prediction):
    """The loss is zero for a network that returns diffusers' own target (noise, or get_velocity for v)."""
    from diffusers import DDPMScheduler

    trainer = _superres_trainer(first_stage, images, prediction=prediction)
    trainer.scale_factor = 1.0
    batch = trainer.batch(0)
    noise, t = trainer.noise_and_timesteps(batch.z0, 0)
    oracle = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0155, beta_schedule="scaled_linear")
    target = noise if prediction == "eps" else oracle.get_velocity(batch.z0, noise, t)
    trainer.unet = lambda x, t, context=None: target
    assert trainer.loss(batch, noise, t).item() < 1e-10
    assert df.DiffusionTraining(prediction=prediction).prediction == prediction
    with pytest.raises(UsageError, match="--prediction 'x'"):
        df.DiffusionTraining(prediction="x")


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_x0_loss_is_the_error_of_the_implied_image(first_stage, images, prediction):
    """`--x0-loss`: the loss is the MSE of the x0 each prediction implies (diffusers' DDPM step formula for
    the predicted original sample), whatever the parameterization."""
    from diffusers import DDPMScheduler

    trainer = _superres_trainer(first_stage, images, prediction=prediction, x0_loss=True)
    trainer.scale_factor = 1.0
    batch = trainer.batch(0)
    noise, t = trainer.noise_and_timesteps(batch.z0, 0)
    oracle = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0155, beta_schedule="scaled_linear",
                           prediction_type="epsilon" if prediction == "eps" else "v_prediction", clip_sample=False)
    x_t = oracle.add_noise(batch.z0, noise, t)
    wrong = torch.randn(batch.z0.shape, generator=torch.Generator().manual_seed(3))
    trainer.unet = lambda x, t, context=None: wrong
    implied = torch.stack([oracle.step(wrong[i:i + 1], int(t[i]), x_t[i:i + 1]).pred_original_sample[0]
                           for i in range(len(t))])
    torch.testing.assert_close(trainer.loss(batch, noise, t), (implied - batch.z0).pow(2).mean(), rtol=1e-4, atol=1e-6)


def test_v_prediction_export_loads_as_v(first_stage, tmp_path, capsys):
    training = df.DiffusionTraining(task=df.Task.SEMANTIC, crop=32, batch_size=1, prediction="v")
    path = df.train_diffusion(TINY_UNET, training, first_stage, [], _run(tmp_path / "run", steps=1))
    assert yaml.safe_load(path.with_name("model.yaml").read_text())["model"]["params"]["parameterization"] == "v"
    assert ldmtool.load_model(path).parameterization == "v"


def test_init_also_starts_the_text_encoder_from_the_checkpoint(first_stage, tmp_path):
    from dataclasses import replace

    training = df.DiffusionTraining(task=df.Task.TXT2IMG, crop=32, batch_size=1, text_width=32, text_layers=1)
    trained = df.train_diffusion(TINY_UNET, training, first_stage, [], _run(tmp_path / "a", steps=2))
    text = {k[len(df.COND_PREFIX):]: v for k, v in load_file(str(trained)).items() if k.startswith(df.COND_PREFIX)}
    trainer = df.DiffusionTrainer(TINY_UNET, replace(training, init=str(trained), prediction="v"),
                                  df.load_first_stage(first_stage, torch.device("cpu")), [], torch.device("cpu"), torch.float32)
    for name, value in trainer.cond_stage.state_dict().items():
        torch.testing.assert_close(value, text[name], msg=name)


def test_a_shipped_default_names_its_first_stage_and_init_weights():
    """`--first-stage default-txt2img` is the first stage that default ships with (fp16 as shipped, loaded
    strictly into the architecture its YAML gives); `--init default-txt2img` is its weights file."""
    from ldmtool.checkpoints.presets import shipped_model
    from ldmtool.train import diffusion_parts as parts

    weights, config = parts.shipped_first_stage("default-txt2img")
    shipped_doc = yaml.safe_load(shipped_model("default-txt2img").config.read_text())
    assert weights.name == shipped_doc["ldmtool"]["first_stage_weights"]
    stage = parts.load_first_stage(Path("default-txt2img"), "cpu")
    stored = load_file(str(weights))
    assert all(torch.equal(v.float(), stored[k].float()) for k, v in stage.model.state_dict().items())
    assert stage.channels == config["params"]["embed_dim"]
    assert parts.shipped_weights("default-txt2img") == shipped_model("default-txt2img").weights
    assert parts.shipped_first_stage("no-such-default") is None
    with pytest.raises(UsageError, match="no config beside it"):
        parts.load_first_stage(Path("no-such-default"), "cpu")


def test_16_bit_grey_trains_as_every_command_reads_it(tmp_path):
    from ldmtool.io.images import read_image
    from ldmtool.train.data import load_rgb

    pixels = np.full((8, 8), 16384, np.uint16)  # a 25% grey, and a 12.5% grey half: not scaled by their maximum
    pixels[:, :4] = 8192
    Image.fromarray(pixels).save(tmp_path / "g16.png")
    expected = (read_image(tmp_path / "g16.png").rgb * 255).round()
    np.testing.assert_array_equal(load_rgb(tmp_path / "g16.png"), expected.astype(np.uint8))
    assert set(np.unique(expected)) == {32, 64}
