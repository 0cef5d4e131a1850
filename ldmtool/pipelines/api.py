"""The Python API: one plain call per task command, under the CLI as sqlite-utils' commands sit over its library.

    import ldmtool
    big = ldmtool.superres(photo, scale=4, seed=1)            # photo: a NumPy array, a Pillow image or a file
    fixed = ldmtool.inpaint(photo, mask, steps=20, seed=7)
    foxes = ldmtool.txt2img("a red fox in the snow", n=2, seed=3)   # commands that take no image: a list

Each call builds the command's task with the command's option records (`ModelChoice`, `SamplingChoice`;
`model=None` is the command's shipped default, every other option keeps its CLI name and default), opens it
(the model comes from the process-wide cache, so a second call does not load it again) and runs each item
through the task's own `load`/`run`, one item at a time as the CLI's default `--batch-size 1` does. Nothing
is written. The result is the pixels the CLI writes (see `ldmtool.pipelines.arrays` for depths).

Seeds: `seed=S` is the item's own seed, as `--item-seed S` (the `Seed:` an output records). For commands that
generate several items (prompts, `n` samples, classes) it is the run's seed: items use S, S+1, ... as the CLI's
`--seed S` does. `seed=None` draws a random one.

ControlNets and T2I-Adapters (txt2img, img2img, inpaint) take the `--controlnet` options by their CLI names:
`controlnet="canny.pth:0.8"` (or a list), `adapter=`, `control_image=` (a file, a Pillow image or an array, or
a list of them; "inpaint" for inpaint's hint from the mask), `control_start`, `control_end`, `control_mode`.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from ldmtool.errors import UsageError
from ldmtool.io.discover import Item
from ldmtool.options import ControlInputs, ModelChoice, SamplingChoice, option_fields
from ldmtool.pipelines.arrays import DEPTH_8, ImageInput, as_list, depth_of, read_input, read_mask_input, result_array
from ldmtool.pipelines.base import ModelTask
from ldmtool.pipelines.engine import Engine
from ldmtool.runtime.jobs import Job
from ldmtool.runtime.seeds import item_seed, random_seed

# The model each command loads without `model=` (the CLI's `--model` defaults).
DEFAULT_MODELS = {
    "superres": "default-superres", "inpaint": "default-inpaint", "img2img": "default-txt2img",
    "txt2img": "default-txt2img", "sample": "default-sample", "semantic2img": "default-semantic2img",
    "layout2img": "default-layout2img", "tile-synth": "default-sample",
}
_SEAMLESS_COMMANDS = ("txt2img", "sample", "semantic2img", "tile-synth")  # the CLI's generators

PathOrDoc = Union[str, Path, dict[str, Any], list[Any]]


# ---------------------------------------------------------------- images in, image out


def superres(image: ImageInput, *, scale: float = 4.0, prompt: Optional[str] = None, negative: Optional[str] = None,
             noise_level: Optional[int] = None, colour_fix: Optional[bool] = None,
             consistency: Optional[bool] = None, seed: Optional[int] = None, **options: Any) -> np.ndarray:
    """`ldmtool superres`: the image upscaled by `scale` (16-bit in, 16-bit out)."""
    from ldmtool.pipelines.superres import SuperresTask

    task = SuperresTask(_engine("superres", options), scale=scale, prompt=prompt or "", negative=negative or "",
                        noise_level=noise_level, colour_fix=colour_fix, consistency=consistency)
    loaded = read_input(image)
    return _one(task, task.check_input(loaded, "image"), seed, depth_of(loaded))


def img2img(image: ImageInput, *, prompt: Optional[str] = None, negative: Optional[str] = None,
            strength: float = 0.75, refiner: Optional[Union[str, Path]] = None, refiner_at: Optional[float] = None,
            seed: Optional[int] = None, **options: Any) -> np.ndarray:
    """`ldmtool img2img`: the image reworked towards the prompt (SDEdit) by `strength` (the last part of it by
    `refiner` from `refiner_at`)."""
    from ldmtool.pipelines.img2img import Img2ImgTask

    with _control(options) as control:
        engine = _engine("img2img", options)
        task = Img2ImgTask(engine, prompt=prompt or "", negative=negative or "", strength=strength,
                           refiner=_refiner(engine, refiner), refiner_at=refiner_at, control=control)
        control.validate()
        loaded = read_input(image)
        return _one(task, loaded, seed, depth_of(loaded))


def inpaint(image: ImageInput, mask: Optional[ImageInput] = None, *, prompt: Optional[str] = None,
            negative: Optional[str] = None, grow: int = 0, feather: int = 4, invert_mask: bool = False,
            mask_from_alpha: bool = False, colour_fix: Optional[bool] = None,
            refiner: Optional[Union[str, Path]] = None, refiner_at: Optional[float] = None,
            seed: Optional[int] = None, **options: Any) -> np.ndarray:
    """`ldmtool inpaint`: the white (≥ 0.5) part of `mask` repainted, the rest kept exactly."""
    from ldmtool.pipelines.inpaint import InpaintTask

    if (mask is None) != mask_from_alpha:
        raise UsageError("give a mask, or mask_from_alpha=True to repaint the image's transparent pixels")
    with _control(options) as control:
        engine = _engine("inpaint", options)
        task = InpaintTask(engine, prompt=prompt or "", negative=negative or "", grow=grow, feather=feather,
                           invert_mask=invert_mask, from_alpha=mask_from_alpha, colour_fix=colour_fix,
                           refiner=_refiner(engine, refiner), refiner_at=refiner_at, control=control)
        control.validate()  # once the task says which hints it can make (inpaint: from the mask)
        loaded = read_input(image)
        repaint = None if mask is None else read_mask_input(mask, size=loaded.size, invert=invert_mask)
        return _one(task, task.check_input(loaded, repaint, "image"), seed, depth_of(loaded))


# ---------------------------------------------------------------- maps and layouts in, image out


def semantic2img(label_map: ImageInput, *, palette: Optional[Union[str, Path]] = None,
                 width: Optional[int] = None, height: Optional[int] = None, seed: Optional[int] = None,
                 **options: Any) -> np.ndarray:
    """`ldmtool semantic2img`: an image of the label map (a file, a Pillow image, (H, W) class ids, or
    (H, W, 3) uint8 colours with `palette`), at the map's size unless `width`/`height` say otherwise."""
    from ldmtool.pipelines.semantic2img import Semantic2ImgTask

    task = Semantic2ImgTask(_engine("semantic2img", options), palette=palette, width=width, height=height)
    return _map_canvas(task, label_map, seed)


def layout2img(layout: PathOrDoc, *, width: Optional[int] = None, height: Optional[int] = None,
               seed: Optional[int] = None, **options: Any) -> np.ndarray:
    """`ldmtool layout2img`: an image of a layout of labelled boxes (a .json/.yaml file, or the document as a
    dict or list of objects)."""
    from ldmtool.pipelines.layout2img import Layout2ImgTask

    task = Layout2ImgTask(_engine("layout2img", options), width=width, height=height)
    task.open()
    if isinstance(layout, (str, Path)):
        item = _file_item(layout)
        return _results(task, [(item, _seed(seed), task.load(_job(item, 0, 0)))])[0]
    return _results(task, [(_memory_item("layout"), _seed(seed), task.layout(layout, "layout"))])[0]


# ---------------------------------------------------------------- no image in, a list of images out


def txt2img(prompt: Union[str, Sequence[str], None] = None, *, prompts: Optional[Union[str, Path]] = None,
            negative: Optional[str] = None, n: int = 1, width: Optional[int] = None, height: Optional[int] = None,
            refiner: Optional[Union[str, Path]] = None, refiner_at: Optional[float] = None,
            seed: Optional[int] = None, **options: Any) -> list[np.ndarray]:
    """`ldmtool txt2img`: `n` images per prompt (a text, a list of texts, or `prompts=` a prompt file, JSON
    lines included), in the CLI's order; `refiner` (a file) runs the schedule's last part from `refiner_at`."""
    from ldmtool.pipelines.text import ONE_PROMPT_SOURCE, PromptSpec, read_prompts
    from ldmtool.pipelines.txt2img import Txt2ImgTask, prompt_items

    if prompt is not None and not isinstance(prompt, str):  # a list of texts
        if prompts is not None:
            raise UsageError(ONE_PROMPT_SOURCE)
        specs = [PromptSpec(text) for text in prompt]
    else:
        specs = read_prompts(prompt, prompts)
    with _control(options) as control:
        engine = _engine("txt2img", options)
        task = Txt2ImgTask(engine, specs, negative=negative or "", width=width, height=height,
                           refiner=_refiner(engine, refiner), refiner_at=refiner_at, control=control)
        control.validate()
        return _generated(task, prompt_items(specs, n), seed)


def sample(classes: Union[str, int, Sequence[Union[str, int]], None] = None, *, n: int = 1,
           width: Optional[int] = None, height: Optional[int] = None, seed: Optional[int] = None,
           **options: Any) -> list[np.ndarray]:
    """`ldmtool sample`: `n` images per class (ids or ImageNet names), or `n` from an unconditional model."""
    from ldmtool.pipelines.sample import SampleTask, sample_items

    names = [str(c) for c in as_list(classes)]
    task = SampleTask(_engine("sample", options), classes=names, width=width, height=height)
    return _generated(task, sample_items(names, n), seed)


def tile_synth(label_map: Optional[ImageInput] = None, *, width: int, height: int,
               classes: Union[str, int, Sequence[Union[str, int]], None] = None, prompt: Optional[str] = None,
               negative: Optional[str] = None, palette: Optional[Union[str, Path]] = None, n: int = 1,
               seed: Optional[int] = None, **options: Any) -> list[np.ndarray]:
    """`ldmtool tile-synth`: canvases of `width` x `height` (tileable with `seamless="x"|"y"|"xy"`) from a label
    map, `classes`, a `prompt`, or an unconditional model; `n` per class or prompt (one per label map: `n` is
    refused with it, as `palette` without it and `negative` without `prompt`)."""
    from ldmtool.pipelines.tile_synth import (
        DEFAULT_MODEL_BY_GENERATOR,
        canvas_size,
        check_generator_options,
        choose_generator,
        generated_canvas_items,
        tile_synth_task,
    )

    names = [str(c) for c in as_list(classes)]
    generator = choose_generator(maps=label_map is not None, classes=names, prompt=prompt)
    check_generator_options(generator, samples=n, palette=palette, negative=negative)
    if options.get("model") is None:
        options = {**options, "model": DEFAULT_MODEL_BY_GENERATOR.get(generator.value, DEFAULT_MODELS["tile-synth"])}
    canvas_w, canvas_h = canvas_size(width, height)
    task = tile_synth_task(_engine("tile-synth", options), generator, width=canvas_w, height=canvas_h,
                           classes=names, prompt=prompt, negative=negative or "", palette=palette)
    if label_map is not None:
        return [_map_canvas(task, label_map, seed)]
    return _generated(task, generated_canvas_items(generator, classes=names, prompt=prompt, samples=n), seed)


# ---------------------------------------------------------------- the machinery


def _engine(command: str, options: dict[str, Any]) -> Engine:
    """The command's Engine from its model and sampling options, by their CLI names (`steps`, `cfg`, ...)."""
    model_names = {f.name for f in option_fields(ModelChoice)}
    sampling_names = {f.name for f in option_fields(SamplingChoice)}
    if command not in _SEAMLESS_COMMANDS:
        sampling_names.discard("seamless")
    unknown = sorted(set(options) - model_names - sampling_names)
    if unknown:
        raise TypeError(f"{command.replace('-', '_')}() got an unexpected keyword argument {unknown[0]!r} "
                        f"(model and sampling options: {', '.join(sorted(model_names | sampling_names))})")
    model = {name: value for name, value in options.items() if name in model_names}
    model["model"] = model.get("model") or DEFAULT_MODELS[command]
    sampling = {name: value for name, value in options.items() if name in sampling_names}
    return Engine(ModelChoice(**model), SamplingChoice(**sampling))


@contextlib.contextmanager
def _control(options: dict[str, Any]) -> Iterator[Any]:
    """The ControlRun of the call's control options, taken out of `options` (hint images given in memory are
    written to a temporary folder that lives as long as the call); the caller validates it with its task."""
    from ldmtool.pipelines.control import ControlRun

    given = {f.name: options.pop(f.name) for f in option_fields(ControlInputs) if f.name in options}
    with tempfile.TemporaryDirectory(prefix="ldmtool-hints-") as folder:
        for name in ("controlnet", "adapter", "control_image"):
            if given.get(name) is not None:
                given[name] = [_hint_file(v, Path(folder), i) if name == "control_image" else str(v)
                               for i, v in enumerate(_values(given[name]))]
        yield ControlRun(ControlInputs(**given))


def _values(value: Any) -> list[Any]:
    """One value or a list of them (a path, text, image or array is one value)."""
    from PIL import Image

    return [value] if isinstance(value, (str, Path, np.ndarray, Image.Image)) else list(value)


def _hint_file(hint: Any, folder: Path, index: int) -> Path:
    """A hint as the CLI takes it: a path as it is, an in-memory image as a PNG file."""
    if isinstance(hint, (str, Path)):
        return Path(hint)
    from PIL import Image

    image = hint if isinstance(hint, Image.Image) else Image.fromarray(np.asarray(hint))
    path = folder / f"hint{index}.png"
    image.save(path)
    return path


def _refiner(engine: Engine, path: Optional[Union[str, Path]]) -> Optional[Engine]:
    """The `refiner=` file's Engine, with the model's device, precision and sampling options (as `--refiner`)."""
    from ldmtool.pipelines.refiner import refiner_engine

    return refiner_engine(engine.choice, engine.sampling, path)


def _one(task: ModelTask, payload: Any, seed: Optional[int], depth: int) -> np.ndarray:
    """Run one in-memory item with exactly `seed` (a random one when None)."""
    task.open()
    return _results(task, [(_memory_item("image"), _seed(seed), payload)], depth)[0]


def _map_canvas(task: Any, label_map: ImageInput, seed: Optional[int]) -> np.ndarray:
    """One item of a label-map generator (semantic2img, tile-synth): a file read as the CLI reads it, else the
    image or array converted with the same rules."""
    from PIL import Image

    from ldmtool.pipelines.semantic2img import labels_of

    task.open()
    if isinstance(label_map, (str, Path)):
        item = _file_item(label_map)
        return _results(task, [(item, _seed(seed), task.load(_job(item, 0, 0)))])[0]
    if not isinstance(label_map, (Image.Image, np.ndarray)):
        raise UsageError(f"label map: give a file, a Pillow image or an array, not {type(label_map).__name__}")
    labels = labels_of(label_map, task.n_classes, task.palette, "label map")
    return _results(task, [(_memory_item("label-map"), _seed(seed), labels)])[0]


def _generated(task: ModelTask, items: Sequence[Item], seed: Optional[int]) -> list[np.ndarray]:
    """Items that are generated (prompts, samples, classes): seeded as the CLI's `--seed` seeds them."""
    task.open()
    base = _seed(seed)
    planned = []
    for index, item in enumerate(items):
        own = item_seed(base, key=item.key, offset=item.seed_offset, own=item.seed)
        planned.append((item, own, task.load(_job(item, index, own))))
    return _results(task, planned)


def _results(task: ModelTask, planned: list[tuple[Item, int, Any]], depth: int = DEPTH_8) -> list[np.ndarray]:
    """Run each (item, seed, payload) alone through the task, as the CLI's default batch size does; an item that
    fails raises its error."""
    arrays = []
    for index, (item, seed, payload) in enumerate(planned):
        job = _job(item, index, seed)
        job.payload = payload
        (result,) = task.run([job])
        if isinstance(result, Exception):
            raise result
        arrays.append(result_array(result, depth))
    return arrays


def _job(item: Item, index: int, seed: int) -> Job:
    return Job(item=item, index=index, seed=seed, output=Path(f"{item.stem}.png"))


def _file_item(path: Union[str, Path]) -> Item:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    return Item(key=path.name, stem=path.stem, path=path)


def _memory_item(label: str) -> Item:
    return Item.generated(label)


def _seed(seed: Optional[int]) -> int:
    return random_seed() if seed is None else seed
