"""What the text pipelines (txt2img, img2img, inpaint) share: prompt sources, text conditioning computed
once per distinct prompt, and the pixel sizes a model can sample.

Prompt sources (txt2img): `--prompt TEXT`, or `--prompts FILE` with one prompt per line (blank lines and
lines starting with '#' are skipped), or JSON lines (a `.jsonl`/`.ndjson` file, or any file whose first
entry starts with '{') where each line is an object with a `prompt` and optional per-item parameters
(see `PROMPT_FIELDS`; `size`, "WxH" or [w, h], is short for `width` and `height`). A JSON object line in a
plain prompt file is refused (naming file:line) rather than taken as prompt text.

Sizes: a model samples latents whose sides divide by the UNet's total downsampling, so pixel sizes must be
multiples of `engine.info.pixel_multiple` (64 for SD, 32 for the f4 LDM models). txt2img REJECTS other sizes
with a one-line error (a silently different size would surprise scripts); img2img and inpaint pad their
input images up to the multiple (edge replication) and crop the result back, so any input size works.
"""
from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch

from ldmtool.errors import UsageError
from ldmtool.families.info import Conditioning
from ldmtool.io.files import check_unicode_text, read_text_file
from ldmtool.pipelines.prompt_encoding import ConditionerPromptEncoder, PromptEncoder
from ldmtool.runtime.device import one_thread
from ldmtool.runtime.seeds import SEED_LIMIT

if TYPE_CHECKING:
    from ldmtool.addons.base import TextualInversion
    from ldmtool.checkpoints.bundle import LatentDiffusionBundle
    from ldmtool.diffusion.cond import Cond
    from ldmtool.families.info import ModelInfo
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.flow_engine import FlowTexts


@dataclass(frozen=True)
class PromptSpec:
    """One prompt and the per-item parameters a JSON-lines source may set (None: the run's value)."""

    prompt: str
    negative: Optional[str] = None
    seed: Optional[int] = None
    steps: Optional[int] = None
    cfg: Optional[float] = None
    sampler: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    template: Optional[str] = None  # the template `prompt` was expanded from (pipelines/prompt_templates.py)
    negative_template: Optional[str] = None  # the template `negative` was expanded from

    def as_dict(self) -> dict[str, Any]:
        """Every field, less the templates of a line that has none (so plain lines keep their identity)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in _TEMPLATE_FIELDS or getattr(self, f.name) is not None}

    def overrides(self) -> dict[str, Any]:
        """The per-item parameters that were set (recorded in the output's metadata)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "prompt" and getattr(self, f.name) is not None}


PROMPT_FIELDS: dict[str, tuple[type, ...]] = {
    "prompt": (str,), "negative": (str,), "seed": (int,), "steps": (int,), "cfg": (int, float),
    "sampler": (str,), "width": (int,), "height": (int,),
}
_TEMPLATE_FIELDS = ("template", "negative_template")
_POSITIVE = ("seed", "steps", "width", "height")
_SIZE = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")
_JSON_OBJECT = re.compile(r'\{\s*("|\}|$)')  # '{"prompt": ...', '{}': JSON, not '{red|blue} car'
_JSON_SUFFIXES = (".jsonl", ".ndjson")


ONE_PROMPT_SOURCE = "give either --prompt TEXT or --prompts FILE (one prompt per line, or JSON lines)"


def read_prompts(prompt: Optional[str], prompts_file: Optional[Path | str]) -> list[PromptSpec]:
    """The prompts of a run from `--prompt` or `--prompts FILE` (exactly one of them)."""
    if (prompt is None) == (prompts_file is None):
        raise UsageError(ONE_PROMPT_SOURCE)
    if prompt is not None:
        return [PromptSpec(prompt)]
    assert prompts_file is not None  # exactly one of the two, checked above
    try:
        text = read_text_file(prompts_file)
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or err
        raise UsageError(f"{prompts_file}: cannot read the prompt file ({reason})") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.split("\n"), 1)]  # JSON strings may hold U+2028
    lines = [(number, line) for number, line in lines if line and not line.startswith("#")]
    if not lines:
        raise UsageError(f"{prompts_file}: the prompt file has no prompts")
    as_json = Path(prompts_file).suffix.lower() in _JSON_SUFFIXES or lines[0][1].startswith("{")
    if not as_json:
        for number, line in lines:
            if _JSON_OBJECT.match(line):
                raise UsageError(f"{prompts_file}:{number}: a JSON line in a plain prompt file (line {lines[0][0]} "
                                 "is plain text); write every line as JSON, or name the file .jsonl")
        return [PromptSpec(line) for _, line in lines]
    return [_json_prompt(line, f"{prompts_file}:{number}") for number, line in lines]


def _json_prompt(line: str, where: str) -> PromptSpec:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as err:  # also a number of over 4300 digits, or nesting too deep
        why = err.msg if isinstance(err, json.JSONDecodeError) else str(err).split(":")[0].split(";")[0]
        raise UsageError(f"{where}: not a JSON object ({why})") from None
    if not isinstance(record, dict):
        raise UsageError(f"{where}: each line must be a JSON object like {{\"prompt\": \"a red fox\"}}")
    if "size" in record:
        record.update(_json_size(record.pop("size"), record, where))
    unknown = sorted(set(record) - set(PROMPT_FIELDS))
    if unknown:
        raise UsageError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(PROMPT_FIELDS)}, size)")
    if not isinstance(record.get("prompt"), str):
        raise UsageError(f"{where}: every line needs a \"prompt\" string")
    for name in ("prompt", "negative"):
        if isinstance(record.get(name), str):
            check_unicode_text(record[name], f"{where}: {name!r}")  # a JSON \ud800 escape is a lone surrogate
    for name, value in record.items():
        kinds = PROMPT_FIELDS[name]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise UsageError(f"{where}: {name!r} must be a {kinds[0].__name__}, not {value!r}")
        if name == "cfg" and not _finite(value):
            raise UsageError(f"{where}: 'cfg' must be a finite number, not {value!r}")
        if name in _POSITIVE and isinstance(value, int) and value < (0 if name == "seed" else 1):
            raise UsageError(f"{where}: {name!r} must be {'0 or more' if name == 'seed' else 'at least 1'}")
        if name == "seed" and isinstance(value, int) and value >= SEED_LIMIT:  # as --seed: taken modulo 2^32, it would be another seed
            raise UsageError(f"{where}: 'seed' must be at most {SEED_LIMIT - 1}, as --seed")
    return PromptSpec(**record)


def _finite(value: object) -> bool:
    try:
        return isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False
def _json_size(value: Any, record: dict[str, Any], where: str) -> dict[str, Any]:
    """A prompt line's `size` ("WxH" or [w, h]) as its `width` and `height`."""
    if "width" in record or "height" in record:
        raise UsageError(f"{where}: give either 'size' or 'width'/'height', not both")
    if value is None:
        return {}
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is not None:
        return {"width": int(match[1]), "height": int(match[2])}
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(side, int) and not isinstance(side, bool) for side in value)):
        return {"width": value[0], "height": value[1]}
    raise UsageError(f"{where}: 'size' must be \"WxH\" or [width, height], not {value!r}")


# ---------------------------------------------------------------- models


def text_encoder(bundle: "LatentDiffusionBundle") -> Optional[torch.nn.Module]:
    """The bundle's text conditioning stage, or None when it has none."""
    return bundle.cond_stage if bundle.info.takes_text else None


_WITHOUT_VECTOR = {Conditioning.CROSSATTN_ADM: Conditioning.CROSSATTN, Conditioning.HYBRID_ADM: Conditioning.HYBRID}


def text_conditioning(info: "ModelInfo") -> Conditioning:
    """How a model's prompt reaches its network, with the pooled-text-and-size vector `y` of a model with
    micro-conditioning set aside (TextConditioner.cond adds it): what the text pipelines check."""
    if info.micro_conditioning:
        return _WITHOUT_VECTOR.get(info.conditioning, info.conditioning)
    return info.conditioning


def require_text_model(bundle: "LatentDiffusionBundle", path: Path, command: str,
                       kinds: Sequence[Conditioning] = (Conditioning.CROSSATTN,)) -> torch.nn.Module:
    """The text encoder of a model that must take prompts (with one of the conditioning `kinds`), or a
    FatalError naming what the model is."""
    encoder = text_encoder(bundle)
    if encoder is not None and text_conditioning(bundle.info) in (Conditioning.HYBRID, Conditioning.HYBRID_ADM) \
            and Conditioning.CROSSATTN in kinds:  # an inpainting (or depth) model: its text encoder is there
        raise UsageError(f"{path}: a {bundle.info.family} model takes an image (e.g. a masked image and its mask) "
                         f"beside the prompt, so it cannot do {command}; use it with inpaint, or use a text-to-image "
                         "checkpoint")
    if encoder is None or text_conditioning(bundle.info) not in kinds:
        raise UsageError(f"{path}: a {bundle.info.family} model has no text encoder, so it cannot do {command}; "
                         "use a text-to-image checkpoint (SD 1.x/2.x, LDM text2img256 or txt2img-1p4B)")
    return encoder


def check_size(width: int, height: int, multiple: int) -> None:
    """Reject sizes the model cannot sample (UsageError naming the nearest valid size)."""
    for name, value in (("width", width), ("height", height)):
        if value % multiple or value < multiple:
            nearest = max(multiple, round(value / multiple) * multiple)
            raise UsageError(f"--{name} {value}: this model needs a multiple of {multiple} pixels "
                             f"(e.g. {nearest})")


def check_placeable(width: int, height: int, max_side: Optional[int], model: str) -> None:
    """UsageError for a canvas with a side past what the model's network can place however it is tiled
    (`ModelInfo.max_side`: SD3's grid of positions); None: any size."""
    if max_side is not None and max(width, height) > max_side:
        raise UsageError(f"a {width}x{height} canvas: {model} places at most {max_side} pixels a side (its grid of "
                         "positions), tiled or not; make the image smaller")


def padding(height: int, width: int, multiple: int) -> tuple[int, int]:
    """Rows and columns to add so both sides become multiples of `multiple`."""
    return (-height) % multiple, (-width) % multiple


# ---------------------------------------------------------------- text conditioning


class TextConditioner:
    """Cross-attention context per prompt, each distinct text encoded once (not per image or tile).

    Prompts are read in A1111's syntax (`pipelines/prompt_encoding.py`): weights, BREAK, chunks of 77 tokens
    beyond 75, textual-inversion names, with the run's clip skip. Each text is encoded alone and on one
    thread, so its context is the same whatever else is in the batch and however many threads the run has
    (the text encoders' activations are not run in the fixed pieces of `nets._layers.pointwise`). Contexts
    are kept for the `keep` most recently used texts (an SD context is ~230 kB a chunk, so a run over a
    100k-line prompt file must not keep them all); items of one prompt run together, so this is enough to
    encode every prompt once in a normal run.

    A model with micro-conditioning (`info.micro_conditioning`) also gets its vector `y` from `cond`: the
    pooled prompt (kept beside the context) and the image's size. Its prompts go through each of its text
    towers in the same syntax (`ConditionerPromptEncoder`).
    """

    def __init__(self, encoder: torch.nn.Module, keep: int = 512, *, info: Optional["ModelInfo"] = None,
                 clip_skip: Optional[int] = None, embeddings: Sequence["TextualInversion"] = ()):
        self.encoder: Any = encoder  # a cond stage: `encode(texts)`, and `text_embedders`/`vector` with micro-conditioning
        self.info = info
        self.micro = info is not None and bool(info.micro_conditioning)
        self.prompt_encoder: PromptEncoder | ConditionerPromptEncoder = (
            ConditionerPromptEncoder(encoder, clip_skip=clip_skip, embeddings=embeddings) if self.micro
            else PromptEncoder(encoder, clip_skip=clip_skip, embeddings=embeddings))
        self.keep = keep
        self._contexts: OrderedDict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = OrderedDict()
        self.encoded = 0  # how many texts went through the encoder (tests check the caching)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, T, D) context for `texts`, on the CPU in float32 (each padded to the longest with empty chunks)."""
        contexts = self.contexts(texts)
        return torch.stack(self._padded(contexts, max(len(c) for c in contexts)))

    def pair(self, prompts: Sequence[str], negatives: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) contexts for guidance, padded to one length with empty chunks, as A1111 pads the
        shorter of a prompt and its negative."""
        cond, uncond = self.contexts(prompts), self.contexts(negatives)
        length = max(len(c) for c in [*cond, *uncond])
        return torch.stack(self._padded(cond, length)), torch.stack(self._padded(uncond, length))

    def conds(self, engine: "Engine", prompts: Sequence[str], negatives: Sequence[str],
              image_hw: tuple[int, int]) -> tuple["Cond", "Cond"]:
        """(cond, uncond) for guidance on the engine's device, for images of `image_hw` pixels: the contexts
        (padded to one length), and the vector `y` where the model takes one."""
        if self.micro:
            length = max(len(c) for c in self.contexts([*prompts, *negatives]))  # A1111 pads the shorter one
            return (self.cond(engine, prompts, image_hw, length=length),
                    self.cond(engine, negatives, image_hw, negative=True, length=length))
        from ldmtool.diffusion.cond import Cond

        cond, uncond = self.pair(prompts, negatives)
        return Cond(crossattn=cond.to(engine.device, engine.dtype)), Cond(crossattn=uncond.to(engine.device, engine.dtype))

    def cond(self, engine: "Engine", texts: Sequence[str], image_hw: tuple[int, int], *,
             negative: bool = False, length: Optional[int] = None) -> "Cond":
        """Conditioning for `texts` (prompts, or with `negative` the negative prompts) on the engine's device,
        for images of `image_hw` pixels: the context (padded with empty chunks to `length` tokens, by default
        the longest), and the vector `y` where the model takes one."""
        from ldmtool.diffusion.cond import Cond

        info = self.info
        if info is None or not self.micro:
            return Cond(crossattn=self(texts).to(engine.device, engine.dtype))
        encoded = self._encoded(texts)
        contexts = [c for c, _ in encoded]
        context = torch.stack(self._padded(contexts, length or max(len(c) for c in contexts)))
        vectors = [p for _, p in encoded if p is not None]
        pooled = torch.stack(vectors) if len(vectors) == len(encoded) else None
        if negative and info.zero_empty_negative:
            empty = torch.tensor([not text for text in texts])
            context = torch.where(empty[:, None, None], 0.0, context)
            pooled = None if pooled is None else torch.where(empty[:, None], 0.0, pooled)
        y = self.encoder.vector(pooled, micro_conditioning(info, image_hw, negative=negative))
        return Cond(crossattn=context.to(engine.device, engine.dtype), y=y.to(engine.device, engine.dtype))

    def ti_hashes(self, *texts: str) -> Optional[str]:
        """`name: hash, ...` of the embeddings `texts` use, as A1111 writes `TI hashes` (None for none)."""
        used: dict[str, Any] = {}
        for text in texts:
            used.update(self.prompt_encoder.embeddings_in(text))
        return ", ".join(f"{name}: {e.sha256[:12]}" for name, e in used.items()) or None

    def chunk_count(self, *texts: str) -> int:
        """How many 77-token chunks the longest of `texts` takes (items that differ cannot share a batch)."""
        return max(len(self.contexts([text])[0]) for text in texts) // CLIP_CHUNK

    def contexts(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """(T, D) context of each text, encoding those not kept yet."""
        return [context for context, _ in self._encoded(texts)]

    def _encoded(self, texts: Sequence[str]) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(context, pooled or None) of each text, encoding those not kept yet."""
        found = {t: self._contexts[t] for t in dict.fromkeys(texts) if t in self._contexts}
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            with torch.inference_mode(), one_thread():  # once per prompt, so a single thread costs little
                found.update((text, self._encode(text)) for text in missing)
            self.encoded += len(missing)
        for text, context in found.items():
            self._contexts[text] = context
            self._contexts.move_to_end(text)
        while len(self._contexts) > self.keep:
            self._contexts.popitem(last=False)
        return [found[t] for t in texts]

    def _encode(self, text: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(self.prompt_encoder, PromptEncoder):
            return self.prompt_encoder(text), None
        return self.prompt_encoder.encode(text)

    def _padded(self, contexts: list[torch.Tensor], length: int) -> list[torch.Tensor]:
        if all(len(c) == length for c in contexts):
            return contexts
        empty = self.contexts([""])[0]
        return [torch.cat([c, *[empty] * ((length - len(c)) // len(empty))]) for c in contexts]


CLIP_CHUNK = 77


def text_conditioner(engine: "Engine", encoder: torch.nn.Module) -> TextConditioner:
    """The run's text conditioner: the model's text encoder with `--clip-skip` and `--embeddings-dir`."""
    from ldmtool.addons.embeddings import load_embeddings
    from ldmtool.pipelines.prompt_encoding import tower_layers

    choice, info = engine.choice, engine.info
    towers = list(getattr(encoder, "text_embedders", [encoder]))
    if choice.clip_skip is not None and not all(hasattr(tower, "token_embedding") for tower in towers):
        raise UsageError(f"--clip-skip {choice.clip_skip}: a {info.family} model has no CLIP text encoder")
    if choice.clip_skip is not None and choice.clip_skip > min(tower_layers(tower) for tower in towers):
        raise UsageError(f"--clip-skip {choice.clip_skip}: the {info.family} model's text encoder has "
                         f"{min(tower_layers(tower) for tower in towers)} layers")
    embeddings = load_embeddings(choice.embeddings_dir) if choice.embeddings_dir is not None else ()
    return TextConditioner(encoder, info=info, clip_skip=choice.clip_skip, embeddings=embeddings)


def micro_conditioning(info: "ModelInfo", image_hw: tuple[int, int], *, negative: bool = False) -> dict[str, Any]:
    """SDXL's size inputs for an image of `image_hw` pixels generated whole: its original and target size
    are its own, uncropped (as the reference and diffusers sample by default); the aesthetic score is the
    model's for the prompt or the negative prompt. The tiled engine shares them across tiles (the canvas's)."""
    values: dict[str, Any] = {"original_size_as_tuple": image_hw, "crop_coords_top_left": (0, 0),
                              "target_size_as_tuple": image_hw}
    if info.aesthetic_scores is not None:
        values["aesthetic_score"] = info.aesthetic_scores[1 if negative else 0]
    return {key: values[key] for key in info.micro_conditioning}


# ---------------------------------------------------------------- images in and out


def padded_images(rgbs: Sequence[np.ndarray], multiple: int) -> torch.Tensor:
    """Same-size (H, W, 3) arrays in [0, 1] → (B, 3, H', W') in [-1, 1], edges replicated up to the multiple."""
    import torch.nn.functional as F

    from ldmtool.pipelines.arrays import to_model_range

    batch = torch.cat([to_model_range(rgb) for rgb in rgbs])
    pad_h, pad_w = padding(batch.shape[-2], batch.shape[-1], multiple)
    return F.pad(batch, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else batch


class PromptConditioning:
    """Conditioning for img2img and masked inpainting: a text model's prompt and negative (guided), or
    nothing for an unconditional model. Other model kinds cannot take these commands (UsageError)."""

    def __init__(self, engine: "Engine", command: str, *, prompt: str = "", negative: str = "", concat: bool = False):
        self.prompt, self.negative = prompt, negative
        info, path = engine.info, engine.model_path
        if engine.flow is not None:  # a flow-matching model's text encoders come with its flow side
            self.texts: Optional[TextConditioner | FlowTexts] = engine.flow.texts(engine, concat=concat)
            return
        if info.conditioning is Conditioning.NONE:
            if prompt or negative:
                raise UsageError(f"{path}: a {info.family} model is unconditional and takes no prompt; "
                                 "drop --prompt/--negative")
            self.texts = None
            return
        encoder = text_encoder(engine.bundle)
        if encoder is None or text_conditioning(info) is not Conditioning.CROSSATTN:
            raise UsageError(f"{path}: a {info.family} model cannot do {command} (it needs a text-to-image "
                             "or unconditional model)")
        self.texts = text_conditioner(engine, encoder)

    def __call__(self, engine: "Engine", count: int, image_hw: tuple[int, int],
                 prompt: Optional[tuple[str, str]] = None) -> tuple["Cond", Optional["Cond"]]:
        """(cond, uncond) for a batch of `count` items of `image_hw` pixels on the engine's device, with the
        task's prompt and negative or the given (prompt, negative) pair."""
        from ldmtool.diffusion.cond import Cond

        if self.texts is None:
            return Cond(), None
        positive, negative = prompt or (self.prompt, self.negative)
        return self.texts.conds(engine, [positive] * count, [negative] * count, image_hw)
