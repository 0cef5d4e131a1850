"""Image to image (SDEdit): encode each image, noise it part-way down the schedule (`strength`), and
sample back with the prompt; text models (LDM-BERT, SD 1.x/2.x) and unconditional models.

Any input size: images are padded (edge replication) up to the model's pixel multiple and the result is
cropped back. Alpha is passed through unchanged. Images of one size in a batch are sampled together.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ldmtool.io.images import LoadedImage, read_image
from ldmtool.pipelines.engine import Engine, to_array
from ldmtool.pipelines.text import PromptConditioning, group_by_size, padded_images
from ldmtool.runtime.jobs import BaseTask, Job, Output

DEFAULT_STRENGTH = 0.75


class Img2ImgTask(BaseTask):
    command = "img2img"

    def __init__(self, engine: Engine, *, prompt: str = "", negative: str = "",
                 strength: float = DEFAULT_STRENGTH, max_pixels: Optional[int] = None):
        super().__init__(params={"prompt": prompt, "negative": negative, "strength": strength})
        self.engine = engine
        self.prompt, self.negative = prompt, negative
        self.strength = strength
        self.max_pixels = max_pixels

    def open(self) -> None:
        engine = self.engine.open()
        self.model_path = engine.model_path
        self.conditioning = PromptConditioning(engine.bundle, engine.model_path, self.command,
                                               prompt=self.prompt, negative=self.negative)
        self.multiple = engine.info.pixel_multiple
        self.params.update(engine.resolved(), model_family=engine.info.family)

    def load(self, job: Job) -> LoadedImage:
        return read_image(job.item.path, max_pixels=self.max_pixels)

    def run(self, jobs: list[Job]) -> list[Output]:
        outputs: dict[int, Output] = {}
        for group in group_by_size(jobs, lambda job: job.payload.size):
            for job, output in zip(group, self._transform(group)):
                outputs[id(job)] = output
        return [outputs[id(job)] for job in jobs]

    def _transform(self, jobs: list[Job]) -> list[Output]:
        width, height = jobs[0].payload.size
        images = padded_images([job.payload.rgb for job in jobs], self.multiple)
        seeds = [job.seed for job in jobs]

        def compute(e: Engine) -> torch.Tensor:
            init = e.encode(images)
            cond, uncond = self.conditioning(e, len(jobs))
            z = e.sample(tuple(init.shape[-2:]), seeds, cond, uncond, init_latent=init, strength=self.strength,
                         progress=self.reporter and self.reporter.steps)
            return e.decode(z)

        results = self.engine.finite(compute, jobs[0].item.label).clamp(0, 1)[..., :height, :width]
        return [Output(image=to_array(result), alpha=job.payload.alpha, params=_size(job.payload))
                for job, result in zip(jobs, results)]


def _size(image: LoadedImage) -> dict[str, Any]:
    return {"size": list(image.size)}
