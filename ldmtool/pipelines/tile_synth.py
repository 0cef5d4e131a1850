"""Large canvases and tileable textures from any generator model.

`tile-synth` is the generator pipelines at a canvas size of the user's choosing: the tiled engine samples
it tile by tile (memory grows with the tile, not the canvas) and `--seamless x|y|xy` makes the result wrap
around. What conditions the canvas follows the inputs: label maps (semantic models, the map is stretched
to the canvas), `--class` (class-conditional models), `--prompt` (text models, encoded once per run by
the text pipelines' TextConditioner), or nothing (unconditional models).
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from ldmtool.checkpoints.bundle import LatentDiffusionBundle
from ldmtool.diffusion.cond import Cond
from ldmtool.errors import UsageError
from ldmtool.families.info import Conditioning
from ldmtool.io.discover import Item, generated_items
from ldmtool.pipelines.engine import Engine
from ldmtool.pipelines.sample import GeneratorTask, SampleTask, check_sample_count, sample_items
from ldmtool.pipelines.semantic2img import Semantic2ImgTask
from ldmtool.pipelines.text import text_conditioner, text_conditioning, text_encoder
from ldmtool.runtime.jobs import Job

if TYPE_CHECKING:
    from ldmtool.pipelines.flow_engine import FlowTexts
    from ldmtool.pipelines.text import TextConditioner

COMMAND = "tile-synth"
# Label maps need a semantic model and a prompt a text model: their own shipped defaults (else default-sample).
DEFAULT_MODEL_BY_GENERATOR = {"semantic": "default-semantic2img", "text": "default-txt2img"}


class Generator(str, Enum):
    SEMANTIC = "semantic"
    CLASS = "class"
    TEXT = "text"
    UNCONDITIONAL = "unconditional"


def choose_generator(*, maps: bool, classes: Sequence[str], prompt: Optional[str]) -> Generator:
    """Which generator the inputs ask for; UsageError when they ask for more than one."""
    given = [kind for kind, on in ((Generator.SEMANTIC, maps), (Generator.CLASS, bool(classes)),
                                   (Generator.TEXT, prompt is not None)) if on]
    if len(given) > 1:
        raise UsageError("give one kind of conditioning: label maps, --class or --prompt")
    return given[0] if given else Generator.UNCONDITIONAL


def check_generator_options(generator: Generator, *, samples: int, palette: Optional[Path | str],
                            negative: Optional[str]) -> None:
    """UsageError for an option the chosen generator would ignore (--n with label maps, --palette without
    them, --negative without --prompt)."""
    if generator is Generator.SEMANTIC and samples != 1:
        raise UsageError(f"--n {samples}: label maps give one canvas each; drop --n (or run again with another --seed)")
    if generator is not Generator.SEMANTIC and palette is not None:
        raise UsageError(f"--palette {palette}: the palette colours label maps; give label map files as inputs, "
                         "or drop --palette")
    if generator is not Generator.TEXT and negative is not None:
        raise UsageError("--negative needs --prompt (a text model's canvas); drop --negative")


def canvas_size(width: Optional[int], height: Optional[int]) -> tuple[int, int]:
    if width is None or height is None:
        raise UsageError("tile-synth needs the canvas size: --width W --height H (e.g. --width 4096 --height 1024)")
    return width, height


class TextTileTask(GeneratorTask):
    """A text model's prompt (guided by the negative prompt) over the whole canvas."""

    command = COMMAND

    def __init__(self, engine: Engine, *, prompt: str, negative: str = "", width: int, height: int):
        super().__init__(engine, width=width, height=height)
        self.prompt, self.negative = prompt, negative

    def check_conditioning(self, bundle: LatentDiffusionBundle) -> None:
        self.texts = self._conditioner(bundle)
        self.check_vocabulary((self.prompt, self.negative))
        self.check_literal_prompts((self.prompt, self.negative))
        self.params.update(prompt=self.prompt, negative=self.negative)

    def _conditioner(self, bundle: LatentDiffusionBundle) -> "TextConditioner | FlowTexts":
        """The model's text conditioner (a flow-matching model's comes with its flow side, `engine.flow`)."""
        if self.engine.flow is not None:
            return self.engine.flow.texts(self.engine)
        encoder = text_encoder(bundle)
        if encoder is None or text_conditioning(bundle.info) is not Conditioning.CROSSATTN:
            raise UsageError(f"{self.engine.model_path}: a {bundle.info.family} model takes no text; drop --prompt "
                             "(or use a text-to-image model)")
        return text_conditioner(self.engine, encoder)

    def has_uncond(self) -> bool:
        return True

    def conditioning(self, engine: Engine, job: Job, latent_hw: tuple[int, int]) -> tuple[Cond, Optional[Cond]]:
        image_hw = (latent_hw[0] * engine.info.downsampling, latent_hw[1] * engine.info.downsampling)
        return self.texts.conds(engine, [self.prompt], [self.negative], image_hw)


class NoiseTileTask(SampleTask):
    """Class-conditional or unconditional models, with hints for models that need other inputs."""

    command = COMMAND

    def check_conditioning(self, bundle: LatentDiffusionBundle) -> None:
        path = self.engine.model_path
        if not self.classes and text_encoder(bundle) is not None:
            raise UsageError(f"{path} is a text model; give --prompt TEXT")
        if not self.classes and bundle.info.label_classes is not None:
            raise UsageError(f"{path} is a semantic-synthesis model; give label map files as inputs")
        super().check_conditioning(bundle)


class MapTileTask(Semantic2ImgTask):
    command = COMMAND


def tile_synth_task(engine: Engine, generator: Generator, *, width: int, height: int, classes: Sequence[str] = (),
                    prompt: Optional[str] = None, negative: str = "", palette: Optional[Path | str] = None,
                    max_pixels: Optional[int] = None) -> GeneratorTask:
    """The task for a canvas of `width` x `height` conditioned as `generator` says."""
    if generator is Generator.SEMANTIC:
        task: GeneratorTask = MapTileTask(engine, palette=palette, width=width, height=height, max_pixels=max_pixels)
    elif generator is Generator.TEXT:
        task = TextTileTask(engine, prompt=prompt or "", negative=negative, width=width, height=height)
    else:
        task = NoiseTileTask(engine, classes=classes, width=width, height=height)
    task.params["generator"] = generator.value
    task.warns_large = False  # large canvases are what tile-synth is for
    return task


def generated_canvas_items(generator: Generator, *, classes: Sequence[str], prompt: Optional[str],
                           samples: int) -> Sequence[Item]:
    """Items of the generators that take no files."""
    if generator is Generator.TEXT:
        check_sample_count(samples)
        return generated_items([prompt or ""], samples=samples, kind="prompt")
    return sample_items(classes, samples)

