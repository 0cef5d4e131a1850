"""Text conditioning of SD3 / SD3.5 and FLUX.1 from their CLIP and T5 encoders, as the references build it.

SD3 (`StableDiffusion3Pipeline.encode_prompt`, Stability's sd3_infer): the penultimate hidden states of CLIP-L
and bigG side by side (77 tokens, 768 + 1280 wide), zero-padded to T5's width, followed on the sequence by the
T5 tokens (256 by default); pooled = CLIP-L pooled ++ bigG pooled (projected), 2048 wide. With guidance, the
negative prompt (default "") is encoded the same way. Without a T5 encoder, diffusers puts 256 zero tokens of
the transformer's context width where T5's would be (`MissingT5.ZEROS`, the default); ComfyUI leaves them out
and the context is the 77 CLIP tokens alone (`MissingT5.DROP`). The Stability reference always has T5.

FLUX.1 (`FluxPipeline.encode_prompt`, BFL's `HFEmbedder`): T5's hidden states (512 tokens for dev, 256 for
schnell, as the T5 encoder's padding says) are the text tokens, CLIP-L's unprojected pooled output the vector
`y`, and the text position ids are zeros.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, TypeVar

import torch
import torch.nn.functional as F

from ldmtool.errors import CheckpointError, UsageError
from ldmtool.nets.clip_text import (
    BARE,
    CLIP_G_WIDTH,
    CLIP_KINDS,
    CLIP_L_WIDTH,
    ENCODER_NAMES,
    ClipKind,
    ClipTextEncoder,
    clip_prefix,
    clip_width,
    open_clip_encoder,
    text_encoders_in,
)
from ldmtool.nets.t5 import SD3_PADDING, T5Padding, T5TextEncoder, open_t5_encoder, t5_folder_state

SD3_CONTEXT_WIDTH = 4096  # MMDiT's joint_attention_dim / context_embedder input, T5 XXL's width


class MissingT5(enum.Enum):
    """What an SD3 context holds where T5's tokens would be when there is no T5 encoder."""

    ZEROS = "zeros"  # diffusers: `t5_length` zero tokens
    DROP = "drop"  # ComfyUI: no tokens; the context is the padded CLIP tokens alone


@dataclass
class TextEncoders:
    """The text encoders a model runs with; None where absent (a family says which it needs)."""

    clip_l: Optional[ClipTextEncoder] = None
    clip_g: Optional[ClipTextEncoder] = None
    t5: Optional[T5TextEncoder] = None

    def need_clip(self, kind: ClipKind, family: str) -> ClipTextEncoder:
        """The CLIP tower of `kind`, or a UsageError that says how to give it."""
        return _present(self.clip_l if kind == "clip_l" else self.clip_g, kind, family)

    def need_t5(self, family: str) -> T5TextEncoder:
        return _present(self.t5, "t5xxl", family)


E = TypeVar("E")


def _present(encoder: Optional[E], kind: str, family: str) -> E:
    if encoder is None:
        raise UsageError(f"{family} needs the {ENCODER_NAMES[kind]} text encoder and the model has none: pass "
                         f"--text-encoder FILE (e.g. {kind}.safetensors)")
    return encoder


def open_text_encoders(sources: Sequence[tuple[str, Mapping[str, torch.Tensor]]], *,
                       t5_tokenizer: Optional[Path] = None, t5_padding: T5Padding = SD3_PADDING,
                       dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> TextEncoders:
    """The encoders in `sources`, (name, state dict) pairs: `--text-encoder` files and the model file itself
    (an SD3 single file holds up to three). Each is recognised by its keys (two bare CLIP towers of other widths
    than the released ones: the narrower is CLIP-L); two of one kind are a UsageError, and so is a T5 without
    `t5_tokenizer` (the `tokenizer.json` that `find_t5_tokenizer` found)."""
    found = [(name, kind, part) for name, state in sources
             for kind, part in text_encoders_in(state, source=name).items()]
    states: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    for name, kind, part in _clip_kinds_by_width(found):
        if kind in states:
            raise UsageError(f"{name}: a second {ENCODER_NAMES[kind]} text encoder (the first is in "
                             f"{states[kind][0]}); give each kind once")
        states[kind] = (name, part)
    encoders = TextEncoders()
    for kind in CLIP_KINDS:
        if kind in states:
            name, part = states[kind]
            setattr(encoders, kind, open_clip_encoder(part, kind, source=name, dtype=dtype, device=device))
    if "t5xxl" in states:
        name, part = states["t5xxl"]
        if t5_tokenizer is None:
            raise UsageError(f"{name}: its T5 text encoder needs T5's tokenizer: pass --tokenizer DIR (a folder "
                             "with T5's tokenizer.json, such as a diffusers FLUX.1 folder's tokenizer_2/)")
        encoders.t5 = open_t5_encoder(part, t5_tokenizer, t5_padding, source=name, dtype=dtype, device=device)
    return encoders


Found = list[tuple[str, str, dict[str, torch.Tensor]]]


def encoder_kinds(sources: Sequence[tuple[str, Mapping[str, torch.Tensor]]]) -> list[str]:
    """The kind of each encoder in `sources` as `open_text_encoders` takes them (without building any)."""
    found = [(name, kind, part) for name, state in sources for kind, part in text_encoders_in(state, source=name).items()]
    return [kind for _, kind, _ in _clip_kinds_by_width(found)]



def _clip_kinds_by_width(found: Found) -> Found:
    """Two bare CLIP towers that are not the released widths (reduced test files) are told apart by width,
    since CLIP-L is always the narrower; anything else keeps the kind its keys gave."""
    bare = [i for i, (_, kind, part) in enumerate(found) if kind in CLIP_KINDS and clip_prefix(list(part)) in BARE]
    widths = [clip_width(found[i][2]) for i in bare]
    if len(bare) != 2 or widths[0] == widths[1] or {CLIP_L_WIDTH, CLIP_G_WIDTH} & set(widths):
        return found
    relabelled = list(found)
    for i, width in zip(bare, widths):
        name, _, part = found[i]
        relabelled[i] = (name, "clip_l" if width == min(widths) else "clip_g", part)
    return relabelled


def text_encoder_sources(paths: Sequence[Path]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """(name, state dict) of each `--text-encoder` path for `open_text_encoders`: a file (`.safetensors`, or a
    tensors-only `.ckpt`), or a diffusers encoder folder (`text_encoder_2/`: `model.safetensors` or its shards)."""
    from ldmtool.checkpoints.files import read_state_dict  # the layer above nets: imported when reading

    return [(str(path), t5_folder_state(path) if path.is_dir() else read_state_dict(path)) for path in paths]


# --- SD3 / SD3.5 ---------------------------------------------------------------------------------------------


@dataclass
class SD3TextConditioning:
    """What MMDiT takes: `context` (B, 77 + T5 tokens, width) and `pooled` (B, 2048) per prompt, and the same
    for the negative prompts when guidance is on (else None)."""

    context: torch.Tensor
    pooled: torch.Tensor
    negative_context: Optional[torch.Tensor] = None
    negative_pooled: Optional[torch.Tensor] = None


def sd3_text_conditioning(encoders: TextEncoders, prompts: Sequence[str],
                          negative_prompts: Optional[Sequence[str]] = None, *, guidance: bool = True,
                          clip_skip: Optional[int] = None, missing_t5: MissingT5 = MissingT5.ZEROS,
                          t5_length: int = SD3_PADDING.length,
                          context_width: int = SD3_CONTEXT_WIDTH) -> SD3TextConditioning:
    """SD3's conditioning of `prompts` and, with `guidance`, of `negative_prompts` ("" each by default).
    `clip_skip` k (diffusers' meaning: k layers before the penultimate) applies to the prompts only, as in
    diffusers. `t5_length` and `context_width` (the transformer's) shape the zero tokens of a missing T5."""
    context, pooled = _sd3_encode(encoders, prompts, clip_skip, missing_t5, t5_length, context_width)
    if not guidance:
        return SD3TextConditioning(context, pooled)
    negatives = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
    if len(negatives) != len(prompts):
        raise UsageError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one each or none")
    negative_context, negative_pooled = _sd3_encode(encoders, negatives, None, missing_t5, t5_length, context_width)
    return SD3TextConditioning(context, pooled, negative_context, negative_pooled)


def _sd3_encode(encoders: TextEncoders, prompts: Sequence[str], clip_skip: Optional[int], missing_t5: MissingT5,
                t5_length: int, context_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    clip_l, clip_g = encoders.need_clip("clip_l", "SD3"), encoders.need_clip("clip_g", "SD3")
    hidden_l, pooled_l = clip_l(prompts, clip_skip)
    hidden_g, pooled_g = clip_g(prompts, clip_skip)
    clip_tokens = torch.cat([hidden_l, hidden_g.to(hidden_l.dtype)], dim=-1)  # (B, 77, 768 + 1280)
    t5_tokens = _t5_tokens(encoders.t5, prompts, missing_t5, t5_length, context_width, clip_tokens)
    width = t5_tokens.shape[-1]
    if width < clip_tokens.shape[-1]:
        raise CheckpointError(f"SD3 text encoders: the CLIP tokens ({clip_tokens.shape[-1]} wide) are wider than "
                              f"the T5 / transformer context ({width}); the encoders do not belong together")
    context = torch.cat([F.pad(clip_tokens, (0, width - clip_tokens.shape[-1])), t5_tokens.to(clip_tokens.dtype)], dim=-2)
    return context, torch.cat([pooled_l, pooled_g.to(pooled_l.dtype)], dim=-1)


def _t5_tokens(t5: Optional[T5TextEncoder], prompts: Sequence[str], missing_t5: MissingT5, t5_length: int,
               context_width: int, clip_tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, width): T5's hidden states, or what stands for them without T5."""
    if t5 is not None:
        return t5(prompts)
    length = t5_length if missing_t5 is MissingT5.ZEROS else 0
    return clip_tokens.new_zeros(len(prompts), length, context_width)


# --- FLUX.1 ----------------------------------------------------------------------------------------------------


@dataclass
class FluxTextConditioning:
    """What the Flux transformer takes, in BFL's call convention: `txt` (B, L, 4096) T5 hidden states,
    `txt_ids` (B, L, 3) zeros, `y` (B, 768) CLIP-L's pooled output."""

    txt: torch.Tensor
    txt_ids: torch.Tensor
    y: torch.Tensor


def flux_text_conditioning(encoders: TextEncoders, prompts: Sequence[str]) -> FluxTextConditioning:
    """FLUX.1's conditioning of `prompts`; the token count is the T5 encoder's padding (dev 512, schnell 256)."""
    clip_l, t5 = encoders.need_clip("clip_l", "FLUX.1"), encoders.need_t5("FLUX.1")
    _, pooled = clip_l(prompts)
    txt = t5(prompts)
    return FluxTextConditioning(txt, txt.new_zeros(*txt.shape[:2], 3), pooled.to(txt.dtype))
