"""The T5 encoder (v1.1 with gated GELU, as FLUX.1 and SD3 use T5 XXL; v1.0 with ReLU) with transformers' module
and parameter names, so the released `t5xxl_*.safetensors` keys load unchanged, without importing transformers
(2–4 s of a command's start-up).

T5's computation: a token embedding (no positions), pre-norm blocks of self-attention and an MLP, and a final norm.
Its norm is RMS-only (no mean, no bias; the mean square accumulated in float32); its attention is unscaled and
adds a learned bias per head for the bucketed distance between positions, computed once by the first block and
shared by all. In float16, hidden states are clamped below the largest finite value after each sub-layer, as
transformers does. `tests/test_t5.py` holds it against `transformers.T5EncoderModel` with the same weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class T5Config:
    """transformers' `T5Config` fields that the encoder uses (same names; `gated` stands for its
    `feed_forward_proj` "gated-gelu" (True) or "relu" (False))."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    gated: bool = True
    layer_norm_epsilon: float = 1e-6


class T5Output(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, L, d_model), after the final norm


class T5LayerNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_buckets(length: int, num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """(L, L) bucket of each key position's distance from each query position (bidirectional): half the buckets
    per direction; in each, exact distances below a quarter of all buckets, then logarithmic bins up to
    `max_distance`, beyond which distances share the last bucket."""
    positions = torch.arange(length, dtype=torch.long, device=device)
    relative = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = relative.abs()
    far = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)).to(torch.long)
    far = torch.minimum(far, torch.full_like(far, half - 1))
    return (relative > 0).to(torch.long) * half + torch.where(distance < exact, distance, far)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.config = config
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def position_bias(self, length: int) -> torch.Tensor:
        """(1, heads, L, L): the learned bias of each query-key distance (the first block's table)."""
        table = self.relative_attention_bias
        buckets = relative_buckets(length, self.config.relative_attention_num_buckets,
                                   self.config.relative_attention_max_distance, table.weight.device)
        return table(buckets).permute(2, 0, 1)[None]

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.config.num_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """v1.1: GELU (tanh form) of one projection times another."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5DenseActDense(nn.Module):
    """v1.0: ReLU."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.relu(self.wi(x)))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.gated else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def clamp_half(x: torch.Tensor) -> torch.Tensor:
    """In float16, values kept finite (below the largest finite value, by 1000 once any is infinite)."""
    if x.dtype != torch.float16:
        return x
    largest = torch.finfo(x.dtype).max
    limit = largest - 1000 if bool(torch.isinf(x).any()) else largest
    return x.clamp(min=-limit, max=limit)


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)])

    @property
    def self_attention(self) -> T5Attention:
        return cast(T5LayerSelfAttention, self.layer[0]).SelfAttention

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = clamp_half(self.layer[0](x, bias))
        return clamp_half(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([T5Block(config, has_relative_attention_bias=i == 0)
                                    for i in range(config.num_layers)])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    """transformers' `T5EncoderModel`: `shared` (the token table, tied to `encoder.embed_tokens`) and `encoder`."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> T5Output:
        """Hidden states of `input_ids` (B, L); `attention_mask` (B, L, 1 = attend) hides padding from attention."""
        x = self.shared(input_ids)
        first = cast(T5Block, self.encoder.block[0])
        bias = first.self_attention.position_bias(input_ids.shape[-1]).to(x.dtype)
        if attention_mask is not None:  # padding keys get the lowest value: no weight after the softmax
            padding = (1 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
            bias = bias + padding.to(bias.device)
        for block in self.encoder.block:
            x = block(x, bias)
        return T5Output(self.encoder.final_layer_norm(x))
