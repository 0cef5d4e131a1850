"""What every trainer shares: EMA, the resumable training state, exports in the original layout, progress.

A run folder holds
  state.pt          latest resumable state (weights, EMA, optimizers, step, the run's config)
  model.safetensors the latest export in the original CompVis key layout (EMA weights)
  model.yaml        its CompVis-format config
  log.jsonl         one JSON line per logged step
Every file is written to a temporary name and renamed, so an interrupted run never leaves a broken file.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol

import yaml

from ldmtool.errors import FatalError, Interrupted, UsageError
from ldmtool.train.data import UnreadableTrainingImage
from ldmtool.train.finite import diverged, non_finite_metric, non_finite_tensor
from ldmtool.train.resume_check import changed_option

if TYPE_CHECKING:
    import torch
    from torch import nn

STATE_FILE = "state.pt"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model.yaml"
LOG_FILE = "log.jsonl"


class Ema:
    """Exponential moving average of a module's parameters, with the LitEma warm-up.

    The decay used at update n is min(decay, (1 + n) / (10 + n)), so early averages are not dominated by
    the random initialisation.
    """

    def __init__(self, module: "nn.Module", decay: float = 0.999):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: p.detach().clone().float() for name, p in module.named_parameters()}

    def update(self, module: "nn.Module") -> None:
        import torch

        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        with torch.no_grad():
            for name, param in module.named_parameters():
                self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)

    def averaged_state(self, module: "nn.Module") -> dict[str, "torch.Tensor"]:
        """`module.state_dict()` with the averaged parameters in place of the raw ones (buffers kept)."""
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        for name, value in self.shadow.items():
            state[name] = value.to(state[name].dtype).clone()
        return state

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise FatalError(f"resume state has no EMA for {sorted(missing)[:3]} (different architecture?)")
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items() if k in self.shadow}


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)` and rename the result onto `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.chmod(tmp, 0o644)  # some writers create 0600 files; shipped models must be readable by all
        os.replace(tmp, path)
    except OSError as err:
        _discard(tmp)
        raise FatalError(f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):  # e.g. its folder could not be created
        tmp.unlink(missing_ok=True)


def save_state(run_dir: Path, state: Mapping[str, Any]) -> Path:
    """Write the resumable training state (plain tensors and numbers: loadable with weights_only=True)."""
    import torch

    path = Path(run_dir) / STATE_FILE
    atomic_write(path, lambda tmp: torch.save(dict(state), tmp))
    return path


def load_state(run_dir: Path, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The saved state of `run_dir`, refusing one whose run was defined differently (`changed_option`)."""
    import torch

    from ldmtool.checkpoints.files import refuse_vulnerable_torch

    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise UsageError(f"--resume: {path} does not exist (start without --resume, or point -o at the run)")
    refuse_vulnerable_torch(path, torch.__version__)
    state = torch.load(path, map_location="cpu", weights_only=True)
    changed = changed_option(state.get("run_config", {}), run_config)
    if changed:
        raise UsageError(f"--resume: {path} was trained with {changed}; resume with the options it was started "
                         "with, or pick a new -o folder")
    return state


def save_export(run_dir: Path, tensors: Mapping[str, "torch.Tensor"], config: Mapping[str, Any], *, half: bool = False) -> Path:
    """Write `model.safetensors` (original key names) and `model.yaml` (CompVis format) into `run_dir`."""
    from safetensors.torch import save_file

    def prepare(t: "torch.Tensor") -> "torch.Tensor":
        t = t.detach().cpu().contiguous()
        return t.half() if half and t.is_floating_point() else t

    weights = {k: prepare(v) for k, v in tensors.items()}
    model_path = Path(run_dir) / MODEL_FILE
    atomic_write(model_path, lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    write_config(Path(run_dir) / CONFIG_FILE, config)
    return model_path


def write_config(path: Path, config: Mapping[str, Any]) -> None:
    text = yaml.safe_dump(_plain(config), sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _plain(value: Any) -> Any:
    """Tuples to lists and numpy/torch scalars to Python numbers, so `yaml.safe_dump` accepts them."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


@dataclass(frozen=True)
class RunOptions:
    """How a run executes, as opposed to what it trains."""

    out: Path
    steps: int
    save_every: int = 500
    log_every: int = 25
    resume: bool = False
    device: str = "auto"
    precision: str = "auto"
    quiet: bool = False
    threads: Optional[int] = None


def autocast(device: "torch.device", dtype: "torch.dtype") -> contextlib.AbstractContextManager[Any]:
    """Mixed precision on GPUs (weights stay fp32); a no-op for fp32."""
    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class Progress:
    """A rich progress bar on a terminal; otherwise one plain line per log interval (for nohup logs).

    Every logged step is also appended to `log.jsonl` in the run folder.
    """

    def __init__(self, run_dir: Path, total: int, start: int, quiet: bool, description: str):
        self.log_path = Path(run_dir) / LOG_FILE
        self.total, self.quiet, self.start_time = total, quiet, time.time()
        self.start_step = start
        self._bar = None
        if not quiet and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress as RichProgress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), transient=False,
            )
            self._task = self._bar.add_task(description, total=total, completed=start, status="")

    def __enter__(self) -> "Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, step: int, metrics: Optional[Mapping[str, float]] = None) -> None:
        """Record that `step` steps are done; `metrics` (when given) are logged and shown."""
        status = ""
        if metrics:
            status = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            record = {"step": step, "seconds": round(time.time() - self.start_time, 2), **metrics}
            with open(self.log_path, "a") as log:
                log.write(json.dumps(record) + "\n")
            if self._bar is None and not self.quiet:
                print(f"step {step}/{self.total} {status}", file=sys.stderr, flush=True)
        if self._bar is not None:
            update = {"completed": step}
            if status:
                update["status"] = status
            self._bar.update(self._task, **update)


def set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def config_dict(obj: Any) -> dict[str, Any]:  # a dataclass instance
    """A dataclass config as a plain dict (stored in the resume state and the exported YAML)."""
    return _plain(asdict(obj))


def device_and_dtype(run: RunOptions) -> tuple["torch.device", "torch.dtype"]:
    """The training device and autocast dtype: fp32 on CPU; on a GPU `auto` is bf16 where supported."""
    import torch

    from ldmtool.runtime.device import choose_device, choose_dtype, legacy_auto_dtype

    set_threads(run.threads)
    device = choose_device(run.device)
    if run.precision != "auto":
        return device, choose_dtype(run.precision, device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return device, torch.bfloat16
    # Not sampling's auto (bf16 on CPUs with native bf16): training recipes are recorded in fp32 on the CPU.
    return device, legacy_auto_dtype(device)


def check_run_folder(out: Path) -> None:
    """Refuse, before anything is built, an `out` that cannot become a run folder (a file, no permission)."""
    if out.exists() and not out.is_dir():
        raise FatalError(f"{out}: a file is there, not a run folder; give -o a folder")
    existing = next(folder for folder in [out, *out.absolute().parents] if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise FatalError(f"{out}: cannot create the run folder ({existing} is not a writable folder)")


def make_run_folder(out: Path) -> Path:
    """`out`, created if needed; one that cannot be created is fatal (one line, not a traceback)."""
    check_run_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FatalError(f"{out}: cannot create the run folder ({err.strerror or err})") from err
    return out


class Trainer(Protocol):
    def step(self, step: int) -> dict[str, float]: ...
    def state(self, step: int) -> dict[str, Any]: ...
    def load(self, state: dict[str, Any]) -> int: ...
    def run_config(self) -> dict[str, Any]: ...
    def export(self, run_dir: Path, step: int) -> Path: ...


def run_loop(trainer: Trainer, run: RunOptions, description: str) -> Path:
    """Resume if asked, train to `run.steps`, save state + export every `save_every` steps and at the end.

    Ctrl-C and SIGTERM only ask the loop to stop: the step under way finishes, the state of that step boundary
    is saved (so a resume is exact) and `Interrupted` is raised. A second one stops at once, saving nothing
    more (the last saved state stays as it was). So does a loss or weight that is not finite, a FatalError.
    """
    out = make_run_folder(Path(run.out))
    start = trainer.load(load_state(out, trainer.run_config())) if run.resume else 0
    if not run.resume and (out / STATE_FILE).exists():
        raise UsageError(f"-o {out} already holds a run; add --resume to continue it or pick a new folder")
    done = saved = start
    with Progress(out, run.steps, start, run.quiet, description) as progress, StopRequests() as stop:
        try:
            for step in range(start, run.steps):
                if stop.requested:
                    break
                metrics = trainer.step(step)
                done = step + 1
                if (bad := non_finite_metric(metrics)) is not None:
                    raise diverged(done, f"the loss is not finite ({bad})", out, saved)
                log = done % run.log_every == 0 or done == run.steps
                progress.advance(done, metrics if log else None)
                if done % run.save_every == 0 and done != run.steps:
                    save_checkpoint(trainer, out, done, saved)
                    saved = done
        except UnreadableTrainingImage as err:  # raised while drawing the batch, before the step changed anything
            raise FatalError(f"{err}; {_save_at_stop(trainer, out, done, saved)}, "
                             "after removing or replacing the file") from err
        except KeyboardInterrupt:
            raise Interrupted(f"training stopped at once during step {done + 1}; "
                              f"{_saved_note(out, saved)}") from None
        if done < run.steps:
            raise Interrupted(f"training stopped at step {done}; {_save_at_stop(trainer, out, done, saved)}")
    return save_checkpoint(trainer, out, done, saved)


def _save_at_stop(trainer: Trainer, out: Path, done: int, saved: int) -> str:
    """Save the state of step boundary `done` unless it is saved already; what to tell the user about it."""
    if done > saved:
        save_checkpoint(trainer, out, done, saved)
    return _saved_note(out, done)


def _saved_note(out: Path, step: int) -> str:
    if step == 0:
        return "nothing trained yet, so nothing saved"
    return f"the state of step {step} is saved in {out} (add --resume to continue)"


class StopRequests:
    """While training, the first SIGINT or SIGTERM only sets `requested` (checked between steps, so no step is
    left half-applied); a second one raises KeyboardInterrupt as usual. Handlers are installed only in the main
    thread (the only one that may), and the previous ones are put back on exit."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __enter__(self) -> "StopRequests":
        import signal
        import threading

        self.requested = False
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self.previous[number] = signal.signal(number, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        import signal

        for number, handler in self.previous.items():
            signal.signal(number, handler)


def copy_weights(module: "nn.Module", tensors: Mapping[str, "torch.Tensor"]) -> int:
    """Copy `tensors` (names of `module.state_dict()`, shapes already checked) into `module` in place, in its
    dtypes (fine-tuning starts: `--init`); returns how many were copied."""
    import torch

    own = module.state_dict()
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value.to(own[name].dtype))
    return len(tensors)


def save_checkpoint(trainer: Trainer, out: Path, step: int, saved: int) -> Path:
    """Save and export the state of step boundary `step`; a weight that is not finite keeps step `saved`'s."""
    state = trainer.state(step)
    if (bad := non_finite_tensor(state)) is not None:
        raise diverged(step, f"{bad} is not finite", out, saved)
    save_state(out, state)
    return trainer.export(out, step)


def ship(run_dir: Path, name: str, dest: Path, recipe: Optional[str] = None,
         first_stage_file: Optional[str] = None, first_stage: Optional[Path] = None,
         defaults: Optional[Mapping[str, Any]] = None) -> tuple[Path, Path]:
    """Copy a run's export as a shipped default: `dest/<name>.safetensors` (fp16) + `dest/<name>.yaml`.

    Schedule buffers are left out (the loader computes them from the config in float32, which an fp16 copy
    could not match), and so is LDM-BERT's unused vocabulary-sized `to_logits`; `scale_factor` stays float32.
    `recipe` (the training commands) is recorded in the YAML.
    With `first_stage_file`, the first stage goes to that file in `dest` instead (shared by every default
    trained on it; written once, and refused if a different one is already there) and the YAML names it.
    With `first_stage` (an autoencoder export whose encoder is the run's, e.g. from `train autoencoder
    --freeze-encoder`), its decoder replaces the run's: the latent space is the same, so the UNet still fits.
    `defaults` overrides how the model runs by default (`ldmtool:` keys such as colour_fix, consistency,
    default_steps): decided when a model is shipped, after measuring it, not when its training starts.
    """
    from safetensors.torch import load_file

    from ldmtool.checkpoints.api import UNUSED_BERT_KEYS
    from ldmtool.checkpoints.schedule import DDPM_BUFFERS

    source = Path(run_dir) / MODEL_FILE
    if not source.is_file():
        raise UsageError(f"{run_dir}: no {MODEL_FILE} (train first, or point at the run folder)")
    config = _run_config_file(Path(run_dir))
    tensors = {k: v for k, v in load_file(str(source)).items() if k not in DDPM_BUFFERS and k not in UNUSED_BERT_KEYS}
    if first_stage is not None:
        tensors = _swap_decoder(tensors, Path(first_stage))
    half = {k: v.half() if v.is_floating_point() and k != "scale_factor" else v for k, v in tensors.items()}
    block = config.setdefault("ldmtool", {})
    block["family"] = name
    block.update(defaults or {})
    if recipe:
        block["recipe"] = recipe
    if first_stage_file:
        half = _share_first_stage(half, Path(dest) / first_stage_file)
        block["first_stage_weights"] = first_stage_file
    weights = Path(dest) / f"{name}.safetensors"
    _save(weights, half)
    config_path = Path(dest) / f"{name}.yaml"
    write_config(config_path, config)
    return weights, config_path


def _run_config_file(run_dir: Path) -> dict[str, Any]:
    """The run's `model.yaml`; a missing or unreadable one is a usage error naming the run folder."""
    path = run_dir / CONFIG_FILE
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UsageError(f"{run_dir}: no readable {CONFIG_FILE} next to {MODEL_FILE} (not a run folder of "
                         f"ldmtool train?): {getattr(err, 'strerror', None) or type(err).__name__}") from err
    if not isinstance(config, dict):
        raise UsageError(f"{path}: not a model config (a YAML mapping is expected)")
    return config


FIRST_STAGE_PREFIX = "first_stage_model."


ENCODER_SIDE = ("encoder.", "quant_conv.")


def _swap_decoder(tensors: dict, autoencoder: Path) -> dict:
    """`tensors` with the first stage of `autoencoder` (a run folder or its model.safetensors), which must
    share the run's encoder exactly: otherwise the UNet's latents would mean something else."""
    import torch
    from safetensors.torch import load_file

    path = autoencoder / MODEL_FILE if autoencoder.is_dir() else autoencoder
    if not path.is_file():
        raise UsageError(f"--first-stage {autoencoder}: no autoencoder export there")
    new = load_file(str(path))
    old = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in tensors.items() if k.startswith(FIRST_STAGE_PREFIX)}
    if new.keys() != old.keys() or any(new[k].shape != old[k].shape for k in old):
        raise UsageError(f"--first-stage {autoencoder}: not the same autoencoder architecture as the run's")
    changed = [k for k in old if k.startswith(ENCODER_SIDE) and not torch.equal(new[k].float(), old[k].float())]
    if changed:
        raise UsageError(f"--first-stage {autoencoder}: its encoder differs from the run's ({changed[0]}); "
                         "only a decoder trained with --freeze-encoder keeps the latent space")
    return {**tensors, **{FIRST_STAGE_PREFIX + k: v for k, v in new.items()}}


def _share_first_stage(tensors: dict, shared: Path) -> dict:
    """`tensors` without the first stage, which is written to `shared` (autoencoder key layout) unless an
    identical one is there already; a different one there is a usage error (it would change other models)."""
    import torch
    from safetensors.torch import load_file

    first = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in tensors.items() if k.startswith(FIRST_STAGE_PREFIX)}
    if not first:
        raise UsageError(f"{shared.name}: the run's model has no first stage to share")
    if shared.is_file():
        existing = load_file(str(shared))
        if existing.keys() != first.keys() or not all(torch.equal(existing[k], first[k]) for k in first):
            raise UsageError(f"{shared}: a different first stage is already shipped under this name; "
                             "pick another --first-stage-file or train on that first stage")
    else:
        _save(shared, first)
    return {k: v for k, v in tensors.items() if not k.startswith(FIRST_STAGE_PREFIX)}


def _save(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                             metadata={"format": "pt"}))
