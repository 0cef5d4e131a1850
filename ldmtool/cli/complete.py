"""Shell completion of option values (`ldmtool --install-completion`): model names, presets, samplers and
the fixed choices. Typer calls these while the shell asks, so they import nothing heavy (no torch); the
preset and model listings are read from the package's files only when asked."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ldmtool.diffusion.names import SAMPLER_NAMES, SPACING_NAMES

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
Completer = Callable[[str], list[tuple[str, str]]]


def _matching(values: list[tuple[str, str]], incomplete: str) -> list[tuple[str, str]]:
    return [(value, help) for value, help in values if value.startswith(incomplete)]


def model_names(incomplete: str) -> list[tuple[str, str]]:
    """`--model`: the shipped models, then checkpoint files under the path typed so far."""
    from ldmtool.checkpoints.presets import shipped_models

    names = [(m.name, "shipped model") for m in shipped_models()]
    return _matching(names, incomplete) + checkpoint_files(incomplete)


def checkpoint_files(incomplete: str) -> list[tuple[str, str]]:
    """Checkpoint files and folders whose path starts with `incomplete`."""
    folder, _, stem = incomplete.rpartition("/")
    base = Path(folder or ".") if not incomplete.startswith("/") or folder else Path("/")
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return []
    prefix = f"{folder}/" if folder or incomplete.startswith("/") else ""
    found = []
    for entry in entries:
        if not entry.name.startswith(stem) or (entry.name.startswith(".") and not stem.startswith(".")):
            continue
        if entry.is_dir():
            found.append((f"{prefix}{entry.name}/", "folder"))
        elif entry.suffix.lower() in CHECKPOINT_SUFFIXES:
            found.append((f"{prefix}{entry.name}", "checkpoint"))
    return found


def preset_names(incomplete: str) -> list[tuple[str, str]]:
    """`--preset`: the architecture presets of `ldmtool models list`."""
    from ldmtool.checkpoints.presets import preset_names as names

    return _matching([(name, "preset") for name in names()], incomplete)


def samplers(incomplete: str) -> list[tuple[str, str]]:
    return _matching([(name, "sampler") for name in SAMPLER_NAMES], incomplete)


def choices(*values: str) -> Completer:
    """A completer offering fixed `values`."""
    def complete(incomplete: str) -> list[tuple[str, str]]:
        return _matching([(value, "") for value in values], incomplete)

    return complete


# By option field name (`ldmtool.options`); `ldmtool.cli.options` attaches them.
COMPLETERS: dict[str, Completer] = {
    "model": model_names,
    "preset": preset_names,
    "sampler": samplers,
    "fmt": choices("png", "jpg", "webp", "tiff", "keep"),  # as --format takes them (io/writer.py)
    "existing": choices("check", "skip", "overwrite"),
    "control_mode": choices("balanced", "control"),
    "run_engine": choices("local", "ray"),
    "prediction": choices("eps", "v"),
    "device": choices("auto", "cpu", "cuda", "mps"),
    "precision": choices("auto", "fp32", "fp16", "bf16"),
    "seamless": choices("x", "y", "xy"),
    "lora": checkpoint_files,  # LoRA and VAE files share the checkpoint suffixes
    "vae": checkpoint_files,
    "spacing": choices(*SPACING_NAMES),
    "text_encoder": checkpoint_files,  # files, and diffusers encoder folders (listed too)
}
