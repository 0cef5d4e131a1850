"""Text to image: LDM-BERT (text2img256, txt2img-1p4B), SD 1.x and SD 2.x (eps and v) models.

Each (prompt, sample) pair is one item with its own seed. Items of a batch that share size and sampling
parameters are sampled together; every prompt is encoded once per run. Sizes larger than the model's
native size go through the tiled engine (the Engine decides from the latent size).

With `hires` (`--hires S`, A1111's hires fix) each image is then upscaled by diffusion (`pipelines/upscale.py`)
at `hires_strength` with its own prompt and seed: the same pixels as `img2img --scale S` on the first image.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch

from ldmtool.addons.networks import NetworkSet, lora_hashes, prompt_networks
from ldmtool.diffusion.cond import Cond
from ldmtool.diffusion.samplers import get_sampler
from ldmtool.errors import ItemError, UsageError
from ldmtool.io.discover import Item, generated_items
from ldmtool.pipelines.base import ModelTask, in_groups
from ldmtool.pipelines.control import ControlRun, hint_batch, hint_params
from ldmtool.pipelines.engine import Engine
from ldmtool.pipelines.prompt_templates import PromptTemplates, expanded, is_template
from ldmtool.pipelines.refiner import Refiner
from ldmtool.pipelines.sample import check_sample_count
from ldmtool.pipelines.text import (
    PromptSpec,
    check_placeable,
    check_size,
    require_text_model,
    text_conditioner,
)
from ldmtool.pipelines.upscale import check_scale, rework_upscaled, upscaled
from ldmtool.runtime.jobs import Job, Output
from ldmtool.runtime.seeds import SEED_LIMIT, NoiseSource

if TYPE_CHECKING:
    from ldmtool.pipelines.flow_engine import FlowTexts
    from ldmtool.pipelines.text import TextConditioner

DEFAULT_HIRES_STRENGTH = 0.5


def prompt_items(prompts: Sequence[PromptSpec], samples: int, *, same_seed: bool = False) -> Sequence[Item]:
    """One item per (prompt, sample), seeded N, N+1, ... in order; a JSON line's own seed S gives its samples
    S, S+1, ... The item carries its prompt line (`data["spec"]`), so it is the same job whatever file it came from.

    `same_seed`: every line starts again at the run's seed (its samples N, N+1, ...), and every sample of a
    template line (each a random expansion) has the run's seed itself; its expansion is then chosen by the
    seed plus its position (`data["variant"]`), so only the prompt changes."""
    specs = list(prompts)
    check_sample_count(samples, labels=max(1, len(specs)))  # --n 10**20 was an OverflowError traceback

    def with_line(item: Item) -> Item:
        spec = specs[item.data["index"]]
        data, offset = {**item.data, "spec": spec.as_dict()}, item.seed_offset
        if same_seed:
            random_template = spec.template is None and is_template(spec.prompt)
            offset = 0 if random_template else item.data["sample"]
            if random_template:
                data["variant"] = item.seed_offset
        return replace(item, data=data, seed=_own_seed(spec, item.data["sample"]), seed_offset=offset)

    return generated_items([p.prompt for p in specs], samples=samples, kind="prompt", finish=with_line)


def _own_seed(spec: PromptSpec, sample: int) -> Optional[int]:
    return None if spec.seed is None else (spec.seed + sample) % SEED_LIMIT


class Txt2ImgTask(ModelTask):
    """Each batch, in groups that share size and sampling values: encode the prompts → sample → decode to
    pixels."""

    command = "txt2img"
    item_options = ("prompt",)  # --prompt is one prompt line: each item carries its line

    def __init__(self, engine: Engine, prompts: Sequence[PromptSpec], *, negative: str = "",
                 width: Optional[int] = None, height: Optional[int] = None, wildcards: Optional[Path] = None,
                 refiner: Optional[Engine] = None, refiner_at: Optional[float] = None,
                 hires: Optional[float] = None, hires_strength: Optional[float] = None,
                 hires_colour_fix: Optional[bool] = None, control: Optional[ControlRun] = None):
        super().__init__(engine)
        self.control = control
        if control is not None:
            control.matches_inputs = False
        engine.control = control
        self.hires = hires
        self.hires_strength = DEFAULT_HIRES_STRENGTH if hires_strength is None else hires_strength
        self.hires_colour_fix = hires_colour_fix is not False
        self._hires_options = (hires_strength, hires_colour_fix)
        self.prompts = list(prompts)
        self.refiner = refiner  # takes the schedule over at `refiner_at` (pipelines/refiner.py)
        self.refining = Refiner(refiner, refiner_at)
        self.negative = negative
        self.width, self.height = width, height
        self.wildcards = wildcards
        self._templates: Optional[PromptTemplates] = None  # made when an item first has a template
        self._prompt_networks: dict[tuple[str, Optional[Path]], NetworkSet] = {}

    # -- once per run

    def validate(self) -> None:
        super().validate()
        check_scale("--hires", self.hires)
        if self.hires is None and self._hires_options != (None, None):
            raise UsageError("--hires-strength and --hires-colour-fix go with --hires S (the hires fix)")
        self.refining.validate()
        if self.control is not None:
            self.control.validate()
        for spec in self.prompts:  # a missing LoRA or a bad weight: before the model loads
            if not is_template(spec.prompt):
                self._networks(spec.prompt)

    def prompt_texts(self) -> tuple[Optional[str], ...]:
        literal = [spec for spec in self.prompts if not is_template(spec.prompt)]
        return (self.negative, *(text for spec in literal for text in (spec.prompt, spec.negative)))

    def check_model(self, engine: Engine) -> None:
        self.texts = self._conditioner(engine)
        self._texts_by_networks: dict[NetworkSet, TextConditioner | FlowTexts] = {engine.networks: self.texts}
        self.multiple = engine.info.pixel_multiple
        if self.refining.active:
            self.multiple = max(self.multiple, self.refining.open(engine, self.command))
        default_w, default_h = engine.info.defaults.size
        self.width, self.height = self.width or default_w, self.height or default_h
        check_size(self.width, self.height, self.multiple)
        check_placeable(*self._hires_size(self.width, self.height), engine.info.max_side, engine.model_path.name)

    def recorded(self, engine: Engine) -> dict[str, Any]:
        refined = self.refining.recorded()
        hires = {} if self.hires is None else {"hires": self.hires, "hires_strength": self.hires_strength,
                                               "hires_colour_fix": self.hires_colour_fix}
        control = self.control.recorded() if self.control else {}
        return {"negative": self.negative, "width": self.width, "height": self.height, **refined, **hires,
                **control, **super().recorded(engine)}

    def own_defaults(self, info: Any) -> dict[str, Any]:
        """--width/--height: the model's size; with --hires, --hires-strength 0.5 and --hires-colour-fix."""
        width, height = info.defaults.size
        hires = {} if self.hires is None else {"hires_strength": DEFAULT_HIRES_STRENGTH, "hires_colour_fix": True}
        return {"width": width, "height": height, **hires}

    def planned_size(self, item: Item) -> Optional[tuple[int, int]]:
        """A prompt line's own size, else the run's (--width/--height, or the model's default once open)."""
        spec = item.data.get("spec", {})
        width, height = spec.get("width") or self.width, spec.get("height") or self.height
        return self._hires_size(width, height) if width and height else None

    def options_size(self) -> Optional[tuple[int, int]]:
        """--width/--height (times --hires), the size of every prompt line that sets none of its own."""
        return self._hires_size(self.width, self.height) if self.width and self.height else None

    def _hires_size(self, width: int, height: int) -> tuple[int, int]:
        """The output of a width x height sample: --hires scales it (and samples it again at that size)."""
        return (width, height) if self.hires is None else (round(width * self.hires), round(height * self.hires))

    # -- each item

    def item_addon_files(self, item: Item, seed: int) -> dict[str, Any]:
        """Beside its hints, the contents of the LoRAs an item's prompt tags name, with the run's `--lora`
        (as its model has them), in place of the run's `lora_sha256`."""
        files = super().item_addon_files(item, seed)
        try:
            spec = self._expanded(PromptSpec(**item.data["spec"]), item, seed)
            networks = self._networks(spec.prompt)
            files["embeddings_sha256"] = self.used_embeddings((spec.prompt, self._negative(spec)))
        except (UsageError, ItemError):
            return files  # the item fails when it loads
        if networks:
            from ldmtool.addons.apply import ModelAddons

            files["lora_sha256"] = ModelAddons.of(self.engine.choice, networks).job_identity()["lora_sha256"]
        return files

    def load(self, job: Job) -> PromptSpec:
        spec = self._expanded(PromptSpec(**job.item.data["spec"]), job.item, job.seed)
        width, height = self._size(spec)
        try:
            check_size(width, height, self.multiple)
            check_placeable(*self._hires_size(width, height), self.engine.info.max_side, self.engine.model_path.name)
            if spec.sampler is not None:
                get_sampler(spec.sampler)
        except UsageError as err:  # a bad JSON line fails its own items only
            raise ItemError(f"{job.item.label}: {err}") from None
        try:
            self._networks(spec.prompt)
            self.used_embeddings((spec.prompt, self._negative(spec)))  # a template's, once expanded
        except UsageError as err:  # a LoRA or an embedding a line names is missing or bad: its items fail
            raise ItemError(f"{job.item.label}: {err}") from None
        self.check_vocabulary((spec.prompt, self._negative(spec)))
        self.check_trained_size(width, height)
        return spec

    def run(self, jobs: list[Job]) -> list[Output]:
        return in_groups(jobs, self._batch_key, self._generate)

    def _generate(self, jobs: list[Job]) -> list[Output]:
        spec: PromptSpec = jobs[0].payload
        engine = self._engine_for(spec)
        width, height = self._size(spec)
        latent_hw = (height // engine.info.downsampling, width // engine.info.downsampling)
        generate = functools.partial(self._sample_and_decode, latent_hw=latent_hw,
                                     prompts=[job.payload.prompt for job in jobs],
                                     negatives=[self._negative(job.payload) for job in jobs],
                                     seeds=[job.seed for job in jobs])
        images = engine.finite(generate, jobs[0].item.label)  # (B, H, W, 3) uint8
        sized = engine.item_recorded(latent_hw)
        return [Output(image=self._hires_fix(engine, job, image.numpy()),
                       params={**self._item_params(job.payload, engine), **sized})
                for job, image in zip(jobs, images)]

    def _hires_fix(self, engine: Engine, job: Job, image: np.ndarray) -> np.ndarray:
        """The image upscaled by diffusion with the item's prompt and seed (--hires), else as it is."""
        if self.hires is None:
            return image
        prompt, negative = job.payload.prompt, self._negative(job.payload)
        big = upscaled(image, self.hires)

        def conditioning(engine: Engine) -> tuple[Cond, Optional[Cond]]:
            return self._texts_for(engine).conds(engine, [prompt], [negative], (big.shape[0], big.shape[1]))

        hints = (hint_batch([self.control.scaled_hints(None, big)], engine.info.pixel_multiple)  # padded as `big` is
                 if self.control else None)
        return rework_upscaled(engine, big, scale=self.hires, strength=self.hires_strength,
                               seed=job.seed, conditioning=conditioning, label=job.item.label,
                               colour_fix=self.hires_colour_fix, progress=self.step_progress(), hints=hints)

    def _sample_and_decode(self, engine: Engine, *, latent_hw: tuple[int, int], prompts: list[str],
                           negatives: list[str], seeds: list[int]) -> torch.Tensor:
        """Uint8 pixels (B, H, W, 3) at `engine`'s precision (`Engine.finite` retries in fp32)."""
        image_hw = (latent_hw[0] * engine.info.downsampling, latent_hw[1] * engine.info.downsampling)
        cond, uncond = self._texts_for(engine).conds(engine, prompts, negatives, image_hw)
        hints = self._hints(image_hw, len(prompts))
        noise = NoiseSource(seeds)
        z = engine.sample(latent_hw, seeds, cond, uncond, progress=self.step_progress(), handoff=self.refining.first(),
                          noise=noise, hints=hints)
        if self.refining.active:
            engine, z = self.refining.refine(engine, z, prompts=prompts, negatives=negatives, image_hw=image_hw,
                                             noise=noise, progress=self.step_progress())
        return engine.decode_pixels(z)

    def _hints(self, image_hw: tuple[int, int], rows: int) -> Optional[list[torch.Tensor]]:
        """Each ControlNet's hint (the same for every prompt) at the image size, once per batch."""
        if not self.control:
            return None
        hints = self.control.hints(None, (image_hw[1], image_hw[0]))
        for note in self.control.notes:
            self.warn_once(note, note)
        return hint_batch([hints] * rows)

    def _expanded(self, spec: PromptSpec, item: Item, seed: int) -> PromptSpec:
        """The item's prompt line with its templates expanded by its seed (random mode)."""
        negative = self._negative(spec)
        if not (is_template(spec.prompt) or is_template(negative)):
            return spec
        if self._templates is None:
            self._templates = PromptTemplates(self.wildcards)
        try:
            return expanded(spec, negative, self._templates, seed + item.data.get("variant", 0))
        except UsageError as err:
            raise ItemError(f"{item.label}: {err}") from None

    def _size(self, spec: PromptSpec) -> tuple[int, int]:
        """(width, height) of a prompt line's images: its own, else the run's."""
        width, height = spec.width or self.width, spec.height or self.height
        assert width is not None and height is not None, "check_model() sets the run's size"
        return width, height

    def _negative(self, spec: PromptSpec) -> str:
        return spec.negative if spec.negative is not None else self.negative

    def _engine_for(self, spec: PromptSpec) -> Engine:
        """The run's engine, or a copy sharing its model with a JSON line's own sampler/steps/cfg."""
        changes: dict[str, Any] = {k: v for k, v in (("sampler", spec.sampler), ("steps", spec.steps), ("cfg", spec.cfg))
                   if v is not None}
        networks = self._networks(spec.prompt)
        engine = self.engine.with_networks(self.engine.networks + networks) if networks else self.engine
        if not changes:
            return engine
        twin = copy.copy(engine)
        twin.sampling = replace(engine.sampling, **changes)
        return twin

    def _networks(self, prompt: str) -> NetworkSet:
        """The LoRAs a prompt's `<lora:NAME:W>` tags name (found once per distinct prompt)."""
        lora_dir = self.engine.choice.lora_dir
        if (prompt, lora_dir) not in self._prompt_networks:  # a sweep's cells share this, not their --lora-dir
            self._prompt_networks[prompt, lora_dir] = prompt_networks(prompt, lora_dir) if "<" in prompt else ()
        return self._prompt_networks[prompt, lora_dir]

    def _texts_for(self, engine: Engine) -> "TextConditioner | FlowTexts":
        """The text conditioner of an engine's model: LoRAs change the text encoder too."""
        if engine.networks not in self._texts_by_networks:
            self._texts_by_networks[engine.networks] = self._conditioner(engine)
        return self._texts_by_networks[engine.networks]

    def _conditioner(self, engine: Engine) -> "TextConditioner | FlowTexts":
        """The model's text conditioner (a flow-matching model's comes with its flow side: `pipelines/flow_engine.py`)."""
        if engine.flow is not None:
            return engine.flow.texts(engine)
        return text_conditioner(engine, require_text_model(engine.bundle, engine.model_path, self.command))

    def _item_params(self, spec: PromptSpec, engine: Engine) -> dict[str, Any]:
        params: dict[str, Any] = {"prompt": spec.prompt, **spec.overrides()}
        if engine is not self.engine:
            params.update(engine.resolved())
        if engine.networks != self.engine.networks:
            params["lora_hashes"] = lora_hashes(engine.addons().networks)
        if self.control:
            params.update(hint_params(self.control.hint_files(None)))
        ti_hashes = self.texts.ti_hashes(spec.prompt, self._negative(spec))
        if ti_hashes:
            params["ti_hashes"] = ti_hashes
        return params

    def _batch_key(self, job: Job) -> tuple[Any, ...]:
        """Jobs with equal keys share one sampling call: same size, sampling parameters and number of prompt
        chunks (prompts may differ; a longer context cannot share a batch without changing the others)."""
        spec: PromptSpec = job.payload
        chunks = self.texts.chunk_count(spec.prompt, self._negative(spec))
        return spec.width, spec.height, spec.sampler, spec.steps, spec.cfg, chunks, self._networks(spec.prompt)
