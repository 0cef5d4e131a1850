"""The CLIP text towers of SD3 / SD3.5 and FLUX.1 in transformers' layout, and which text encoder a file holds.

SD3 single files hold them under `text_encoders.clip_l.transformer.` and `text_encoders.clip_g.transformer.`;
the standalone `clip_l.safetensors` / `clip_g.safetensors` (ComfyUI's, Stability's `text_encoders/` folder) hold
the same names bare: `text_model.*` and `text_projection.weight`, as `transformers.CLIPTextModelWithProjection`
names them (and `nets.clip_model.ClipTextModelWithProjection`, which computes them here). The config comes from
the shapes (vocabulary, width, depth, MLP width, positions, projection); what no shape records is fixed as the
released towers fix it: 64-wide heads, and per kind the activation (OpenAI CLIP-L: quick GELU; OpenCLIP bigG:
GELU) and the pad token of its tokenizer (CLIP-L pads with `<|endoftext|>`, bigG with `!`, id 0).

Which tower a bare file holds is read from its width: 768 is CLIP-L, 1280 bigG; reduced widths (test files) below
1024 are taken as CLIP-L, the others as bigG, unless the caller names the kind (an SD3 file's prefix does;
`nets.text3.open_text_encoders` takes the narrower of two such towers as CLIP-L).
Both the SD3 reference code and diffusers take CLIP-L's pooled output *unprojected* (the reference asks for no
projection; diffusers loads an identity `text_projection` from single files, which often lack it), and bigG's
projected; `ClipTextEncoder` does the same whatever projection a CLIP-L file carries.
"""
from __future__ import annotations

import re
from typing import Callable, Literal, Mapping, Optional, Sequence

import torch

from ldmtool.errors import CheckpointError, UsageError
from ldmtool.nets.clip_model import ClipTextConfig, ClipTextModelWithProjection
from ldmtool.nets.meta import meta_device
from ldmtool.nets.t5 import t5_prefix

ClipKind = Literal["clip_l", "clip_g"]
CLIP_KINDS: tuple[ClipKind, ...] = ("clip_l", "clip_g")
ENCODER_NAMES = {"clip_l": "CLIP-L", "clip_g": "OpenCLIP bigG", "t5xxl": "T5 XXL"}
SD3_CLIP_PREFIXES: dict[ClipKind, str] = {"clip_l": "text_encoders.clip_l.transformer.",
                                          "clip_g": "text_encoders.clip_g.transformer."}
CLIP_L_WIDTH, CLIP_G_WIDTH = 768, 1280
HEAD_WIDTH = 64  # both released towers: 768 / 12 heads, 1280 / 20 heads
_ACTIVATIONS: dict[ClipKind, str] = {"clip_l": "quick_gelu", "clip_g": "gelu"}
_EMBED = "text_model.embeddings.token_embedding.weight"
_POSITIONS = "text_model.embeddings.position_embedding.weight"
_FINAL_NORM = "text_model.final_layer_norm.weight"
_FC1 = "text_model.encoder.layers.0.mlp.fc1.weight"
_PROJECTION = "text_projection.weight"
_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")
_UNUSED = ("text_model.embeddings.position_ids", "logit_scale")  # buffers some exports keep; nothing reads them


BARE = ("", "transformer.")  # prefixes that do not say which tower it is


def clip_prefix(keys: Sequence[str]) -> Optional[str]:
    """The prefix under which a state dict holds a CLIP tower in transformers' layout, or None."""
    for prefix in (*BARE, *SD3_CLIP_PREFIXES.values()):
        if prefix + _FINAL_NORM in keys and prefix + _EMBED in keys:
            return prefix
    return None


def text_encoder_kind(shapes: Mapping[str, Sequence[int]]) -> Optional[str]:
    """'clip_l', 'clip_g' or 't5xxl' for a state dict (or its key -> shape map) that holds one text encoder
    (bare or under an SD3 prefix), else None."""
    keys = list(shapes)
    if t5_prefix(keys) is not None:
        return "t5xxl"
    if clip_prefix(keys) is None:
        return None
    return _clip_kind(keys, lambda key: shapes[key][-1])


def clip_width(state: Mapping[str, torch.Tensor]) -> int:
    """The width of the CLIP tower a state dict holds."""
    return int(state[f"{clip_prefix(list(state))}{_EMBED}"].shape[-1])


def text_encoders_in(state: Mapping[str, torch.Tensor], *, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Each text encoder a file holds, by kind ('clip_l', 'clip_g', 't5xxl'), keys as stored: the ones of an SD3
    single file (under `text_encoders.<kind>.`), or the one of a standalone encoder file. CheckpointError if
    there is none."""
    from ldmtool.nets.sd3_files import TEXT_ENCODER_PREFIXES  # nets.sd3_files imports the MMDiT

    found = {kind: {k: v for k, v in state.items() if k.startswith(prefix)}
             for kind, prefix in TEXT_ENCODER_PREFIXES.items()}
    if any(found.values()):
        return {kind: part for kind, part in found.items() if part}
    kind = text_encoder_kind({k: tuple(v.shape) for k, v in state.items()})
    if kind is None:
        raise CheckpointError(f"{source}: holds no text encoder (neither CLIP-L nor OpenCLIP bigG in "
                              "transformers' layout, nor T5)")
    return {kind: dict(state)}


def clip_weights(state: Mapping[str, torch.Tensor], *, source: str = "text encoder") -> dict[str, torch.Tensor]:
    """The CLIP tower's tensors under transformers' names (prefix and unused buffers removed)."""
    prefix = clip_prefix(list(state))
    if prefix is None:
        raise CheckpointError(f"{source}: holds no CLIP text encoder (no {_EMBED} and {_FINAL_NORM} keys)")
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    for key in _UNUSED:
        weights.pop(key, None)
    for key in (_POSITIONS, _FC1):
        if key not in weights:
            raise CheckpointError(f"{source}: an incomplete CLIP text encoder ({key} is missing)")
    return weights


def clip_config(weights: Mapping[str, torch.Tensor], kind: ClipKind) -> ClipTextConfig:
    """The config these weights (as `clip_weights` gives them) were made with."""
    vocab, width = weights[_EMBED].shape
    depth = 1 + max(int(m.group(1)) for m in map(_LAYER.match, weights) if m)
    projection = weights[_PROJECTION].shape[0] if _PROJECTION in weights else width
    return ClipTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=weights[_FC1].shape[0], projection_dim=projection,
        num_hidden_layers=depth, num_attention_heads=max(1, width // HEAD_WIDTH),
        max_position_embeddings=weights[_POSITIONS].shape[0], hidden_act=_ACTIVATIONS[kind], layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407 if kind == "clip_l" else 0,
    )


def load_clip(state: Mapping[str, torch.Tensor], kind: Optional[ClipKind] = None, *, source: str = "text encoder",
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> ClipTextModelWithProjection:
    """A ClipTextModelWithProjection built from the shapes of `state` (bare, `transformer.` or SD3-prefixed keys)
    and loaded strictly, every tensor in `dtype` (fp16 / bf16 / fp8 storage upcast), eval mode, no gradients.
    `kind` defaults to what `text_encoder_kind` reads from the keys. A tower without `text_projection` (CLIP-L
    in SD3 files) gets an identity one, as diffusers gives it."""
    from ldmtool.checkpoints.weights import check_state_dict  # the layer above nets: imported when loading

    weights = clip_weights(state, source=source)
    kind = kind or _kind_of(state)
    with meta_device():
        model = ClipTextModelWithProjection(clip_config(weights, kind))
    model_state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in model_state.items()}
    check_state_dict(expected, weights, source=source, family=f"{ENCODER_NAMES[kind]} text encoder",
                     optional=[_PROJECTION], floating=[k for k, v in model_state.items() if v.is_floating_point()])
    converted = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
    converted.setdefault(_PROJECTION, torch.eye(*expected[_PROJECTION], device=device, dtype=dtype))
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval().requires_grad_(False)


class ClipTextEncoder:
    """Prompts -> (hidden states (B, 77, width) of the penultimate layer, pooled (B, width)), as the SD3 and Flux
    references read a CLIP tower: no final layer norm on the hidden states; CLIP-L's pooled output unprojected,
    bigG's projected."""

    def __init__(self, model: ClipTextModelWithProjection, kind: ClipKind):
        self.model, self.kind = model, kind

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """<start> prompt <end>, cut to 77 tokens and padded (CLIP-L with <end>, bigG with id 0)."""
        from ldmtool.nets.tokenizers import clip_ids

        return torch.tensor(clip_ids(list(prompts), pad_with_zero=self.kind == "clip_g"))

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], clip_skip: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`clip_skip` k (diffusers' meaning) takes the hidden states k layers before the penultimate."""
        layers = self.model.config.num_hidden_layers
        if clip_skip is not None and not 0 <= clip_skip < layers - 1:
            raise UsageError(f"clip skip {clip_skip} (layers before the penultimate): the {ENCODER_NAMES[self.kind]} text "
                             f"encoder has {layers} layers, so it takes 0 to {layers - 2}")
        device = self.model.text_projection.weight.device
        out = self.model.text_model(self.tokenize(prompts).to(device))
        hidden = out.hidden_states[-2 - (clip_skip or 0)]
        pooled = self.model.text_projection(out.pooler_output) if self.kind == "clip_g" else out.pooler_output
        return hidden, pooled

    __call__ = encode


def open_clip_encoder(state: Mapping[str, torch.Tensor], kind: Optional[ClipKind] = None, *,
                      source: str = "text encoder", dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> ClipTextEncoder:
    """A ready `ClipTextEncoder` from a state dict (a `--text-encoder` file's or an SD3 file's); `kind` as for
    `load_clip`."""
    kind = kind or _kind_of(state)
    return ClipTextEncoder(load_clip(state, kind, source=source, dtype=dtype, device=device), kind)


def _kind_of(state: Mapping[str, torch.Tensor]) -> ClipKind:
    return _clip_kind(list(state), lambda key: int(state[key].shape[-1]))


def _clip_kind(keys: Sequence[str], width_of: Callable[[str], int]) -> ClipKind:
    """The kind of the (first) CLIP tower among `keys`: its SD3 prefix says it, else its width does."""
    prefix = clip_prefix(keys)
    for kind, sd3_prefix in SD3_CLIP_PREFIXES.items():
        if prefix == sd3_prefix:
            return kind
    return "clip_l" if width_of(f"{prefix}{_EMBED}") < (CLIP_L_WIDTH + CLIP_G_WIDTH) // 2 else "clip_g"
