"""Image to image (SDEdit): encode each image, noise it part-way down the schedule (`strength`), and
sample back with the prompt; text models (LDM-BERT, SD 1.x/2.x) and unconditional models.

Any input size: images are padded (edge replication) up to the model's pixel multiple and the result is
cropped back. Alpha is passed through unchanged. Images of one size in a batch are sampled together.

With `scale` (`--scale`), each image is first upscaled with Lanczos and reworked one at a time in memory
bounded by the tile (upscale by diffusion, `pipelines/upscale.py`); alpha is resampled beside it.

With `refiner` (`--refiner FILE --refiner-at F`) the model runs the strength's steps down to the hand-off and
the refiner the rest (pipelines/refiner.py), as diffusers' img2img `denoising_end` / `denoising_start`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import numpy as np
import torch

from ldmtool.diffusion.img2img import strength_steps
from ldmtool.errors import UsageError
from ldmtool.io.discover import Item
from ldmtool.io.images import LoadedImage, read_image
from ldmtool.pipelines.arrays import to_array
from ldmtool.pipelines.base import ModelTask, carried, in_groups, input_path, input_size
from ldmtool.pipelines.control import ControlRun, hint_batch, hint_key, hint_params
from ldmtool.pipelines.engine import Engine
from ldmtool.pipelines.refiner import Refiner
from ldmtool.pipelines.superres import output_size, resample_alpha
from ldmtool.pipelines.text import PromptConditioning, padded_images
from ldmtool.pipelines.upscale import check_scale, rework_upscaled, upscaled
from ldmtool.runtime.jobs import Job, Output
from ldmtool.runtime.seeds import NoiseSource
from ldmtool.runtime.workflow import recorded_prompt

DEFAULT_STRENGTH = 0.75


class Img2ImgTask(ModelTask):
    """Each batch, in groups of one size: pad the images → encode → noise to `strength` and sample back with
    the prompt → decode → crop; alpha passed through."""

    command = "img2img"
    reads_images = True

    def __init__(self, engine: Engine, *, prompt: Optional[str] = "", negative: Optional[str] = "",
                 strength: float = DEFAULT_STRENGTH, max_pixels: Optional[int] = None,
                 scale: Optional[float] = None, colour_fix: Optional[bool] = None,
                 refiner: Optional[Engine] = None, refiner_at: Optional[float] = None,
                 control: Optional[ControlRun] = None):
        # Given neither prompt nor negative (None), a workflow step takes each input's recorded ones.
        self.prompts_from_inputs = prompt is None and negative is None
        prompt, negative = prompt or "", negative or ""
        params: dict[str, Any] = {"prompt": prompt, "negative": negative, "strength": strength}
        if scale is not None:  # recorded only when given, so recipes of plain img2img runs keep their form
            params.update(scale=scale, colour_fix=colour_fix is not False)
        super().__init__(engine, params=params)
        self.prompt, self.negative = prompt, negative
        self.strength = strength
        self.max_pixels = max_pixels
        self.scale = scale
        self.colour_fix_option = colour_fix
        self.colour_fix = colour_fix is not False  # upscaling only: on unless --no-colour-fix
        self.refiner = refiner
        self.refining = Refiner(refiner, refiner_at)
        self.control = control
        if control is not None:
            control.input_hint = scale is not None  # ControlNet tile: the upscaled input is the hint
        engine.control = control

    def validate(self) -> None:
        super().validate()
        check_scale("--scale", self.scale)
        if self.scale is None and self.colour_fix_option is not None:
            raise UsageError("--colour-fix/--no-colour-fix: img2img takes it with --scale only (upscale by diffusion)")
        self.refining.validate()
        if self.refining.active and self.scale is not None:
            raise UsageError("--refiner: img2img takes it without --scale (upscale by diffusion runs one model)")
        if self.control is not None:
            self.control.validate()

    def check_model(self, engine: Engine) -> None:
        self.conditioning = PromptConditioning(engine, self.command, prompt=self.prompt, negative=self.negative)
        self.check_guidance(engine, guided=self.conditioning.texts is not None)
        self.check_vocabulary((self.prompt, self.negative))
        self.check_literal_prompts((self.prompt, self.negative))
        self.multiple = engine.info.pixel_multiple
        if self.refining.active:
            self.multiple = max(self.multiple, self.refining.open(engine, self.command))
        self._check_steps_run(engine.resolved()["steps"])

    def _check_steps_run(self, steps: int) -> None:
        """Warn when a strength above 0 runs no step (floor(strength x steps) = 0, as diffusers): the images
        would come back unchanged (a one-step distilled model at --strength 0.5 is the usual way there)."""
        if self.strength > 0 and strength_steps(steps, self.strength) == 0:
            self.warn_once("no-steps", f"--strength {self.strength:g} of {steps} step(s) runs no step, so every "
                           f"image comes back unchanged; use --steps {math.ceil(1 / self.strength)} or more")

    def own_defaults(self, info: Any) -> dict[str, Any]:
        """--colour-fix: on when upscaling by diffusion (--scale), which alone takes it."""
        return {} if self.scale is None else {"colour_fix": True}

    def recorded(self, engine: Engine) -> dict[str, Any]:
        control = self.control.recorded() if self.control else {}
        return {**control, **super().recorded(engine), **self.refining.recorded()}

    def planned_size(self, item: Item) -> Optional[tuple[int, int]]:
        """The input's size, from its header (times --scale)."""
        size = input_size(item, self.max_pixels)
        return size if size is None or self.scale is None else output_size(*size, self.scale)

    def load(self, job: Job) -> LoadedImage:
        return read_image(input_path(job), max_pixels=self.max_pixels)

    def run(self, jobs: list[Job]) -> list[Output]:
        if self.scale is not None:
            return [self._upscale(job) for job in jobs]
        prompts = {id(job): self._prompt(job) for job in jobs}  # read once: a recorded one decodes the input's recipe
        return in_groups(jobs, lambda job: (job.payload.size, prompts[id(job)]),
                         lambda group: self._transform(group, prompts[id(group[0])]))

    def _prompt(self, job: Job) -> tuple[str, str]:
        """The job's (prompt, negative): the task's, or in a workflow step given none, its input's recorded."""
        takes_text = self.conditioning.texts is not None
        recorded = recorded_prompt(job.item.path) if self.prompts_from_inputs and takes_text else None
        if recorded is None:
            return self.prompt, self.negative
        self.check_vocabulary(recorded)
        return recorded

    def _prompt_params(self, prompt: tuple[str, str]) -> dict[str, Any]:
        """What an output records of its prompt when it is not the task's own."""
        return {} if prompt == (self.prompt, self.negative) else {"prompt": prompt[0], "negative": prompt[1]}

    def _upscale(self, job: Job) -> Output:
        """Lanczos to the output size → img2img in tiles at --strength → colour fix; alpha resampled."""
        assert self.scale is not None, "run() upscales only with --scale"
        image: LoadedImage = job.payload
        pixels = upscaled(image.rgb, self.scale)
        size = (pixels.shape[1], pixels.shape[0])
        prompt = self._prompt(job)
        out = rework_upscaled(self.engine, pixels, scale=self.scale, strength=self.strength, seed=job.seed,
                              conditioning=lambda engine: self.conditioning(engine, 1, pixels.shape[:2], prompt),
                              label=job.item.label, colour_fix=self.colour_fix, progress=self.step_progress(),
                              hints=self._tile_hints(job, pixels))
        alpha = None if image.alpha is None else resample_alpha(image.alpha, size)
        params = {"input_size": list(image.size), "size": list(size), **self._prompt_params(prompt)}
        if self.control and self.control.given_hint_files(hint_key(job)):
            params.update(hint_params(self.control.given_hint_files(hint_key(job))))
        return Output(image=out, alpha=alpha, params=params, source=image.source)

    def _transform(self, jobs: list[Job], prompt: tuple[str, str]) -> list[Output]:
        """One group of jobs of one size and one (prompt, negative)."""
        width, height = jobs[0].payload.size
        images = padded_images([job.payload.rgb for job in jobs], self.multiple)
        hints = self._hints(jobs)
        rework = functools.partial(self._encode_sample_decode, images=images, seeds=[job.seed for job in jobs],
                                   prompt=prompt, hints=hints)
        results = self.engine.finite(rework, jobs[0].item.label).clamp(0, 1)[..., :height, :width]
        params = self._prompt_params(prompt)
        return [Output(image=to_array(result), alpha=job.payload.alpha, params={**self._params(job), **params},
                       **carried(job.payload))
                for job, result in zip(jobs, results)]
    def _hints(self, jobs: list[Job]) -> Optional[list[torch.Tensor]]:
        """Each ControlNet's hint for every image (its file, or the one named like the input), at its size."""
        if not self.control:
            return None
        return self.control.batch([hint_key(job) for job in jobs], jobs[0].payload.size, self.multiple,
                                  self.warn_once)

    def _tile_hints(self, job: Job, pixels: np.ndarray) -> Optional[list[torch.Tensor]]:
        """With --scale, a ControlNet's hint is its --control-image at the upscaled size, or without one the
        upscaled image itself (ControlNet tile)."""
        if not self.control:
            return None
        return hint_batch([self.control.scaled_hints(hint_key(job), pixels)], self.multiple)

    def _params(self, job: Job) -> dict[str, Any]:
        if not self.control or self.scale is not None:
            return _size(job.payload)
        return {**_size(job.payload), **hint_params(self.control.hint_files(hint_key(job)))}

    def _encode_sample_decode(self, engine: Engine, *, images: torch.Tensor, seeds: list[int],
                              prompt: tuple[str, str], hints: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) at `engine`'s precision (`Engine.finite` retries in fp32)."""
        init = engine.encode(images)
        image_hw = (images.shape[-2], images.shape[-1])
        cond, uncond = self.conditioning(engine, len(seeds), image_hw, prompt)
        noise = NoiseSource(seeds)
        z = engine.sample((init.shape[-2], init.shape[-1]), seeds, cond, uncond, init_latent=init, strength=self.strength,
                          progress=self.step_progress(), handoff=self.refining.first(), noise=noise, hints=hints)
        if self.refining.active:
            engine, z = self.refining.refine(engine, z, prompts=[prompt[0]] * len(seeds),
                                             negatives=[prompt[1]] * len(seeds), image_hw=image_hw, noise=noise,
                                             strength=self.strength, progress=self.step_progress())
        return engine.decode(z)


def _size(image: LoadedImage) -> dict[str, Any]:
    return {"size": list(image.size)}
