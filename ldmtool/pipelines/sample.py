"""Sampling from generator models: class-conditional (cin256: ImageNet class ids or names) and unconditional
(CelebA-HQ, FFHQ, LSUN) LDMs, plus `GeneratorTask`, the base the other generator pipelines (semantic2img,
layout2img, tile-synth) share.

A generator item is one image with its own seed. `GeneratorTask` samples it at the requested size (sizes
above the native one go through the tiled engine, `--seamless` wraps), decodes it, crops any padding and
hands one Output to the runner. Subclasses say which models they take (`check_conditioning`) and what the
conditioning of an item is (`conditioning`).

Class names: the cin256 models were trained on ImageNet-1k in the standard class order (index 0 = tench);
names are matched case-insensitively with spaces, '_' and '-' treated alike (`golden retriever`). The v2
model has a 1001st class (index 1000) that it learned as "no class": it is the unconditional input of
classifier-free guidance.
"""
from __future__ import annotations

import difflib
import functools
import re
from functools import lru_cache
from importlib import resources
from typing import Any, Optional, Sequence

import torch

from ldmtool.checkpoints.bundle import LatentDiffusionBundle
from ldmtool.diffusion.cond import Cond
from ldmtool.errors import FatalError, ItemError, UsageError
from ldmtool.families.info import Conditioning
from ldmtool.io.discover import Item, generated_items
from ldmtool.pipelines.base import ModelTask
from ldmtool.pipelines.engine import Engine, method
from ldmtool.pipelines.text import check_placeable, check_size
from ldmtool.runtime.jobs import Job, Output
from ldmtool.runtime.seeds import SEED_LIMIT

IMAGENET_CLASSES = 1000


class GeneratorTask(ModelTask):
    """One image per item from noise: the canvas size → conditioning → sample → decode to pixels → crop."""

    command = "sample"

    def __init__(self, engine: Engine, *, width: Optional[int] = None, height: Optional[int] = None):
        super().__init__(engine)
        self.width, self.height = width, height

    # -- once per run

    def check_model(self, engine: Engine) -> None:
        self.check_conditioning(engine.bundle)
        self.multiple = engine.info.pixel_multiple
        self.width, self.height = self.default_size()
        if self.width and self.height:  # else each item's own (a label map's): its item fails
            check_placeable(self.width, self.height, engine.info.max_side, engine.model_path.name)
        self.check_cfg()

    def recorded(self, engine: Engine) -> dict[str, Any]:
        size = {} if self.width is None else {"width": self.width, "height": self.height}  # None: per item
        return {**super().recorded(engine), **size}

    # -- what subclasses decide

    def check_conditioning(self, bundle: LatentDiffusionBundle) -> None:
        """FatalError when the model does not take the conditioning this generator gives."""

    def conditioning(self, engine: Engine, job: Job, latent_hw: tuple[int, int]) -> tuple[Cond, Optional[Cond]]:
        """(cond, uncond) for one item; uncond None means no guidance."""
        return Cond(), None

    def has_uncond(self) -> bool:
        return False

    def canvas(self, job: Job) -> tuple[int, int]:
        """(width, height) of the item's output."""
        return self.run_size()

    def run_size(self) -> tuple[int, int]:
        """The run's (width, height), set by `check_model` (`default_size`; generators with a size per item
        override `canvas`)."""
        assert self.width is not None and self.height is not None, "check_model() sets the run's size"
        return self.width, self.height

    def item_params(self, job: Job) -> dict[str, Any]:
        return {}

    def own_defaults(self, info: Any) -> dict[str, Any]:
        """--width/--height: the model's size (generators whose size is each item's own say none)."""
        width, height = info.defaults.size
        return {"width": width, "height": height}

    def planned_size(self, item: Item) -> Optional[tuple[int, int]]:
        """The run's size: --width/--height, or the model's default once it is open (None before)."""
        return (self.width, self.height) if self.width and self.height else None

    def options_size(self) -> Optional[tuple[int, int]]:
        """--width/--height when both are given (or, once the model is open, its default size)."""
        return (self.width, self.height) if self.width and self.height else None

    def padded(self, width: int, height: int) -> tuple[int, int]:
        """The size actually sampled: the next multiples the model can take (the output is cropped back)."""
        return width + (-width) % self.multiple, height + (-height) % self.multiple

    def default_size(self) -> tuple[Optional[int], Optional[int]]:
        default_w, default_h = self.engine.info.defaults.size
        width, height = self.width or default_w, self.height or default_h
        check_size(width, height, self.multiple)
        return width, height

    def check_cfg(self) -> None:
        if self.engine.sampling.cfg not in (None, 1.0) and not self.has_uncond():
            raise UsageError(f"--cfg {self.engine.sampling.cfg}: a {self.engine.info.family} model has no "
                             "unconditional input, so classifier-free guidance cannot run; drop --cfg")

    # -- each item

    def run(self, jobs: list[Job]) -> list[Output]:
        return [self._generate(job) for job in jobs]

    def _generate(self, job: Job) -> Output:
        width, height = self.canvas(job)
        self.check_trained_size(width, height)
        latent_hw = self._latent_size(job, width, height)
        generate = functools.partial(self._sample_and_decode, job=job, latent_hw=latent_hw)
        pixels = self.engine.finite(generate, job.item.label)[0, :height, :width]  # uint8: no float canvas
        params = {"width": width, "height": height, **self.item_params(job)}
        if not self.has_uncond():
            params["cfg"] = 1.0  # recorded as what ran: no guidance
        return Output(image=pixels.numpy(), params=params)

    def _latent_size(self, job: Job, width: int, height: int) -> tuple[int, int]:
        """The latent of the canvas padded to the model's multiple (seamless canvases must need no padding)."""
        sample_w, sample_h = self.padded(width, height)
        self._check_wrap(job, (width, height), (sample_w, sample_h))
        down = self.engine.info.downsampling
        return sample_h // down, sample_w // down

    def _check_wrap(self, job: Job, size: tuple[int, int], sampled: tuple[int, int]) -> None:
        """A cropped canvas would cut the wrap-around apart: seamless sizes must be exact multiples."""
        axes = self.engine.axes
        for name, wraps, value, padded in (("width", axes.x, size[0], sampled[0]),
                                           ("height", axes.y, size[1], sampled[1])):
            if wraps and value != padded:
                raise ItemError(f"{job.item.label}: with --seamless the {name} must be a multiple of "
                                f"{self.multiple} pixels, not {value}")

    def _sample_and_decode(self, engine: Engine, *, job: Job, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Uint8 pixels (1, H, W, 3) at `engine`'s precision (`Engine.finite` retries in fp32)."""
        cond, uncond = self.conditioning(engine, job, latent_hw)
        uncond = uncond if self.has_uncond() else None
        return engine.decode_pixels(engine.sample(latent_hw, [job.seed], cond, uncond, progress=self.step_progress()))


# ---------------------------------------------------------------- class names


@lru_cache(maxsize=1)
def imagenet_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order (bundled data file)."""
    text = resources.files("ldmtool.assets").joinpath("labels/imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != IMAGENET_CLASSES:
        raise FatalError(f"the bundled ImageNet class list has {len(names)} names instead of {IMAGENET_CLASSES}")
    return names


def normalize_name(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def class_id(value: str, n_classes: int) -> int:
    """A class id from a number or an ImageNet name; UsageError for unknown, ambiguous or out-of-range values."""
    text = value.strip()
    if re.fullmatch(r"\d+", text):
        digits = text.lstrip("0") or "0"  # int() of over 4300 digits raises ValueError
        if len(digits) > 9 or int(digits) >= n_classes:
            raise UsageError(f"--class {text[:20]}{'...' if len(text) > 20 else ''}: this model has classes 0 to "
                             f"{n_classes - 1}")
        return int(digits)
    if n_classes < IMAGENET_CLASSES:
        raise UsageError(f"--class {text!r}: this model's classes have no names; give a number from 0 to "
                         f"{n_classes - 1}")
    return _imagenet_id(text)


def _imagenet_id(text: str) -> int:
    wanted = normalize_name(text)
    names = [normalize_name(n) for n in imagenet_names()]
    matches = [index for index, name in enumerate(names) if name == wanted]
    if len(matches) > 1:
        raise UsageError(f"--class {text!r} names several ImageNet classes ({', '.join(map(str, matches))}); "
                         "give the number instead")
    if not matches:
        close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; or give the class number"
        raise UsageError(f"--class {text!r} is not an ImageNet class name{hint}")
    return matches[0]


def class_label(index: int, n_classes: int) -> str:
    """A readable name for a class id (ImageNet names for ImageNet models, else the number)."""
    if n_classes >= IMAGENET_CLASSES and index < IMAGENET_CLASSES:
        return imagenet_names()[index]
    return str(index)


# ---------------------------------------------------------------- the sample command


def sample_items(classes: Sequence[str], samples: int) -> Sequence[Item]:
    """Items for `ldmtool sample`: one per (class, sample), or `samples` unconditional ones."""
    check_sample_count(samples, labels=max(1, len(classes)))
    if classes:
        return generated_items(list(classes), samples=samples, kind="class")
    return generated_items([""], samples=samples, kind="sample")


def check_sample_count(samples: int, *, labels: int = 1) -> None:
    """UsageError unless `--n` is at least 1 and the run's images have distinct seeds (seed + n counts up to
    SEED_LIMIT and then wraps: more images would repeat earlier ones; a count past sys.maxsize was an
    OverflowError traceback)."""
    if samples < 1:
        raise UsageError(f"--n {samples}: must be at least 1")
    if labels * samples > SEED_LIMIT:
        raise UsageError(f"--n {samples}: {labels * samples} images in one run is more than the {SEED_LIMIT} "
                         "distinct seeds (later images would repeat earlier ones)")


class SampleTask(GeneratorTask):
    """Class-conditional (ClassEmbedder cross-attention) and unconditional models."""

    command = "sample"
    item_options = ("classes",)  # each item carries its class (data["label"])

    def __init__(self, engine: Engine, *, classes: Sequence[str] = (), width: Optional[int] = None,
                 height: Optional[int] = None):
        super().__init__(engine, width=width, height=height)
        self.classes = list(classes)
        self.class_ids: list[int] = []
        self.n_classes = 0

    def check_conditioning(self, bundle: LatentDiffusionBundle) -> None:
        info = bundle.info
        path = self.engine.model_path
        if info.conditioning is Conditioning.NONE:
            if self.classes:
                raise UsageError(f"--class: {path} is an unconditional {info.family} model; drop --class")
            return
        if info.class_count is None or info.conditioning is not Conditioning.CROSSATTN:
            raise UsageError(f"{path}: a {info.family} model cannot do `{self.command}` without other inputs (it "
                             "needs a class-conditional or unconditional model; see txt2img, semantic2img, layout2img)")
        self.n_classes = info.class_count
        if not self.classes:
            raise UsageError(f"{path} is a class-conditional model; name classes with --class (a number or an "
                             "ImageNet name such as 'golden retriever')")
        self.class_ids = [class_id(value, self.n_classes) for value in self.classes]

    def has_uncond(self) -> bool:
        return self.n_classes == IMAGENET_CLASSES + 1  # cin256-v2: class 1000 is "no class"

    def conditioning(self, engine: Engine, job: Job, latent_hw: tuple[int, int]) -> tuple[Cond, Optional[Cond]]:
        if not self.class_ids:
            return Cond(), None
        encode = method(engine.cond_stage("encode class labels"), "encode")
        label = self.class_ids[job.item.data["index"]]
        with torch.inference_mode():
            context = encode(torch.tensor([label]))
            uncontext = encode(torch.tensor([self.n_classes - 1])) if self.has_uncond() else None
        cond = Cond(crossattn=context.to(engine.dtype))
        return cond, None if uncontext is None else Cond(crossattn=uncontext.to(engine.dtype))

    def item_params(self, job: Job) -> dict[str, Any]:
        if not self.class_ids:
            return {}
        label = self.class_ids[job.item.data["index"]]
        return {"class": label, "class_name": class_label(label, self.n_classes)}
