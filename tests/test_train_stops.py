"""How training runs stop: Ctrl-C and SIGTERM save a step boundary (resume stays exact), and bad run folders,
bad images and wrong files end in one line with the documented exit code."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldmtool.errors import Interrupted
from ldmtool.train import autoencoder as ae, common
from random_images import random_pngs

TINY_AE = ae.AutoencoderArch(factor=4, ch=32, num_res_blocks=1)
TRAINING = ae.AutoencoderTraining(crop=16, batch_size=1, lr=1e-3)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return random_pngs(tmp_path_factory.mktemp("images"), count=3, side=48)


def _run(out: Path, steps: int, resume: bool = False) -> common.RunOptions:
    return common.RunOptions(out=out, steps=steps, save_every=1000, log_every=1, device="cpu", quiet=True,
                             resume=resume)


def _signal_during_ema_update(monkeypatch, on_call: int, signals: tuple[int, ...]) -> None:
    """Send `signals` to this process from inside the `on_call`-th EMA update: after the optimizer step, when
    saving would mix the new weights with the old EMA and step count."""
    original, calls = common.Ema.update, []

    def update(self, module):
        calls.append(1)
        if len(calls) == on_call:
            for number in signals:
                os.kill(os.getpid(), number)
        return original(self, module)

    monkeypatch.setattr(common.Ema, "update", update)


def test_sigterm_mid_step_finishes_the_step_saves_it_and_resume_is_exact(images, tmp_path, monkeypatch):
    torch.manual_seed(5)
    whole = load_file(str(ae.train_autoencoder(TINY_AE, TRAINING, images, _run(tmp_path / "whole", 4))))
    _signal_during_ema_update(monkeypatch, 3, (signal.SIGTERM,))
    torch.manual_seed(5)
    with pytest.raises(Interrupted, match="stopped at step 3"):
        ae.train_autoencoder(TINY_AE, TRAINING, images, _run(tmp_path / "split", 4))
    monkeypatch.undo()
    assert torch.load(tmp_path / "split" / common.STATE_FILE, weights_only=True)["step"] == 3
    resumed = load_file(str(ae.train_autoencoder(TINY_AE, TRAINING, images, _run(tmp_path / "split", 4, resume=True))))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_interrupt_stops_at_once_and_saves_nothing_half_done(images, tmp_path, monkeypatch):
    _signal_during_ema_update(monkeypatch, 2, (signal.SIGINT, signal.SIGINT))
    with pytest.raises(Interrupted, match="at once during step 2; nothing trained yet"):
        ae.train_autoencoder(TINY_AE, TRAINING, images, _run(tmp_path / "run", 4))
    assert not (tmp_path / "run" / common.STATE_FILE).exists()


def test_sigterm_to_a_training_process_exits_130_with_the_state_of_its_last_step(images, tmp_path):
    command = [sys.executable, "-m", "ldmtool", "train", "autoencoder", "--data", str(images[0].parent),
               "--crop", "16", "--batch-size", "1", "--steps", "100000", "--log-every", "1", "--device", "cpu",
               "-o", str(tmp_path / "run")]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith("step 2/"):
            process.send_signal(signal.SIGTERM)
            break
    rest = process.stderr.read().strip().splitlines()
    assert process.wait(timeout=60) == 130, rest
    assert rest[-1].startswith("ldmtool: error: training stopped at step "), rest
    logged = json.loads((tmp_path / "run" / common.LOG_FILE).read_text().splitlines()[-1])["step"]
    assert torch.load(tmp_path / "run" / common.STATE_FILE, weights_only=True)["step"] == logged
    assert f"step {logged};" in rest[-1]


SIGTERM_BEFORE_THE_LOOP = """
import os, signal, sys, time
import ldmtool.train.autoencoder as ae
from ldmtool.cli.app import main

def train_autoencoder(*args, **kwargs):  # a signal while the data or the model is still loading
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

ae.train_autoencoder = train_autoencoder
main(sys.argv[1:])
"""


def test_sigterm_before_the_training_loop_exits_130_in_one_line(images, tmp_path):
    """The signal ended the process (exit 143 in a shell; temporary files left): the loop's handler was not
    installed yet."""
    command = [sys.executable, "-c", SIGTERM_BEFORE_THE_LOOP, "train", "autoencoder", "--data", str(images[0].parent),
               "--crop", "16", "--steps", "2", "--device", "cpu", "-o", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr  # as Ctrl-C there (typer's own exit code for it)
    assert "Traceback" not in result.stderr


def _nan_loss_at(monkeypatch, on_call: int) -> None:
    """The `on_call`-th step reports a NaN loss term, as a diverged run does after its update."""
    original, calls = ae.AutoencoderTrainer.step, []

    def step(self, step):
        metrics = original(self, step)
        calls.append(1)
        return {**metrics, "total": float("nan")} if len(calls) == on_call else metrics

    monkeypatch.setattr(ae.AutoencoderTrainer, "step", step)


def test_a_nan_loss_stops_the_run_keeping_the_last_good_state(images, tmp_path, monkeypatch):
    run = common.RunOptions(out=tmp_path / "run", steps=6, save_every=2, log_every=1, device="cpu", quiet=True)
    _nan_loss_at(monkeypatch, 3)
    with pytest.raises(common.FatalError) as stopped:
        ae.train_autoencoder(TINY_AE, TRAINING, images, run)
    assert str(stopped.value) == (f"training stopped at step 3: the loss is not finite (total=nan), so its weights "
                                  f"are not saved; {tmp_path / 'run'} keeps step 2, but resuming repeats the same "
                                  "steps exactly: start a new run (a lower --lr)")  # not --resume: it diverges again
    assert torch.load(tmp_path / "run" / common.STATE_FILE, weights_only=True)["step"] == 2
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / common.LOG_FILE).read_text().splitlines()] == [1, 2]


def test_a_huge_lr_exits_3_naming_the_step_and_exports_no_broken_weights(images, tmp_path, capsys):
    """lr 1e30: the first update blows the weights up, the next loss is NaN (the run used to go on and export
    the NaN weights); with --save-every 1 the state of step 1 is the last one saved."""
    code, err = _cli(_train(images[0].parent, tmp_path / "run", "--lr", "1e30", "--steps", "6", "--save-every", "1"),
                     capsys)
    assert code == 3 and err.count("\n") == 1, err
    assert err.startswith("ldmtool: error: training stopped at step 2: the loss is not finite (") and "=nan)" in err
    assert torch.load(tmp_path / "run" / common.STATE_FILE, weights_only=True)["step"] == 1
    exported = load_file(str(tmp_path / "run" / common.MODEL_FILE))
    assert all(torch.isfinite(tensor).all() for tensor in exported.values())


def test_weights_that_are_not_finite_are_never_saved(images, tmp_path, monkeypatch):
    """A finite loss can still leave inf weights behind (the update comes after the loss): the save refuses."""
    original = ae.AutoencoderTrainer.state

    def state(self, step):
        saved = original(self, step)
        saved["ema"]["shadow"] = {**saved["ema"]["shadow"], "broken": torch.tensor([float("inf")])}
        return saved

    monkeypatch.setattr(ae.AutoencoderTrainer, "state", state)
    with pytest.raises(common.FatalError, match="at step 2: ema/shadow/broken is not finite, so its weights are not "
                                                "saved; nothing trained yet, so nothing saved"):
        ae.train_autoencoder(TINY_AE, TRAINING, images, _run(tmp_path / "run", 2))
    assert not (tmp_path / "run" / common.STATE_FILE).exists() and not (tmp_path / "run" / common.MODEL_FILE).exists()


def _cli(args, capsys):
    from ldmtool.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "autoencoder", "--data", str(data), "--crop", "16", "--batch-size", "2", "--steps", "3",
            "--device", "cpu", "--quiet", "-o", str(out), *extra]


@pytest.mark.parametrize("out", ["a_file.png", "a_file.png/run"])
def test_an_output_that_cannot_be_a_run_folder_is_fatal_in_one_line(images, tmp_path, capsys, out):
    (tmp_path / "a_file.png").write_bytes(b"not a folder")
    code, err = _cli(_train(images[0].parent, tmp_path / out), capsys)
    assert code == 3 and "a_file.png" in err and err.count("\n") == 1, err


def test_make_run_folder_turns_an_os_error_into_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(common.FatalError, match="cannot create the run folder .Permission denied"):
        common.make_run_folder(tmp_path / "run")


def test_a_truncated_training_image_is_one_line_naming_it(images, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "trunc.png").write_bytes(images[1].read_bytes()[:100])  # the header reads; the pixels do not
    for i in range(4):
        (data / f"ok{i}.png").write_bytes(images[0].read_bytes())
    code, err = _cli(_train(data, tmp_path / "run", "--steps", "50"), capsys)
    assert code == 3 and "trunc.png: cannot read this training image" in err and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def run_folder(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ae"
    torch.manual_seed(0)
    ae.train_autoencoder(TINY_AE, TRAINING, images, _run(out, 1))
    return out


def test_a_first_stage_config_instead_of_its_weights_is_a_usage_error(images, run_folder, tmp_path, capsys):
    code, err = _cli(["train", "diffusion", "--task", "superres", "--first-stage", str(run_folder / "model.yaml"),
                      "--data", str(images[0].parent), "--channels", "32", "--channel-mult", "1,2", "--attention-at",
                      "2", "--crop", "16", "--batch-size", "1", "--steps", "1", "--device", "cpu", "--quiet",
                      "-o", str(tmp_path / "sr")], capsys)
    assert code == 2 and "expected an autoencoder's .safetensors" in err and err.count("\n") == 1, err


def test_export_of_a_folder_without_its_config_is_a_usage_error(run_folder, tmp_path, capsys):
    folder = tmp_path / "noyaml"
    folder.mkdir()
    (folder / common.MODEL_FILE).write_bytes((run_folder / common.MODEL_FILE).read_bytes())
    code, err = _cli(["train", "export", str(folder), "--name", "z", "--dest", str(tmp_path / "ship")], capsys)
    assert code == 2 and "noyaml: no readable model.yaml" in err and err.count("\n") == 1, err


def test_export_to_an_unwritable_destination_is_fatal_in_one_line(run_folder, tmp_path, capsys):
    (tmp_path / "a_file").write_bytes(b"")
    code, err = _cli(["train", "export", str(run_folder), "--name", "z", "--dest", str(tmp_path / "a_file" / "x")],
                     capsys)
    assert code == 3 and "cannot write" in err and err.count("\n") == 1, err


def test_resume_refuses_a_changed_training_option_and_names_it(images, run_folder, tmp_path):
    ae.train_autoencoder(TINY_AE, TRAINING, images, _run(tmp_path, 1))
    changed = [(ae.AutoencoderTraining(crop=16, batch_size=1, lr=2e-3), r"different lr \(--lr 0.001, now 0.002\)"),
               (ae.AutoencoderTraining(crop=16, batch_size=1, lr=1e-3, seed=7), r"--seed 0, now 7"),
               (ae.AutoencoderTraining(crop=16, batch_size=1, lr=1e-3, loss=ae.AutoencoderLoss(kl_weight=1e-3)),
                r"--kl-weight 1e-06, now 0.001")]
    for training, message in changed:
        with pytest.raises(common.UsageError, match=message):
            ae.train_autoencoder(TINY_AE, training, images, _run(tmp_path, 2, resume=True))
    longer = ae.AutoencoderTraining(crop=16, batch_size=1, lr=1e-3, init=str(run_folder / common.MODEL_FILE))
    ae.train_autoencoder(TINY_AE, longer, images, _run(tmp_path, 2, resume=True))  # --steps and --init may change
    assert torch.load(tmp_path / common.STATE_FILE, weights_only=True)["step"] == 2


def test_resume_with_another_text_width_is_a_usage_error_not_a_size_mismatch(run_folder, tmp_path):
    from ldmtool.train import diffusion as df

    unet = df.UNetArch(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_head_channels=32)
    for width, resume in ((32, False), (64, True)):
        training = df.DiffusionTraining(task=df.Task.TXT2IMG, crop=16, batch_size=1, text_width=width, text_layers=1)
        run = _run(tmp_path, 1 + resume, resume=resume)
        if not resume:
            df.train_diffusion(unet, training, run_folder, [], run)
    with pytest.raises(common.UsageError, match=r"different text_width \(--text-width 32, now 64\)"):
        df.train_diffusion(unet, training, run_folder, [], run)


def test_resume_compares_controlnet_hint_settings():
    saved = {"arch": {"hint": "canny"}, "training": {"lr": 1e-4, "hint": {"kind": "canny", "low": 100, "high": 200}}}
    same = {"arch": {"hint": "canny"}, "training": {"lr": 1e-4, "hint": {"kind": "canny", "low": 100, "high": 200}}}
    assert common.changed_option(saved, same) is None
    lower = {**same, "training": {"lr": 1e-4, "hint": {"kind": "canny", "low": 10, "high": 200}}}
    assert common.changed_option(saved, lower) == "different low (--low 100, now 10)"
    newer = {**same, "training": {**same["training"], "terminal_share": 0.0}}  # an option added since: its default
    assert common.changed_option(saved, newer) is None
