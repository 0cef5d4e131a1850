"""`--seed` alone decides a training run's initial weights: the same command gives the same model."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldmtool.train import autoencoder as ae, common, diffusion as df
from random_images import random_pngs

TINY_AE = ae.AutoencoderArch(factor=4, ch=32, num_res_blocks=1)
TINY_UNET = df.UNetArch(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_head_channels=32)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return random_pngs(tmp_path_factory.mktemp("images"), count=2, side=32)


def _run(out: Path) -> common.RunOptions:
    return common.RunOptions(out=out, steps=1, log_every=1, device="cpu", quiet=True)


def _assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)


def _train_autoencoder(images, out: Path, global_seed: int, seed: int = 0, disc_weight: float = 0.0) -> Path:
    torch.manual_seed(global_seed)  # must not matter: only the run's seed does
    training = ae.AutoencoderTraining(crop=16, batch_size=1, seed=seed, loss=ae.AutoencoderLoss(disc_weight=disc_weight))
    return ae.train_autoencoder(TINY_AE, training, images, _run(out))


def test_the_same_seed_gives_the_same_autoencoder(images, tmp_path):
    first = _train_autoencoder(images, tmp_path / "a", global_seed=1, disc_weight=0.1)
    _assert_same_weights(first, _train_autoencoder(images, tmp_path / "b", global_seed=2, disc_weight=0.1))
    other = load_file(str(_train_autoencoder(images, tmp_path / "c", global_seed=1, seed=5)))
    assert not torch.equal(other["decoder.conv_out.weight"], load_file(str(first))["decoder.conv_out.weight"])


def test_the_same_seed_gives_the_same_diffusion_model(images, tmp_path):
    stage = _train_autoencoder(images, tmp_path / "ae", global_seed=0)
    runs = []
    for global_seed, name in [(1, "a"), (2, "b")]:
        torch.manual_seed(global_seed)
        training = df.DiffusionTraining(task=df.Task.SEMANTIC, crop=16, batch_size=1)  # a cond stage too
        runs.append(df.train_diffusion(TINY_UNET, training, stage, [], _run(tmp_path / name)))
    _assert_same_weights(*runs)


def test_building_the_networks_leaves_the_global_random_state_alone(images, tmp_path):
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    ae.AutoencoderTrainer(TINY_AE, ae.AutoencoderTraining(crop=16, batch_size=1), images, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)
