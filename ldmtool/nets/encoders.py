"""Conditioning encoders of the reference code, with its constructor parameters and state-dict layout.

Each has an `encode(...)` that returns what the UNet consumes: cross-attention context (B, T, D), a
concat map, or (for the x4 upscaler) the noised low-resolution image and its noise level.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldmtool.nets._layers import Conv2d
from ldmtool.nets.clip_model import ClipTextConfig, ClipTextTransformer
from ldmtool.nets.ldm_bert import BERTEmbedder
from ldmtool.nets.openclip_text import FrozenOpenCLIPEmbedder

__all__ = [
    "BERTEmbedder",
    "ClassEmbedder",
    "FrozenCLIPEmbedder",
    "FrozenOpenCLIPEmbedder",
    "ImageConcatWithNoiseAugmentation",
    "SpatialRescaler",
]

# openai/clip-vit-large-patch14 text tower (SD 1.x). Token ids 0/2/1 are that config's (legacy) values.
CLIP_VIT_L_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)


class ClassEmbedder(nn.Module):
    """Class label -> one cross-attention token (B, 1, embed_dim); the last class is the unconditional one
    for models trained with label dropout (cin256-v2 has 1001 classes)."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class", ucg_rate: float = 0.0):
        super().__init__()
        self.key = key
        self.n_classes = n_classes
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def encode(self, labels: Union[torch.Tensor, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        if isinstance(labels, Mapping):
            labels = labels[self.key]
        labels = torch.as_tensor(labels, device=self.embedding.weight.device).long()
        return self.embedding(labels[:, None])

    forward = encode


class SpatialRescaler(nn.Module):
    """Resize by `multiplier` `n_stages` times, then (optionally) map channels with a 1x1 conv."""

    METHODS = ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")

    def __init__(self, n_stages: int = 1, method: str = "bilinear", multiplier: float = 0.5,
                 in_channels: int = 3, out_channels: Optional[int] = None, bias: bool = False):
        super().__init__()
        if n_stages < 0 or method not in self.METHODS:
            raise ValueError(f"SpatialRescaler needs n_stages >= 0 and method in {self.METHODS}")
        self.n_stages = n_stages
        self.method = method
        self.multiplier = multiplier
        self.remap_output = out_channels is not None
        if self.remap_output:
            self.channel_mapper = Conv2d(in_channels, out_channels, 1, bias=bias)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        return self.channel_mapper(x) if self.remap_output else x

    forward = encode


class _TextModelHolder(nn.Module):
    """Gives the text model the `text_model.` key prefix it had in the transformers 4.x checkpoints SD 1.x
    saved."""

    def __init__(self, text_model: ClipTextTransformer):
        super().__init__()
        self.text_model = text_model


class FrozenCLIPEmbedder(nn.Module):
    """SD 1.x text encoder: CLIP ViT-L/14's text tower in transformers' names (`nets.clip_model`), so keys are
    `transformer.text_model.*`. `text_config` overrides the ViT-L/14 values (small test models)."""

    LAYERS = ("last", "pooled", "hidden")

    def __init__(self, version: str = "openai/clip-vit-large-patch14", device: object = None,
                 max_length: int = 77, freeze: bool = True, layer: str = "last",
                 layer_idx: Optional[int] = None, always_return_pooled: bool = False, *,
                 text_config: Optional[dict] = None):
        super().__init__()
        if layer not in self.LAYERS or (layer == "hidden" and layer_idx is None):
            raise ValueError(f"FrozenCLIPEmbedder layer must be one of {self.LAYERS} (hidden needs layer_idx)")
        config = ClipTextConfig(**{**CLIP_VIT_L_TEXT, **(text_config or {})})
        self.transformer = _TextModelHolder(ClipTextTransformer(config))
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        self.return_pooled = always_return_pooled  # sgm's option: also the pooled output (SDXL's CLIP-L: off)
        if freeze:
            self.requires_grad_(False)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP ids: <start> text <end>, truncated to 77 and padded with <end> (as SD 1.x)."""
        from ldmtool.nets.tokenizers import clip_ids

        return torch.tensor(clip_ids(list(texts), length=self.max_length))

    @property
    def token_embedding(self) -> nn.Embedding:
        """The token-id -> vector table (textual-inversion vectors replace its output rows)."""
        return self.transformer.text_model.embeddings.token_embedding

    def encode_tokens(self, tokens: torch.Tensor, clip_skip: Optional[int] = None) -> Any:
        """(B, 77, hidden) hidden states of the chosen layer; with `always_return_pooled` also (B, hidden).
        `clip_skip` N > 1 (A1111's meaning, layer "last") takes the output of the N-th layer from the end
        through the final layer norm: N=2 is the penultimate layer. With layer "hidden" (SDXL's CLIP-L, whose
        default is the penultimate layer) N takes the N-th hidden state from the end as it is, without the
        norm, as ComfyUI's CLIPSetLastLayer(-N) and A1111's `sdxl_clip_l_skip` do."""
        device = self.token_embedding.weight.device
        skip = clip_skip is not None and clip_skip > 1 and self.layer == "last"
        text_model = self.transformer.text_model
        out = text_model(tokens.to(device))
        if skip:
            assert clip_skip is not None  # for mypy: `skip` says so
            hidden = text_model.final_layer_norm(out.hidden_states[-clip_skip])
        elif self.layer == "last":
            hidden = out.last_hidden_state
        elif self.layer == "pooled":
            hidden = out.pooler_output[:, None, :]
        else:
            hidden = out.hidden_states[self.layer_idx if clip_skip is None else -clip_skip]
        return (hidden, out.pooler_output) if self.return_pooled else hidden

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Cross-attention context (B, 77, hidden) for a list of prompts."""
        return self.encode_tokens(self.tokenize(texts))

    forward = encode


class ImageConcatWithNoiseAugmentation(nn.Module):
    """The x4 upscaler's `low_scale_model`: noises the low-resolution image to a chosen level with its own
    linear schedule (buffers stored in the checkpoint) and hands the level to the UNet as its class label."""

    def __init__(self, noise_schedule_config: Optional[dict] = None, max_noise_level: int = 1000,
                 to_cuda: bool = False):
        super().__init__()
        from ldmtool.checkpoints.schedule import LOW_SCALE_BUFFERS, schedule_buffers

        self.max_noise_level = max_noise_level
        buffers = schedule_buffers(**(noise_schedule_config or {}))
        for name in LOW_SCALE_BUFFERS:
            self.register_buffer(name, buffers[name])

    def encode(self, x: torch.Tensor, noise_level: Union[int, torch.Tensor],
               noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q_sample(x, t=noise_level) and the level as a (B,) long tensor. `noise` defaults to randn."""
        level = torch.as_tensor(noise_level, device=x.device).long().expand(x.shape[0])
        if bool((level < 0).any()) or bool((level >= len(self.alphas_cumprod)).any()):
            raise ValueError(f"noise level must be in [0, {len(self.alphas_cumprod) - 1}]")
        noise = torch.randn_like(x) if noise is None else noise.to(x)
        a = self.sqrt_alphas_cumprod.to(x.device)[level].to(x.dtype).view(-1, 1, 1, 1)
        s = self.sqrt_one_minus_alphas_cumprod.to(x.device)[level].to(x.dtype).view(-1, 1, 1, 1)
        return a * x + s * noise, level

    forward = encode
