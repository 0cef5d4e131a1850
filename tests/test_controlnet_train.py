"""`ldmtool train controlnet` on a tiny random factor-4 text-to-image model written by the test (the shape of
the shipped default-txt2img): how the ControlNet starts, its loss against diffusers' scheduler (test-only
oracle), exact resume, and an export that `load_controlnet` and `txt2img --controlnet` read."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import ldmtool
from ldmtool.addons.controlnet import base_heads, check_fits, hint_factor, load_controlnet
from ldmtool.checkpoints.tiny import save_tiny_checkpoint
from ldmtool.errors import CheckpointError
from ldmtool.runtime.seeds import derive_seed
from ldmtool.train import common
from ldmtool.train.controlnet import (
    ControlNetTrainer,
    ControlNetTraining,
    HintSource,
    controlnet_params,
    hint_widths,
    train_controlnet,
)

CROP = 32


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny default-txt2img (kl-f4 first stage, LDM-BERT, v-prediction) with random weights."""
    path = tmp_path_factory.mktemp("base") / "tiny-txt2img.safetensors"
    save_tiny_checkpoint(path, "default-txt2img", seed=1, with_config=True)
    return path


def _training(base: Path, **kw) -> ControlNetTraining:
    return ControlNetTraining(**{"base": str(base), "crop": CROP, "batch_size": 2, **kw})


def _run(out: Path, steps: int, **kw) -> common.RunOptions:
    return common.RunOptions(out=out, steps=steps, log_every=1, device="cpu", quiet=True, **kw)


def _trainer(base: Path, **kw) -> ControlNetTrainer:
    return ControlNetTrainer(_training(base, **kw), [], torch.device("cpu"), torch.float32)


def test_hint_encoder_downsamples_by_the_first_stage_factor():
    assert hint_widths(8) == (16, 32, 96, 256)  # the released ControlNets' (kl-f8)
    assert hint_widths(4) == (16, 32, 64)  # two stride-2 convs for kl-f4
    assert hint_widths(2) == (16, 32)


def test_the_trainer_initialises_from_its_seed_and_leaves_the_global_rng_alone(base):
    """It seeded torch's global generator, so a script that built a trainer drew other random numbers after."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = _trainer(base, seed=5)
    assert torch.equal(torch.rand(3), expected)
    second = _trainer(base, seed=5)
    for (name, a), (_, b) in zip(first.net.state_dict().items(), second.net.state_dict().items()):
        assert torch.equal(a, b), name


def test_controlnet_starts_as_the_base_encoder_and_changes_nothing(base):
    trainer = _trainer(base)
    net, unet = trainer.net, trainer.base.denoiser
    assert trainer.factor == 4 and hint_factor(net) == 4
    strides = [m.stride[0] for m in net.input_hint_block if isinstance(m, torch.nn.Conv2d)]
    assert strides.count(2) == 2
    base_state = unet.state_dict()
    for key, value in net.state_dict().items():
        if key.startswith(("time_embed.", "input_blocks.", "middle_block.")):
            assert torch.equal(value, base_state[key]), key
        elif key.startswith(("zero_convs.", "middle_block_out.")):
            assert not value.any(), key
    last = net.input_hint_block[-1]
    assert not last.weight.any() and not last.bias.any()
    assert net.input_hint_block[0].weight.abs().sum() > 0  # the other hint convs are initialised, not zero
    z0, hint, context = trainer.batch(0)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        controlled = unet(z0, t, context=context, control=net(z0, hint, t, context))
        assert torch.equal(controlled, unet(z0, t, context=context))


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_loss_is_the_base_objective_on_the_controlled_output(base, prediction):
    from diffusers import DDPMScheduler

    trainer = _trainer(base)
    trainer.base.parameterization = prediction
    torch.manual_seed(0)
    for p in trainer.net.parameters():  # nonzero zero convs, so the control term counts
        p.data.add_(torch.randn_like(p) * 0.01)
    z0, hint, context = trainer.batch(3)
    betas = trainer.base.betas.double()
    scheduler = DDPMScheduler(num_train_timesteps=len(betas), trained_betas=betas.numpy())
    generator = torch.Generator("cpu").manual_seed(derive_seed(0, "noise/3"))  # the step's draw
    t = torch.randint(0, len(betas), (z0.shape[0],), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    x_t = scheduler.add_noise(z0, noise, t)
    target = noise if prediction == "eps" else scheduler.get_velocity(z0, noise, t)
    with torch.no_grad():
        out = trainer.base.denoiser(x_t, t, context=context, control=trainer.net(x_t, hint, t, context))
        expected = (out - target).pow(2).mean()
        assert float(trainer.loss(z0, hint, context, 3)) == pytest.approx(float(expected), rel=1e-4)


def test_hints_are_the_preprocess_commands_and_captions_drop_at_the_given_share(base):
    from ldmtool.pipelines.preprocess import PREPROCESSORS, PreprocessSettings

    trainer = _trainer(base, hint=HintSource(low=50, high=120), caption_dropout=0.5)
    images, captions, indices = trainer.samples(0)
    _, hint, _ = trainer.batch(0)
    edges = PREPROCESSORS["canny"](images[1], PreprocessSettings(low=50, high=120), 0)
    assert np.array_equal(hint[1].permute(1, 2, 0).numpy(), edges / 255.0) and edges.any()
    encode = trainer.base.cond_stage.encode
    many = _trainer(base, caption_dropout=0.5, batch_size=32)
    _, captions, indices = many.samples(0)
    context = many.context(captions, indices)
    with torch.no_grad():
        empty = encode([""])[0]
    dropped = sum(bool(torch.allclose(row, empty, atol=1e-5)) for row in context)
    assert 7 <= dropped <= 25  # Binomial(32, 0.5): 99.9% within


def test_resume_equals_the_uninterrupted_run(base, tmp_path):
    whole = train_controlnet(_training(base), [], _run(tmp_path / "whole", steps=2))
    train_controlnet(_training(base), [], _run(tmp_path / "split", steps=1))
    torch.manual_seed(123)  # the resumed run must not depend on the global seed
    resumed = train_controlnet(_training(base), [], _run(tmp_path / "split", steps=2, resume=True))
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli(args, capsys):
    from ldmtool.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_trains_a_controlnet_that_loads_and_changes_txt2img(base, tmp_path, capsys):
    run = tmp_path / "canny"
    code, err = _cli(["train", "controlnet", "--model", str(base), "--hint", "canny", "--low", "50", "--high", "120",
                      "--crop", str(CROP), "--batch-size", "2", "--steps", "3", "--lr", "0.01", "--device", "cpu",
                      "--quiet", "-o", str(run)], capsys)
    assert code in (0, None), err
    bundle = ldmtool.load_model(base)
    net = load_controlnet(run / "model.safetensors", heads=base_heads(bundle))
    assert set(net.state_dict()) == set(load_file(str(run / "model.safetensors")))  # released names, no prefix
    assert hint_factor(net) == 4 and net.config["hint_block_channels"] == [16, 32, 64]
    check_fits(net, bundle, "canny")
    config = ldmtool.build_model(str(run / "model.yaml"), device="meta")  # the export's cldm config builds it
    assert set(config.state_dict()) == set(net.state_dict())

    hint = np.zeros((CROP, CROP, 3), np.uint8)
    hint[8:24, 8] = hint[8:24, 23] = hint[8, 8:24] = hint[23, 8:24] = 255
    Image.fromarray(hint).save(tmp_path / "hint.png")
    common_args = ["txt2img", "--model", str(base), "--prompt", "a red circle", "-W", str(CROP), "-H", str(CROP),
                   "--steps", "2", "--seed", "5", "--quiet"]
    assert _cli([*common_args, "-o", str(tmp_path / "plain.png")], capsys)[0] in (0, None)
    code, err = _cli([*common_args, "--controlnet", str(run / "model.safetensors"), "--control-image",
                      str(tmp_path / "hint.png"), "-o", str(tmp_path / "controlled.png")], capsys)
    assert code in (0, None), err
    plain = np.asarray(Image.open(tmp_path / "plain.png"))
    controlled = np.asarray(Image.open(tmp_path / "controlled.png"))
    assert not np.array_equal(plain, controlled)  # 3 steps on random weights: a small change, but a change
    torch.manual_seed(0)
    x, t, context = torch.randn(1, 3, CROP // 4, CROP // 4), torch.tensor([500]), bundle.cond_stage.encode(["a red circle"])
    hint_tensor = torch.from_numpy(hint).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        residuals = net(x, hint_tensor, t, context)
        change = bundle.unet(x, t, context=context, control=residuals) - bundle.unet(x, t, context=context)
    assert all(r.abs().max() > 0 for r in residuals) and change.abs().max() > 1e-3


def test_a_controlnet_for_another_first_stage_factor_is_refused(base):
    from ldmtool.addons.controlnet import base_unet_params
    from ldmtool.nets.controlnet import ControlNet

    bundle = ldmtool.load_model(base)
    params = {**controlnet_params(base_unet_params(bundle), 8)}
    with torch.device("meta"):
        net = ControlNet(**params)
    net.config = params
    with pytest.raises(CheckpointError, match="hint encoder downsamples by 8; the model's first stage by 4"):
        check_fits(net, bundle, "f8.safetensors")


@pytest.mark.parametrize("args, message", [
    (["--hint", "depth"], "--hint 'depth': choose one of canny"),
    (["--low", "200", "--high", "100"], "need low <= high"),
])
def test_cli_usage_errors_are_one_line(base, tmp_path, capsys, args, message):
    code, err = _cli(["train", "controlnet", "--model", str(base), "-o", str(tmp_path / "run"), *args], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_model_conditioned_by_concat_is_one_line(tmp_path, capsys):
    path = tmp_path / "sr.safetensors"
    save_tiny_checkpoint(path, "ldm-bsr-sr", with_config=True)
    Image.fromarray(np.zeros((CROP, CROP, 3), np.uint8)).save(tmp_path / "black.png")
    code, err = _cli(["train", "controlnet", "--model", str(path), "--data", str(tmp_path), "-o", str(tmp_path / "run")],
                     capsys)
    assert code == 2 and "conditioned by concat" in err and err.count("\n") == 1, err
