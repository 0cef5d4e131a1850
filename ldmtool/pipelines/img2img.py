"""Image to image (SDEdit): encode each image, noise it part-way down the schedule (`strength`), and
sample back with the prompt; text models (LDM-BERT, SD 1.x/2.x) and unconditional models.

Any input size: images are padded (edge replication) up to the model's pixel multiple and the result is
cropped back. Alpha is passed through unchanged. Images of one size in a batch are sampled together.

With `scale` (`--scale`), each image is first upscaled with Lanczos and reworked one at a time in memory
bounded by the tile (upscale by diffusion, `pipelines/upscale.py`); alpha is resampled beside it.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ldmtool.errors import UsageError
from ldmtool.io.discover import Item
from ldmtool.io.images import LoadedImage, read_image
from ldmtool.pipelines.base import ModelTask, carried, in_groups, input_path, input_size
from ldmtool.pipelines.control import ControlRun, hint_batch, hint_params
from ldmtool.pipelines.engine import Engine, to_array
from ldmtool.pipelines.superres import output_size, resample_alpha
from ldmtool.pipelines.text import PromptConditioning, padded_images
from ldmtool.pipelines.upscale import check_scale, rework_upscaled, upscaled
from ldmtool.runtime.jobs import Job, Output

DEFAULT_STRENGTH = 0.75


class Img2ImgTask(ModelTask):
    """Each batch, in groups of one size: pad the images → encode → noise to `strength` and sample back with
    the prompt → decode → crop; alpha passed through."""

    command = "img2img"
    reads_images = True

    def __init__(self, engine: Engine, *, prompt: str = "", negative: str = "",
                 strength: float = DEFAULT_STRENGTH, max_pixels: Optional[int] = None,
                 scale: Optional[float] = None, colour_fix: Optional[bool] = None,
                 control: Optional[ControlRun] = None):
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
        self.control = control
        if control is not None:
            control.input_hint = scale is not None  # ControlNet tile: the upscaled input is the hint
        engine.control = control

    def validate(self) -> None:
        super().validate()
        check_scale("--scale", self.scale)
        if self.scale is None and self.colour_fix_option is not None:
            raise UsageError("--colour-fix/--no-colour-fix: img2img takes it with --scale only (upscale by diffusion)")
        if self.control is not None:
            self.control.validate()

    def recorded(self, engine: Engine) -> dict[str, Any]:
        control = self.control.recorded() if self.control else {}
        return {**control, **super().recorded(engine)}

    def check_model(self, engine: Engine) -> None:
        self.conditioning = PromptConditioning(engine, self.command, prompt=self.prompt, negative=self.negative)
        self.check_guidance(engine, guided=self.conditioning.texts is not None)
        self.check_vocabulary((self.prompt, self.negative))
        self.check_literal_prompts((self.prompt, self.negative))
        self.multiple = engine.info.pixel_multiple

    def planned_size(self, item: Item) -> Optional[tuple[int, int]]:
        """The input's size, from its header (times --scale)."""
        size = input_size(item, self.max_pixels)
        return size if size is None or self.scale is None else output_size(*size, self.scale)

    def load(self, job: Job) -> LoadedImage:
        return read_image(input_path(job), max_pixels=self.max_pixels)

    def run(self, jobs: list[Job]) -> list[Output]:
        if self.scale is not None:
            return [self._upscale(job) for job in jobs]
        return in_groups(jobs, lambda job: job.payload.size, self._transform)

    def _upscale(self, job: Job) -> Output:
        """Lanczos to the output size → img2img in tiles at --strength → colour fix; alpha resampled."""
        assert self.scale is not None, "run() upscales only with --scale"
        image: LoadedImage = job.payload
        pixels = upscaled(image.rgb, self.scale)
        size = (pixels.shape[1], pixels.shape[0])
        out = rework_upscaled(self.engine, pixels, scale=self.scale, strength=self.strength, seed=job.seed,
                              conditioning=lambda engine: self.conditioning(engine, 1, pixels.shape[:2]), label=job.item.label,
                              colour_fix=self.colour_fix, progress=self.step_progress(), hints=self._tile_hints(pixels))
        alpha = None if image.alpha is None else resample_alpha(image.alpha, size)
        return Output(image=out, alpha=alpha, params={"input_size": list(image.size), "size": list(size)},
                      source=image.source)

    def _transform(self, jobs: list[Job]) -> list[Output]:
        width, height = jobs[0].payload.size
        images = padded_images([job.payload.rgb for job in jobs], self.multiple)
        hints = self._hints(jobs)
        rework = functools.partial(self._encode_sample_decode, images=images, seeds=[job.seed for job in jobs],
                                   hints=hints)
        results = self.engine.finite(rework, jobs[0].item.label).clamp(0, 1)[..., :height, :width]
        return [Output(image=to_array(result), alpha=job.payload.alpha, params=self._params(job), **carried(job.payload))
                for job, result in zip(jobs, results)]

    def _hints(self, jobs: list[Job]) -> Optional[list[torch.Tensor]]:
        """Each ControlNet's hint for every image (its file, or the one named like the input), at its size."""
        if not self.control:
            return None
        return self.control.batch([input_path(job).stem for job in jobs], jobs[0].payload.size, self.multiple,
                                  self.warn_once)

    def _tile_hints(self, pixels: np.ndarray) -> Optional[list[torch.Tensor]]:
        """With --scale, every ControlNet's hint is the upscaled image itself (ControlNet tile)."""
        if not self.control:
            return None
        own = (Path("input"), pixels.astype(np.float32) / 255)
        return hint_batch([[own] * (len(self.control.units) + len(self.control.adapters))], self.multiple)

    def _params(self, job: Job) -> dict[str, Any]:
        if not self.control or self.scale is not None:
            return _size(job.payload)
        return {**_size(job.payload), **hint_params(self.control.hint_files(input_path(job).stem))}

    def _encode_sample_decode(self, engine: Engine, *, images: torch.Tensor, seeds: list[int],
                              hints: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) at `engine`'s precision (`Engine.finite` retries in fp32)."""
        init = engine.encode(images)
        cond, uncond = self.conditioning(engine, len(seeds), (images.shape[-2], images.shape[-1]))
        z = engine.sample((init.shape[-2], init.shape[-1]), seeds, cond, uncond, init_latent=init, strength=self.strength,
                          progress=self.step_progress(), hints=hints)
        return engine.decode(z)


def _size(image: LoadedImage) -> dict[str, Any]:
    return {"size": list(image.size)}
