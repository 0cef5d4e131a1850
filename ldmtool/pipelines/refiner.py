"""The base -> refiner hand-off of a task (`--refiner FILE --refiner-at F`: txt2img, img2img, inpaint).

The task's model runs its schedule (for img2img the part `--strength` runs) down to the hand-off
(diffusion/handoff.py) and keeps its latent still noisy; the refiner, a second `Engine`, walks the rest of
the same schedule (the model's sampler, steps and cfg) from that latent with its own text conditioning, and
its own first stage decodes. Both sides draw from one `NoiseSource`, so an ancestral sampler's noise goes on
across the hand-off as it would in one model. When the task keeps part of the image (inpaint), the refiner
keeps it too by masked sampling, whatever kind of inpainting the first model did: a refiner has no mask
input (diffusers' inpainting pipeline does the same with a 4-channel UNet).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from ldmtool.diffusion.handoff import Handoff
from ldmtool.errors import FatalError, UsageError
from ldmtool.families.info import Parameterization
from ldmtool.options import ModelChoice, SamplingChoice
from ldmtool.pipelines.engine import Engine
from ldmtool.pipelines.text import require_text_model, text_conditioner
from ldmtool.runtime.seeds import NoiseSource

DEFAULT_REFINER_AT = 0.8  # the refiner runs the last 20% of the schedule, as the SDXL reference


def refiner_engine(choice: ModelChoice, sampling: SamplingChoice, path: Union[str, Path, None]) -> Optional[Engine]:
    """The refiner's Engine: the task model's device, precision, `--vae`, `--clip-skip` and `--embeddings-dir`,
    its own weights and architecture.
    LoRAs stay with the model they were made for (a base's LoRA does not fit a refiner)."""
    if path is None:
        return None
    return Engine(replace(choice, model=str(path), config=None, preset=None, prediction=None, lora=None), sampling)


def _flow_matching(engine: Engine) -> bool:
    """Whether an engine that has loaded its model (even if opening it failed after) holds a flow-matching one."""
    return hasattr(engine, "bundle") and engine.info.parameterization is Parameterization.FLOW


@dataclass(frozen=True)
class Kept:
    """What an inpainting refiner keeps: padded images in [-1, 1] (B, 3, H, W) and repaint masks at latent
    size (B, 1, h, w), 1 = repaint."""

    images: torch.Tensor
    repaint: torch.Tensor


class Refiner:
    """`--refiner` and `--refiner-at` of one task run: checked, opened beside the task's model, recorded, run."""

    def __init__(self, engine: Optional[Engine], at: Optional[float]):
        self.engine = engine
        self.at = DEFAULT_REFINER_AT if at is None else at
        self._at_given = at is not None

    @property
    def active(self) -> bool:
        return self.engine is not None

    def validate(self) -> None:
        if self.engine is None and self._at_given:
            raise UsageError("--refiner-at goes with --refiner FILE")
        if self.engine is not None:
            Handoff(self.at, first=True)  # checks the fraction

    def first(self) -> Optional[Handoff]:
        """The task model's side of the hand-off (None without a refiner: the whole schedule)."""
        return None if self.engine is None else Handoff(self.at, first=True)

    def open(self, base: Engine, command: str) -> int:
        """Load the refiner to walk the base's schedule in the same latent space; its pixel multiple."""
        refiner = self.engine
        assert refiner is not None, "open() only with a refiner"
        if base.flow is not None:
            raise UsageError(f"--refiner: the hand-off does not run with {base.info.family} models (flow matching) yet")
        p = base.resolved()
        refiner.sampling = replace(refiner.sampling, sampler=p["sampler"], steps=p["steps"], cfg=p["cfg"])
        try:
            refiner.open()
        except FatalError:  # a flow model's missing text encoders would be the wrong thing to ask for
            if not _flow_matching(refiner):
                raise
        if _flow_matching(refiner):
            raise UsageError(f"--refiner {refiner.model_path}: a {refiner.info.family} model (flow matching) cannot "
                             "refine yet")
        # the model's --clip-skip and --embeddings-dir (an SDXL embedding's clip_g vectors fit the refiner's bigG)
        self.texts = text_conditioner(refiner, require_text_model(refiner.bundle, refiner.model_path, command))
        mine, theirs = base.info, refiner.info
        if (mine.latent_channels, mine.downsampling) != (theirs.latent_channels, theirs.downsampling):
            raise UsageError(f"--refiner {refiner.model_path}: its latent space ({theirs.latent_channels} channels, "
                             f"/{theirs.downsampling}) is not the model's ({mine.latent_channels}, /{mine.downsampling})")
        return theirs.pixel_multiple

    def recorded(self) -> dict[str, Any]:
        return {} if self.engine is None else {"refiner": self.engine.model_path.name, "refiner_at": self.at}

    def refine(self, base: Engine, z: torch.Tensor, *, prompts: list[str], negatives: list[str],
               image_hw: tuple[int, int], noise: NoiseSource, strength: float = 1.0, kept: Optional[Kept] = None,
               progress: Optional[Callable[[int, int], None]] = None) -> tuple[Engine, torch.Tensor]:
        """(the refiner at `base`'s precision, its latent) after its part of the schedule from `z`, the base's
        latent, with the base's noise source. The fp32 retry of the base's step retries both."""
        refiner = self._like(base)
        cond, uncond = self.texts.conds(refiner, prompts, negatives, image_hw)
        init, repaint = (None, None) if kept is None else (refiner.encode(kept.images), kept.repaint)
        z = refiner.sample((z.shape[-2], z.shape[-1]), noise.seeds, cond, uncond, init_latent=init, repaint=repaint,
                           strength=strength, progress=progress, handoff=Handoff(self.at, first=False), start=z,
                           noise=noise)
        return refiner, z

    def _like(self, base: Engine) -> Engine:
        """The refiner at the base engine's precision, walking its sampler/steps/cfg (a JSON line's own)."""
        assert self.engine is not None
        refiner = self.engine if base.dtype == self.engine.dtype else self.engine.in_fp32()
        p = base.resolved()
        if (refiner.sampling.sampler, refiner.sampling.steps, refiner.sampling.cfg) != (p["sampler"], p["steps"], p["cfg"]):
            refiner = copy.copy(refiner)
            refiner.sampling = replace(refiner.sampling, sampler=p["sampler"], steps=p["steps"], cfg=p["cfg"])
        return refiner
