"""Image to image (SDEdit): encode each image, noise it part-way down the schedule (`strength`), and
sample back with the prompt; text models (LDM-BERT, SD 1.x/2.x) and unconditional models.

Any input size: images are padded (edge replication) up to the model's pixel multiple and the result is
cropped back. Alpha is passed through unchanged. Images of one size in a batch are sampled together.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from ldmtool.io.discover import Item
from ldmtool.io.images import LoadedImage, read_image
from ldmtool.pipelines.base import ModelTask, carried, in_groups, input_path, input_size
from ldmtool.pipelines.engine import Engine, to_array
from ldmtool.pipelines.text import PromptConditioning, padded_images
from ldmtool.runtime.jobs import Job, Output

DEFAULT_STRENGTH = 0.75


class Img2ImgTask(ModelTask):
    """Each batch, in groups of one size: pad the images → encode → noise to `strength` and sample back with
    the prompt → decode → crop; alpha passed through."""

    command = "img2img"
    reads_images = True

    def __init__(self, engine: Engine, *, prompt: str = "", negative: str = "",
                 strength: float = DEFAULT_STRENGTH, max_pixels: Optional[int] = None):
        super().__init__(engine, params={"prompt": prompt, "negative": negative, "strength": strength})
        self.prompt, self.negative = prompt, negative
        self.strength = strength
        self.max_pixels = max_pixels

    def check_model(self, engine: Engine) -> None:
        self.conditioning = PromptConditioning(engine, self.command, prompt=self.prompt, negative=self.negative)
        self.check_guidance(engine, guided=self.conditioning.texts is not None)
        self.check_vocabulary((self.prompt, self.negative))
        self.check_literal_prompts((self.prompt, self.negative))
        self.multiple = engine.info.pixel_multiple

    def planned_size(self, item: Item) -> Optional[tuple[int, int]]:
        """The input's size, from its header: the output keeps it."""
        return input_size(item, self.max_pixels)

    def load(self, job: Job) -> LoadedImage:
        return read_image(input_path(job), max_pixels=self.max_pixels)

    def run(self, jobs: list[Job]) -> list[Output]:
        return in_groups(jobs, lambda job: job.payload.size, self._transform)

    def _transform(self, jobs: list[Job]) -> list[Output]:
        width, height = jobs[0].payload.size
        images = padded_images([job.payload.rgb for job in jobs], self.multiple)
        rework = functools.partial(self._encode_sample_decode, images=images, seeds=[job.seed for job in jobs])
        results = self.engine.finite(rework, jobs[0].item.label).clamp(0, 1)[..., :height, :width]
        return [Output(image=to_array(result), alpha=job.payload.alpha, params=_size(job.payload), **carried(job.payload))
                for job, result in zip(jobs, results)]

    def _encode_sample_decode(self, engine: Engine, *, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) at `engine`'s precision (`Engine.finite` retries in fp32)."""
        init = engine.encode(images)
        cond, uncond = self.conditioning(engine, len(seeds), (images.shape[-2], images.shape[-1]))
        z = engine.sample((init.shape[-2], init.shape[-1]), seeds, cond, uncond, init_latent=init, strength=self.strength,
                          progress=self.step_progress())
        return engine.decode(z)


def _size(image: LoadedImage) -> dict[str, Any]:
    return {"size": list(image.size)}
