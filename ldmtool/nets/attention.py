"""Attention layers of the reference LDM / Stable Diffusion UNet, on `scaled_dot_product_attention`.

Module and parameter names are those of `ldm.modules.attention` (SpatialTransformer, BasicTransformerBlock,
CrossAttention, FeedForward, GEGLU) and of the plain `AttentionBlock` of `openaimodel`, so released
checkpoints load without renaming.

Fusing the q/k/v (or k/v) projections into one matmul was measured on the CPU and gained nothing
(within 1%, cross-attention slightly slower), so the projections stay separate.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmtool.nets._layers import GELU, Conv1d, Conv2d, Linear, add_residual, normalization, pointwise, zero_module


def _heads(t: Tensor, heads: int) -> Tensor:
    """(B, N, H*d) -> (B, H, N, d) as a view."""
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (itself when context is None); reference key names."""

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner_dim, bias=False)
        self.to_k = Linear(context_dim, inner_dim, bias=False)
        self.to_v = Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        source = x if context is None else context
        q, k, v = (_heads(t, self.heads) for t in (self.to_q(x), self.to_k(source), self.to_v(source)))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Gated GELU: one projection to twice the width, the second half gates the first."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled() and value.requires_grad:
            return value * F.gelu(gate)
        # Into the fresh, contiguous GELU output: `value` is a strided half, and a strided result would make
        # the next Linear copy it before its matmul.
        return pointwise(F.gelu, gate).mul_(value)


class FeedForward(nn.Module):
    """The transformer MLP (`net.0` projection in, `net.2` projection out)."""

    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(Linear(dim, inner_dim), GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), Linear(inner_dim, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention (or cross-attention when disabled), cross-attention, gated MLP; pre-LayerNorm."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0,
                 context_dim: Optional[int] = None, gated_ff: bool = True, checkpoint: bool = True,
                 disable_self_attn: bool = False) -> None:
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        x = add_residual(self.attn1(self.norm1(x), context if self.disable_self_attn else None), x)
        x = add_residual(self.attn2(self.norm2(x), context), x)
        return add_residual(self.ff(self.norm3(x)), x)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: norm, project in (1x1 conv or linear), blocks, out."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: Union[int, Sequence[int], None] = None, disable_self_attn: bool = False,
                 use_linear: bool = False, use_checkpoint: bool = True) -> None:
        super().__init__()
        if isinstance(context_dim, Sequence):
            context_dim = context_dim[0]
        inner_dim = n_heads * d_head
        self.in_channels = in_channels
        self.use_linear = use_linear
        self.norm = normalization(in_channels, eps=1e-6)
        self.proj_in = Linear(in_channels, inner_dim) if use_linear else Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim,
                                  disable_self_attn=disable_self_attn)
            for _ in range(depth)
        )
        # The reference builds the linear proj_out as Linear(in_channels, inner_dim); same when they agree.
        proj_out = Linear(inner_dim, in_channels) if use_linear else Conv2d(inner_dim, in_channels, 1)
        self.proj_out = zero_module(proj_out)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        b, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(b, height * width, -1)  # (B, HW, C); a view when channels-last
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.view(b, height, width, -1).permute(0, 3, 1, 2)  # channels-last view
        if not self.use_linear:
            h = self.proj_out(h)
        # In x's memory format: the next layers run fastest on what they were given.
        return add_residual(h.contiguous(memory_format=_memory_format(x)), x)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


class AttentionBlock(nn.Module):
    """The plain self-attention block of the LDM UNet (Conv1d `qkv` and `proj_out`).

    `use_new_attention_order` splits q/k/v before the heads; the legacy order splits heads first.
    `num_head_channels` (when not -1) fixes the head width instead of the head count.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False) -> None:
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            self.num_heads = channels // num_head_channels
        self.new_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        heads, t = self.num_heads, qkv.shape[-1]
        if self.new_order:
            qkv = qkv.view(b, 3, heads, c // heads, t).transpose(0, 1)
        else:
            qkv = qkv.view(b, heads, 3, c // heads, t).permute(2, 0, 1, 3, 4)
        q, k, v = (part.transpose(-1, -2) for part in qkv)  # each (B, H, T, d)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, t)
        return add_residual(self.proj_out(out), x).reshape(b, c, *spatial)
