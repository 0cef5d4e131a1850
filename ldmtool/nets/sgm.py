"""The networks of Stability AI's `sgm` code base (Stability-AI/generative-models) that SDXL uses, with its
constructor parameters and state-dict layout: `UNetModel` (the same UNet as the CompVis one, always with
spatial transformers), the `GeneralConditioner` whose `embedders` hold the text encoders and the
micro-conditioning embedders, and `ConcatTimestepEmbedderND`.

The conditioner's outputs, as the reference `GeneralConditioner.forward` makes them: the text embedders'
hidden states concatenated along the width (cross-attention context), and the `vector` `y` for the UNet's
`label_emb`: every embedder's 2-D output (the pooled text, then each micro-conditioning value as a 256-wide
sinusoidal embedding) concatenated in embedder order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ldmtool.errors import CheckpointError
from ldmtool.nets.unet import UNetModel as _UNetModel, timestep_embedding


class UNetModel(_UNetModel):
    """`sgm.modules.diffusionmodules.openaimodel.UNetModel`: the CompVis UNet with its attention always a
    spatial transformer (when `context_dim` is set), heads from `num_head_channels` as in `legacy: false`,
    and the sgm-only switches (attention kernel choice, fairscale checkpointing) that change no weight."""

    def __init__(self, *, context_dim: Union[int, Sequence[int], None] = None,
                 spatial_transformer_attn_type: str = "softmax", disable_middle_transformer: bool = False,
                 use_fairscale_checkpoint: bool = False, image_size: int = 128, **params: Any) -> None:
        if disable_middle_transformer:
            raise CheckpointError("UNet config (network_config.params): disable_middle_transformer is not supported")
        if spatial_transformer_attn_type not in ("softmax", "softmax-xformers"):
            raise CheckpointError(f"UNet config (network_config.params): spatial_transformer_attn_type "
                                  f"{spatial_transformer_attn_type!r} is not supported (softmax, softmax-xformers)")
        params.setdefault("legacy", False)
        super().__init__(image_size=image_size, context_dim=context_dim,
                         use_spatial_transformer=context_dim is not None, **params)


class ConcatTimestepEmbedderND(nn.Module):
    """Each value of a (B, d) input as an `outdim`-wide sinusoidal embedding, concatenated: (B, d * outdim).
    No weights."""

    def __init__(self, outdim: int):
        super().__init__()
        self.outdim = outdim

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 1:
            x = x[:, None]
        b, d = x.shape
        return timestep_embedding(x.reshape(b * d), self.outdim).reshape(b, d * self.outdim)


@dataclass(frozen=True)
class TextEmbedding:
    """What the text embedders give for a batch of prompts: cross-attention context (B, 77, D) and the
    pooled vector (B, P) that joins `y` (None when no embedder pools)."""

    context: Tensor
    pooled: Optional[Tensor]


# Micro-conditioning inputs by the reference `input_key`s (see `GeneralConditioner.vector`).
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple", "aesthetic_score")


class GeneralConditioner(nn.Module):
    """`sgm.modules.GeneralConditioner`: `embedders.N` as listed in `emb_models` (each a {target, params,
    input_key} block), so checkpoint keys `conditioner.embedders.N.*` load unchanged."""

    def __init__(self, emb_models: Sequence[Mapping[str, Any]]):
        super().__init__()
        from ldmtool.checkpoints.config import instantiate

        self.input_keys = [str(block.get("input_key", "")) for block in emb_models]
        for key in self.input_keys:
            if key != "txt" and key not in SIZE_KEYS:
                raise CheckpointError(f"conditioner_config: embedder input_key {key!r} is not supported "
                                      f"(txt, {', '.join(SIZE_KEYS)})")
        self.embedders = nn.ModuleList(instantiate(block) for block in emb_models)

    @property
    def text_embedders(self) -> list[Any]:  # each has tokenize(texts) and encode_tokens(ids)
        return [e for e, key in zip(self.embedders, self.input_keys) if key == "txt"]

    @property
    def size_keys(self) -> tuple[str, ...]:
        """The micro-conditioning inputs this model takes, in the order they join `y`."""
        return tuple(key for key in self.input_keys if key != "txt")

    def encode_tokens(self, tokens: Sequence[Tensor]) -> TextEmbedding:
        """Context and pooled vector from each text embedder's token ids (its own `tokenize`), in order:
        a prompt-weighting layer can change the ids or hidden states per embedder and join them here."""
        contexts, pooled = [], []
        for embedder, ids in zip(self.text_embedders, tokens):
            out = embedder.encode_tokens(ids)
            if isinstance(out, tuple):
                out, vector = out
                pooled.append(vector)
            contexts.append(out)
        return TextEmbedding(torch.cat(contexts, dim=2), torch.cat(pooled, dim=1) if pooled else None)

    def encode_text(self, texts: Sequence[str]) -> TextEmbedding:
        return self.encode_tokens([embedder.tokenize(texts) for embedder in self.text_embedders])

    def encode(self, texts: Sequence[str]) -> Tensor:
        """Cross-attention context (B, 77, D) for a list of prompts."""
        return self.encode_text(texts).context

    def vector(self, pooled: Optional[Tensor], sizes: Mapping[str, Sequence[float]]) -> Tensor:
        """`y` (B, adm_in_channels): the pooled text then each micro-conditioning value's embedding, in
        embedder order. `sizes` maps each of `size_keys` to its value ((height, width) pairs, (top, left),
        or the aesthetic score), the same for the whole batch of `pooled`."""
        parts = []
        batch = 1 if pooled is None else pooled.shape[0]
        for embedder, key in zip(self.embedders, self.input_keys):
            if key == "txt":
                continue
            value = torch.tensor([float(v) for v in _as_tuple(sizes[key])])
            parts.append(embedder(value[None].expand(batch, -1)))
        if pooled is not None:
            parts.insert(0, pooled.float())
        return torch.cat(parts, dim=1)


def _as_tuple(value: Union[float, Sequence[float]]) -> tuple[float, ...]:
    return tuple(value) if isinstance(value, Sequence) else (value,)
