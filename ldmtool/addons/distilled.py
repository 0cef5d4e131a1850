"""Distilled few-step models recognised by file name, and the sampling settings their authors publish.

A user who names `sdxl_lightning_4step_lora.safetensors` (as `--lora` or as the checkpoint) gets that
model's published sampler, spacing, step count and guidance for every option they did not give; the
output's recipe records which settings came from the file name (`DistilledSettings.recorded`) and the run
says so in one line (`notice`). The step count comes from the name itself ("4step", "8steps"), since the
authors release one file per count. Settings, from the model cards:

  SDXL-Turbo, SD-Turbo  huggingface.co/stabilityai/sdxl-turbo: guidance_scale 0 (no CFG), 1 step (1-4);
                        its scheduler config is Euler ancestral with "trailing" timesteps.
  SDXL-Lightning        huggingface.co/ByteDance/SDXL-Lightning: Euler, timestep_spacing "trailing",
                        guidance_scale 0, "use the correct checkpoint for the inference steps" (the
                        1-step model predicts x0: also give --prediction x0).
  Hyper-SD              huggingface.co/ByteDance/Hyper-SD: DDIM (= Euler here) with "trailing" timesteps,
                        guidance_scale 0; the "-CFG" LoRAs keep guidance (5); the 1-step LoRAs use TCD, eta 1.
  LCM-LoRA              huggingface.co/latent-consistency/lcm-lora-sdv1-5 (and -sdxl): LCMScheduler, 4 steps
                        (2-8), guidance_scale 1 to 2 (1 here: no unconditional pass).
  TCD-LoRA              huggingface.co/h1t/TCD-SD15-LoRA (and -SDXL): TCDScheduler, 4 steps, eta 0.3,
                        guidance_scale 0.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

# The settings a distilled file can fill, as SamplingChoice fields, in the order the notice names them.
FILLED = ("sampler", "spacing", "steps", "cfg", "tcd_gamma")


@dataclass(frozen=True)
class DistilledSettings:
    """A distilled model's published sampling settings, found in the name of `file`."""

    model: str
    file: str
    settings: dict[str, Any] = field(default_factory=dict)  # SamplingChoice field -> value

    def unset_in(self, given: Callable[[str], Any]) -> dict[str, Any]:
        """The settings for options the user did not give (`given(name)` is None); the user's win."""
        return {name: value for name, value in self.settings.items() if given(name) is None}

    def recorded(self, used: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model, "file": self.file, "from_file_name": used}

    def notice(self, used: dict[str, Any]) -> str:
        flags = " ".join(f"--{name.replace('_', '-')} {_shown(value)}" for name, value in used.items())
        return f"{self.file}: {self.model}'s published settings {flags} (options you give win)"


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _turbo(match: re.Match[str]) -> dict[str, Any]:
    return {"sampler": "euler_a", "spacing": "trailing", "steps": 1, "cfg": 1.0}


def _lightning(match: re.Match[str]) -> dict[str, Any]:
    return {"sampler": "euler", "spacing": "trailing", "steps": int(match["steps"]), "cfg": 1.0}


def _hyper(match: re.Match[str]) -> dict[str, Any]:
    steps = int(match["steps"])
    if steps == 1:
        return {"sampler": "tcd", "spacing": "lcm", "steps": 1, "cfg": 1.0, "tcd_gamma": 1.0}
    return {"sampler": "euler", "spacing": "trailing", "steps": steps, "cfg": 5.0 if match["cfg"] else 1.0}


def _lcm(match: re.Match[str]) -> dict[str, Any]:
    return {"sampler": "lcm", "spacing": "lcm", "steps": 4, "cfg": 1.0}


def _tcd(match: re.Match[str]) -> dict[str, Any]:
    return {"sampler": "tcd", "spacing": "lcm", "steps": 4, "cfg": 1.0, "tcd_gamma": 0.3}


_SEP = r"[-_ .]?"
# (model, file-name pattern, settings from the match). Hyper-SD's 1-step UNet samples at timestep 800,
# which no spacing here gives, so it is left out rather than given settings that are not its own.
DISTILLED: tuple[tuple[str, re.Pattern[str], Callable[[re.Match[str]], dict[str, Any]]], ...] = (
    ("SDXL-Turbo", re.compile(rf"sd{_SEP}(xl{_SEP})?turbo", re.I), _turbo),
    ("SDXL-Lightning", re.compile(rf"sdxl{_SEP}lightning{_SEP}(?P<steps>\d+){_SEP}steps?", re.I), _lightning),
    ("Hyper-SD", re.compile(rf"hyper{_SEP}sd(xl|15|3)?{_SEP}(?P<steps>\d+){_SEP}steps?(?P<cfg>{_SEP}cfg)?"
                            rf"(?!{_SEP}unet)", re.I), _hyper),
    ("LCM-LoRA", re.compile(rf"lcm{_SEP}lora", re.I), _lcm),
    ("TCD-LoRA", re.compile(rf"tcd{_SEP}(sd15|sdxl|sd)?{_SEP}lora", re.I), _tcd),
)


def distilled_settings(file_names: Iterable[str]) -> Optional[DistilledSettings]:
    """The published settings of the first file (checkpoint, then LoRAs) whose name says which distilled
    model it is; None when none does."""
    for name in file_names:
        for model, pattern, settings in DISTILLED:
            match = pattern.search(name)
            if match:
                return DistilledSettings(model, name, settings(match))
    return None
