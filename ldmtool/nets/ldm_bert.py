"""The LDM text encoder `BERTEmbedder`: a pre-norm transformer in the x-transformers layout of the
reference code (`ldm/modules/x_transformer.py`), so checkpoint keys `cond_stage_model.transformer.*` load
unchanged. Used by text2img256 and txt2img-1p4B (with the bundled BERT tokenizer) and by
layout2img-openimages256 (without a tokenizer: the pipeline hands it token ids for box layouts).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

DIM_HEAD = 64  # x-transformers' DEFAULT_DIM_HEAD


class SelfAttention(nn.Module):
    """x-transformers `Attention` without the options LDM leaves off: bias-free q/k/v, biased output."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = DIM_HEAD):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, n, d); no mask: pads are attended, as upstream
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        # net.0 = (Linear, GELU), net.1 = Dropout, net.2 = Linear: indices are checkpoint key names.
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, inner), nn.GELU()), nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Encoder(nn.Module):
    """`depth` blocks of (attention, feed-forward); each layer is [norm, block, residual] as in the reference."""

    def __init__(self, dim: int, depth: int, heads: int = 8):
        super().__init__()
        self.dim = dim
        layers = []
        for _ in range(depth):
            layers.append(nn.ModuleList([nn.LayerNorm(dim), SelfAttention(dim, heads)]))
            layers.append(nn.ModuleList([nn.LayerNorm(dim), FeedForward(dim)]))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in self.layers:
            x = x + block(norm(x))
        return x


class AbsolutePositionalEmbedding(nn.Module):
    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, n: int, device: torch.device) -> torch.Tensor:
        return self.emb(torch.arange(n, device=device))[None]


class TransformerWrapper(nn.Module):
    """Token + absolute position embeddings, the encoder, a final LayerNorm; `to_logits` is stored by
    checkpoints but unused for embeddings."""

    def __init__(self, *, num_tokens: int, max_seq_len: int, dim: int, depth: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len)
        self.attn_layers = Encoder(dim=dim, depth=depth)
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_emb(tokens) + self.pos_emb(tokens.shape[1], tokens.device)
        return self.norm(self.attn_layers(x))  # (B, n, dim)


class BERTEmbedder(nn.Module):
    """`ldm.modules.encoders.modules.BERTEmbedder` with the same constructor parameters."""

    def __init__(
        self, n_embed: int, n_layer: int, vocab_size: int = 30522, max_seq_len: int = 77,
        device: object = None, use_tokenizer: bool = True, embedding_dropout: float = 0.0,
    ):
        super().__init__()
        self.use_tokenizer = use_tokenizer
        self.max_seq_len = max_seq_len
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len, dim=n_embed, depth=n_layer)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """BERT uncased ids: [CLS] text [SEP], truncated and padded with [PAD]=0 to `max_seq_len`."""
        from ldmtool.nets.tokenizers import bert_ids

        return torch.tensor(bert_ids(list(texts), self.max_seq_len), dtype=torch.long)

    def encode(self, text: Union[Sequence[str], torch.Tensor]) -> torch.Tensor:
        """Cross-attention context (B, max_seq_len, n_embed) from strings, or from token ids (B, n)."""
        tokens = self.tokenize(text) if self.use_tokenizer and not torch.is_tensor(text) else text
        return self.transformer(tokens.to(self.transformer.token_emb.weight.device))

    forward = encode
