"""CLIP's text transformer: OpenAI CLIP-L (SD 1.x, SDXL, SD3, FLUX.1) and OpenCLIP bigG in transformers' layout
(SD3's files), with transformers' module and parameter names, so `text_model.*` keys load unchanged and LoRA
layer names (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`) find their layers.

Written here rather than taken from transformers because importing transformers' model code costs 2–4 s of a
command's start-up (it pulls in torch.distributed and sympy), more than encoding a prompt. The computation is
CLIP's: token + position embeddings, pre-norm layers of causal self-attention and an MLP (quick GELU for OpenAI's
towers, GELU for OpenCLIP's), a final layer norm, and the pooled output read at the end token.
`tests/test_clip_model.py` holds it against `transformers.CLIPTextModel` with the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ClipTextConfig:
    """transformers' `CLIPTextConfig` fields that the text tower uses (same names and defaults: CLIP-L)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407  # 2 in SD 1.x's (legacy) config: then the pooled output is at the highest id
    pad_token_id: int = 49407


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class ClipTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, T, width), after the final layer norm
    pooler_output: torch.Tensor  # (B, width): the last hidden state at the end token
    hidden_states: tuple[torch.Tensor, ...]  # the embeddings, then each layer's output (before the final norm)


class ClipAttention(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        width = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, width))


class ClipMLP(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP text activation {config.hidden_act!r}: expected one of {sorted(ACTIVATIONS)}")
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.self_attn = ClipAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([ClipEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class ClipTextEmbeddings(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length, positions = input_ids.shape[-1], self.position_embedding.weight
        if length > positions.shape[0]:
            raise ValueError(f"{length} tokens: this CLIP text encoder takes at most {positions.shape[0]}")
        return self.token_embedding(input_ids) + positions[:length]


class ClipTextTransformer(nn.Module):
    """transformers' `CLIPTextModel` (version 5, which has no `text_model` level of its own)."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = ClipTextEmbeddings(config)
        self.encoder = ClipEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> ClipTextOutput:
        x = self.embeddings(input_ids)
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            hidden_states.append(x)
        last = self.final_layer_norm(x)
        pooled = last[torch.arange(len(last), device=last.device), self._end_positions(input_ids)]
        return ClipTextOutput(last, pooled, tuple(hidden_states))

    def _end_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where each row's end token is: the first `eos_token_id`, or, with SD 1.x's legacy id 2, the highest id
        (the end token is the vocabulary's last), as transformers reads it."""
        ids = input_ids.to(torch.int)
        if self.config.eos_token_id == 2:
            return ids.argmax(dim=-1)
        return (ids == self.config.eos_token_id).int().argmax(dim=-1)


class ClipTextModelWithProjection(nn.Module):
    """transformers' `CLIPTextModelWithProjection`: the tower and its bias-free `text_projection`."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.config = config
        self.text_model = ClipTextTransformer(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
