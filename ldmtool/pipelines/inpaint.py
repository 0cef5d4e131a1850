"""Inpainting: repaint the white part of a mask (1 = repaint, 0 = keep) with three kinds of model.

  ldm-concat  the LDM inpainting_big model (7-channel UNet). As the reference inpaint script: the masked
              image is (1 - mask) * image in [0, 1], then image, masked image and mask all go to [-1, 1];
              the masked image's first-stage latent (VQ, before quantization) and the mask resized
              (nearest) to latent size are concatenated after the latent: cat(x, c_masked, mask). No prompt.
  sd-hybrid   SD 1.x/2.x inpainting (9-channel UNet). As the SD scripts and diffusers: the masked image is
              image * (mask < 0.5) in [-1, 1] (repaint region grey), its scaled latent follows the mask in
              [0, 1] resized (nearest): cat(x, mask, c_masked), plus the prompt by cross-attention. The
              latent is the posterior mean (the reference samples the posterior; its spread is tiny).
  masked      any text-to-image or unconditional model: masked sampling (the kept region follows the
              noised image latent every step; see diffusion/masked.py).

`grow` dilates the mask by that many pixels first. Every kind ends with the feathered composite
(`feather` pixels), so outside the feathered band the written pixels are the input's exactly.

With `refiner` (`--refiner FILE --refiner-at F`) the model runs the schedule down to the hand-off and the
refiner the rest by masked sampling, keeping the image outside the mask (pipelines/refiner.py).
"""
from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ldmtool.diffusion.cond import Cond
from ldmtool.diffusion.masked import composite, latent_repaint_mask
from ldmtool.errors import FatalError, ItemError, UsageError
from ldmtool.families.info import InpaintKind
from ldmtool.io.discover import Item
from ldmtool.io.files import shown
from ldmtool.io.images import LoadedImage, mask_from_alpha, read_image, read_mask
from ldmtool.pipelines.arrays import to_array
from ldmtool.pipelines.base import ModelTask, carried, in_groups, input_path, input_size
from ldmtool.pipelines.colour_fix import colour_fix_to, config_switch
from ldmtool.pipelines.control import ControlRun, hint_key, hint_params
from ldmtool.pipelines.engine import Engine
from ldmtool.pipelines.refiner import Kept, Refiner
from ldmtool.pipelines.text import (
    PromptConditioning,
    padded_images,
    padding,
    text_conditioner,
    text_encoder,
)
from ldmtool.runtime.jobs import Job, Output
from ldmtool.runtime.seeds import NoiseSource

DEFAULT_FEATHER = 4


def grow_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The repaint mask (H, W) dilated by `pixels` (a disc), so edits reach a little past the drawn edge."""
    if pixels <= 0:
        return mask
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), disc).astype(np.float32)


class InpaintTask(ModelTask):
    """Each batch, in groups of one size: pad images and masks → encode and sample (as the model's kind needs)
    → decode → crop, colour fix → feathered composite onto the input."""

    command = "inpaint"
    reads_images = True

    def __init__(self, engine: Engine, *, prompt: str = "", negative: str = "", grow: int = 0,
                 feather: int = DEFAULT_FEATHER, invert_mask: bool = False, from_alpha: bool = False,
                 max_pixels: Optional[int] = None, colour_fix: Optional[bool] = None,
                 refiner: Optional[Engine] = None, refiner_at: Optional[float] = None,
                 control: Optional[ControlRun] = None):
        super().__init__(engine, params={"prompt": prompt, "negative": negative, "grow": grow, "feather": feather})
        self.prompt, self.negative = prompt, negative
        self.grow, self.feather = grow, feather
        self.invert_mask, self.from_alpha = invert_mask, from_alpha
        self.max_pixels = max_pixels
        self.colour_fix = colour_fix  # None: the model config's `ldmtool.colour_fix` (absent = off)
        self.refiner = refiner
        self.refining = Refiner(refiner, refiner_at)
        self.control = control
        if control is not None:
            control.mask_hint = True  # `--control-image inpaint`: the hint from the input and its mask
        engine.control = control

    def validate(self) -> None:
        super().validate()
        self.refining.validate()
        if self.control is not None:
            self.control.validate()

    # -- once per run

    def check_model(self, engine: Engine) -> None:
        info = engine.info
        kind = info.inpaint_kind
        if kind is None:
            raise UsageError(f"{engine.model_path}: a {info.family} model cannot inpaint (use an inpainting, "
                             "text-to-image or unconditional model)")
        self.kind: InpaintKind = kind
        if self.kind is InpaintKind.LDM_CONCAT and (self.prompt or self.negative):
            raise UsageError(f"{engine.model_path}: the {info.family} model takes no prompt; drop --prompt/--negative")
        if self.kind is InpaintKind.SD_HYBRID:
            encoder = text_encoder(engine.bundle)
            if encoder is None:
                raise FatalError(f"{engine.model_path}: the {info.family} inpainting model has no text encoder")
            self.texts = text_conditioner(engine, encoder)
        elif self.kind in (InpaintKind.MASKED, InpaintKind.FILL):
            self.conditioning = PromptConditioning(engine, self.command, prompt=self.prompt, negative=self.negative,
                                                   concat=self.kind is InpaintKind.FILL)
        self.check_guidance(engine, guided=self.kind is InpaintKind.SD_HYBRID or (
            self.kind in (InpaintKind.MASKED, InpaintKind.FILL) and self.conditioning.texts is not None))
        self.check_vocabulary((self.prompt, self.negative))
        self.check_literal_prompts((self.prompt, self.negative))
        self.multiple = info.pixel_multiple
        if self.colour_fix is None:
            self.colour_fix = config_switch(info.defaults.colour_fix, "colour_fix", engine.model_path)
        if self.refining.active:
            self.multiple = max(self.multiple, self.refining.open(engine, self.command))

    def own_defaults(self, info: Any) -> dict[str, Any]:
        """--colour-fix: the model config's switch."""
        switch = info.defaults.colour_fix
        return {"colour_fix": switch} if isinstance(switch, bool) else {}  # else: fatal at open

    def recorded(self, engine: Engine) -> dict[str, Any]:
        control = self.control.recorded() if self.control else {}
        return {**super().recorded(engine), "inpaint_kind": self.kind.value, "colour_fix": self.colour_fix,
                **self.refining.recorded(), **control}

    # -- each item

    def planned_size(self, item: Item) -> Optional[tuple[int, int]]:
        """The input's size, from its header: the output keeps it."""
        return input_size(item, self.max_pixels)

    def load(self, job: Job) -> tuple[LoadedImage, np.ndarray]:
        image = read_image(input_path(job), max_pixels=self.max_pixels)
        mask = None
        if not self.from_alpha:
            mask = read_mask(job.item.require_mask(), size=image.size, invert=self.invert_mask,
                             max_pixels=self.max_pixels, on_transparency=self._note_mask_transparency)
        return self.check_input(image, mask, job.item.label)

    def _note_mask_transparency(self, path: Path) -> None:
        self.warn_once("mask transparency", f"{shown(path)}: the mask's transparency is not read: its colours "
                       "decide, the ones under transparent pixels too (white repaints); flatten it onto black, or "
                       "give the image's own transparency with --mask-from-alpha")

    def check_input(self, image: LoadedImage, mask: Optional[np.ndarray], label: str) -> tuple[LoadedImage, np.ndarray]:
        """The image and its repaint mask (from its transparency with --mask-from-alpha), grown by `grow`."""
        if self.from_alpha:
            if image.alpha is None:
                raise ItemError(f"{label}: --mask-from-alpha, but the image has no transparency")
            mask = mask_from_alpha(image.alpha, invert=self.invert_mask)
        if mask is None:
            raise ItemError(f"{label}: no repaint mask (give a mask, or use --mask-from-alpha)")
        return image, grow_mask(mask, self.grow)

    def run(self, jobs: list[Job]) -> list[Output]:
        return in_groups(jobs, lambda job: job.payload[0].size, self._inpaint)

    def _inpaint(self, jobs: list[Job]) -> list[Output]:
        width, height = jobs[0].payload[0].size
        images = padded_images([job.payload[0].rgb for job in jobs], self.multiple)  # [-1, 1]
        masks = torch.stack([torch.from_numpy(job.payload[1])[None] for job in jobs])  # (B, 1, H, W)
        pad_h, pad_w = padding(height, width, self.multiple)
        padded_masks = F.pad(masks, (0, pad_w, 0, pad_h))  # padding is kept, never repainted
        hints = None if not self.control else self.control.batch(
            [hint_key(job) for job in jobs], (width, height), self.multiple, self.warn_once,
            masked=[(job.payload[0].rgb, job.payload[1]) for job in jobs])
        repaint = functools.partial(self._sample_and_decode, images=images, masks=padded_masks,
                                    seeds=[job.seed for job in jobs], hints=hints)
        results = self.engine.finite(repaint, jobs[0].item.label).clamp(0, 1)[..., :height, :width]
        return self._finish(jobs, results, masks)

    def _sample_and_decode(self, engine: Engine, *, images: torch.Tensor, masks: torch.Tensor,
                           seeds: list[int], hints: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) at `engine`'s precision (`Engine.finite` retries in fp32)."""
        self._hints = hints  # --controlnet hints of this batch, handed to every kind's sampling call
        noise = NoiseSource(seeds)
        z = self._sample(engine, images, masks, noise)
        if self.refining.active:
            latent_hw = (z.shape[-2], z.shape[-1])
            kept = Kept(images, latent_repaint_mask(masks, latent_hw).to(engine.device, engine.dtype))
            engine, z = self.refining.refine(engine, z, prompts=[self.prompt] * len(seeds),
                                             negatives=[self.negative] * len(seeds),
                                             image_hw=(images.shape[-2], images.shape[-1]), noise=noise, kept=kept,
                                             progress=self.step_progress())
        return engine.decode(z)

    def _sample(self, e: Engine, images: torch.Tensor, masks: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
        """Scaled latents for padded images in [-1, 1] (B, 3, H, W) and repaint masks (B, 1, H, W); with a
        refiner, the model's side of the hand-off."""
        latent_hw = (images.shape[-2] // e.info.downsampling, images.shape[-1] // e.info.downsampling)
        if self.kind is InpaintKind.MASKED:
            return self._masked(e, images, masks, noise, latent_hw)
        if self.kind is InpaintKind.FILL:
            return self._fill(e, images, masks, noise, latent_hw)
        latent_mask = F.interpolate(masks, size=latent_hw).to(e.device)  # nearest, as the reference
        if self.kind is InpaintKind.LDM_CONCAT:
            return self._ldm_concat(e, images, masks, latent_mask, noise)
        return self._sd_hybrid(e, images, masks, latent_mask, noise)

    def _masked(self, e: Engine, images: torch.Tensor, masks: torch.Tensor, noise: NoiseSource,
                latent_hw: tuple[int, int]) -> torch.Tensor:
        init = e.encode(images)
        cond, uncond = self.conditioning(e, len(noise.seeds), (images.shape[-2], images.shape[-1]))
        repaint = latent_repaint_mask(masks, latent_hw).to(e.device, e.dtype)
        return e.sample(latent_hw, noise.seeds, cond, uncond, init_latent=init, repaint=repaint,
                        progress=self.step_progress(), handoff=self.refining.first(), noise=noise, hints=self._hints)

    def _fill(self, e: Engine, images: torch.Tensor, masks: torch.Tensor, noise: NoiseSource,
              latent_hw: tuple[int, int]) -> torch.Tensor:
        """FLUX.1 Fill: the whole latent sampled from noise beside the masked image's latent (the hole grey) and the
        binarised mask's 8x8 pixel blocks as channels, at latent resolution (so tiles crop them), as diffusers'
        FluxFillPipeline builds them."""
        hole = (masks >= 0.5).float()
        masked = e.encode(images * (1 - hole))
        concat = torch.cat([masked, F.pixel_unshuffle(hole, e.info.downsampling)], dim=1).to(e.device, torch.float32)
        cond, uncond = self.conditioning(e, len(noise.seeds), (images.shape[-2], images.shape[-1]))
        return e.sample(latent_hw, noise.seeds, replace(cond, concat=concat), uncond, progress=self.step_progress(),
                        handoff=self.refining.first(), noise=noise, hints=self._hints)

    def _ldm_concat(self, e: Engine, images: torch.Tensor, masks: torch.Tensor, latent_mask: torch.Tensor,
                    noise: NoiseSource) -> torch.Tensor:
        masked = ((1 - masks) * (images + 1) / 2) * 2 - 1
        c_masked = e.encode(masked) / e.bundle.scale_factor  # the cond stage is the unscaled first stage
        concat = torch.cat([c_masked, latent_mask * 2 - 1], dim=1).to(e.device, e.dtype)
        return e.sample((latent_mask.shape[-2], latent_mask.shape[-1]), noise.seeds, Cond(concat=concat),
                        progress=self.step_progress(), handoff=self.refining.first(), noise=noise, hints=self._hints)

    def _sd_hybrid(self, e: Engine, images: torch.Tensor, masks: torch.Tensor, latent_mask: torch.Tensor,
                   noise: NoiseSource) -> torch.Tensor:
        c_masked = e.encode(images * (masks < 0.5))
        concat = torch.cat([latent_mask, c_masked], dim=1).to(e.device, e.dtype)
        image_hw = (images.shape[-2], images.shape[-1])
        count = len(noise.seeds)
        cond, uncond = self.texts.conds(e, [self.prompt] * count, [self.negative] * count, image_hw)
        return e.sample((latent_mask.shape[-2], latent_mask.shape[-1]), noise.seeds, replace(cond, concat=concat),
                        replace(uncond, concat=concat), progress=self.step_progress(), handoff=self.refining.first(),
                        noise=noise, hints=self._hints)

    def _finish(self, jobs: list[Job], results: torch.Tensor, masks: torch.Tensor) -> list[Output]:
        """Colour fix, then the feathered composite onto the input itself (not its [-1, 1] round trip), so
        kept pixels are copied bit for bit."""
        if self.colour_fix:
            results = torch.stack([_telea_colours(result, job.payload[0].rgb, job.payload[1])
                                   for result, job in zip(results, jobs)])
        originals = torch.stack([torch.from_numpy(job.payload[0].rgb).permute(2, 0, 1) for job in jobs])
        final = composite(originals, results, masks, self.feather)
        return [Output(image=to_array(image), alpha=None if self.from_alpha else job.payload[0].alpha,
                       params={**_stats(job.payload[1]), **self._hint_params(job)}, **carried(job.payload[0]))
                for job, image in zip(jobs, final)]

    def _hint_params(self, job: Job) -> dict[str, Any]:
        return hint_params(self.control.hint_files(hint_key(job))) if self.control else {}


def _stats(mask: np.ndarray) -> dict[str, Any]:
    return {"repainted_fraction": round(float(mask.mean()), 4)}


# Blur for the inpainting colour fix, in pixels: the model keeps the detail above it, the fill gives the rest.
COLOUR_FIX_SIGMA = 3.0


def _telea_colours(result: torch.Tensor, rgb: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """The model's result (3, H, W) in [0, 1] with its low frequencies taken from an OpenCV Telea fill of
    the hole: a small first stage loses colour, the surroundings know it. A hole covering the whole image has
    no surroundings (Telea would return the image itself, and with it the colours the mask repaints): the
    model's result stays as it is."""
    hole = (mask > 0.5).astype(np.uint8) * 255
    if hole.all():
        return result
    pixels = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)
    fill = cv2.inpaint(pixels, hole, 5, cv2.INPAINT_TELEA).astype(np.float32) / 255
    fixed = colour_fix_to(result.permute(1, 2, 0).numpy(), fill, COLOUR_FIX_SIGMA)
    return torch.from_numpy(fixed).permute(2, 0, 1)
