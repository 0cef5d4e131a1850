"""The OpenCLIP text tower of SD 2.x (`FrozenOpenCLIPEmbedder`, ViT-H-14 text: width 1024, 24 layers,
16 heads), laid out as open_clip's `CLIP` without `visual` so keys `cond_stage_model.model.*` load
unchanged. SD 2.x uses layer 'penultimate': the last residual block is skipped, then `ln_final`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LAYERS = ("last", "penultimate")


@dataclass(frozen=True)
class TextTower:
    width: int
    layers: int
    heads: int
    embed_dim: int  # text_projection output size


ARCHS = {
    "ViT-H-14": TextTower(width=1024, layers=24, heads=16, embed_dim=1024),
    "ViT-L-14": TextTower(width=768, layers=12, heads=12, embed_dim=768),
    "ViT-bigG-14": TextTower(width=1280, layers=32, heads=20, embed_dim=1280),
}


class MultiheadSelfAttention(nn.Module):
    """Parameters named as `nn.MultiheadAttention` (in_proj_weight/bias, out_proj); causal attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, h, n, d)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])


class OpenCLIPText(nn.Module):
    """open_clip `CLIP` minus `visual`: the state-dict names of SD 2.x's `cond_stage_model.model`."""

    def __init__(self, tower: TextTower, vocab_size: int = 49408, context_length: int = 77):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, tower.width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, tower.width))
        self.transformer = Transformer(tower.width, tower.layers, tower.heads)
        self.ln_final = nn.LayerNorm(tower.width)
        self.text_projection = nn.Parameter(torch.zeros(tower.width, tower.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))


class FrozenOpenCLIPEmbedder(nn.Module):
    """`ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder` (same parameters; weights come from the
    checkpoint, never from a hub). `width`/`layers`/`heads`/`embed_dim` override `arch` for small models."""

    def __init__(
        self, arch: str = "ViT-H-14", version: str = "laion2b_s32b_b79k", device: object = None,
        max_length: int = 77, freeze: bool = True, layer: str = "last", *, width: int | None = None,
        layers: int | None = None, heads: int | None = None, embed_dim: int | None = None,
        vocab_size: int = 49408,
    ):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"FrozenOpenCLIPEmbedder layer must be one of {LAYERS}, not {layer!r}")
        if arch not in ARCHS:
            raise ValueError(f"unknown OpenCLIP arch {arch!r} (known: {', '.join(ARCHS)})")
        base = ARCHS[arch]
        tower = TextTower(width or base.width, layers or base.layers, heads or base.heads,
                          embed_dim or (width or base.embed_dim))
        self.model = OpenCLIPText(tower, vocab_size, max_length)
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = 0 if layer == "last" else 1
        if freeze:
            self.requires_grad_(False)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """open_clip ids: <start> text <end>, truncated to 77 (ending in <end>) and padded with 0."""
        from ldmtool.nets.tokenizers import clip_ids

        return torch.tensor(clip_ids(list(texts), pad_with_zero=True, length=self.max_length))

    @property
    def token_embedding(self) -> nn.Embedding:
        """The token-id -> vector table (textual-inversion vectors replace its output rows)."""
        return self.model.token_embedding

    def encode_tokens(self, tokens: torch.Tensor, clip_skip: Optional[int] = None) -> torch.Tensor:
        """The context of token ids. `clip_skip` N (A1111's meaning) stops N - 1 blocks before the last, then
        `ln_final`: N=2 is SD 2.x's own "penultimate"; None keeps the configured layer."""
        m = self.model
        x = m.token_embedding(tokens.to(m.token_embedding.weight.device)) + m.positional_embedding
        blocks = m.transformer.resblocks
        skipped = self.layer_idx if clip_skip is None else clip_skip - 1
        for block in list(blocks)[: len(blocks) - skipped]:
            x = block(x)
        return m.ln_final(x)  # (B, 77, width)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Cross-attention context (B, 77, width) for a list of prompts."""
        return self.encode_tokens(self.tokenize(texts))

    forward = encode


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """`sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2` (SDXL's ViT-bigG/14 text): with `legacy: false`
    the chosen layer's hidden states are returned without `ln_final`, and with `always_return_pooled` also
    the pooled vector: the last layer through `ln_final`, at the end token, times `text_projection`."""

    def __init__(self, arch: str = "ViT-H-14", version: str = "laion2b_s32b_b79k", device: object = None,
                 max_length: int = 77, freeze: bool = True, layer: str = "last", always_return_pooled: bool = False,
                 legacy: bool = True, **sizes: int):
        super().__init__(arch, version, device, max_length, freeze, layer, **sizes)
        if always_return_pooled and legacy:
            raise ValueError("FrozenOpenCLIPEmbedder2: always_return_pooled needs legacy: false")
        self.return_pooled = always_return_pooled
        self.legacy = legacy

    def encode_tokens(self, tokens: torch.Tensor,  # type: ignore[override]
                      clip_skip: Optional[int] = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, 77, width) hidden states of the chosen layer, and with `return_pooled` (B, embed_dim). `clip_skip`
        N takes the N-th hidden state from the end (N=2: the penultimate, SDXL's own layer), as ComfyUI's
        CLIPSetLastLayer(-N); the pooled vector always comes from the last layer."""
        if self.legacy:
            return super().encode_tokens(tokens, clip_skip)
        m = self.model
        tokens = tokens.to(m.token_embedding.weight.device)
        x = m.token_embedding(tokens) + m.positional_embedding
        blocks = list(m.transformer.resblocks)
        depth = len(blocks) - (self.layer_idx if clip_skip is None else clip_skip - 1)  # blocks before `hidden`
        if not 0 <= depth <= len(blocks):
            raise ValueError(f"clip skip {clip_skip}: the text encoder has {len(blocks)} layers")
        hidden = x
        for index, block in enumerate(blocks[: len(blocks) if self.return_pooled else depth]):
            x = block(x)
            if index + 1 == depth:
                hidden = x
        if not self.return_pooled:
            return hidden
        last = m.ln_final(x)
        pooled = last[torch.arange(last.shape[0]), tokens.argmax(dim=-1)] @ m.text_projection
        return hidden, pooled
