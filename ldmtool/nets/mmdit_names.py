"""diffusers' names for the MMDiT's layers (`SD3Transformer2DModel`), and where each lands in the released
layout: the diffusers folder layout (`transformer/diffusion_pytorch_model.safetensors`) converts to the
released keys with `mmdit_state_from_diffusers`, and diffusers/PEFT LoRA layers find their target weights
through `diffusers_layer_places`.

Three things differ besides the names: diffusers splits each fused `qkv` into `to_q` / `to_k` / `to_v`
(`add_*_proj` for the text stream), so those are row ranges of one released weight; the final layer's and the
last text stream's adaLN store (scale, shift) where the reference stores (shift, scale), so they are swapped
halves; and the positional grid is `pos_embed.pos_embed`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, TypeVar

import torch

from ldmtool.errors import CheckpointError
from ldmtool.nets.mmdit import HEAD_DIM

T = TypeVar("T")

_TOP = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
_BOTH_STREAMS = {"attn.to_out.0": "x_block.attn.proj", "norm1.linear": "x_block.adaLN_modulation.1",
             "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
             "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
             "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k"}
_TEXT_STREAM = {"attn.to_add_out": "context_block.attn.proj", "ff_context.net.0.proj": "context_block.mlp.fc1",
                "ff_context.net.2": "context_block.mlp.fc2"}  # absent from the last, pre-only text stream
_DUAL = {"attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q",
         "attn2.norm_k": "x_block.attn2.ln_k"}
_FUSED = {("attn.to_q", "attn.to_k", "attn.to_v"): "x_block.attn.qkv",
          ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "context_block.attn.qkv"}
_DUAL_FUSED = {("attn2.to_q", "attn2.to_k", "attn2.to_v"): "x_block.attn2.qkv"}


@dataclass(frozen=True)
class Place:
    """Where a diffusers layer lands: the released layer name, a row range (start, stop) of its weight and
    bias when it is part of a fused `qkv`, and whether its two halves are swapped (adaLN (scale, shift))."""

    layer: str
    rows: Optional[tuple[int, int]] = None
    swapped: bool = False


def _block_places(i: int, width: int, last: bool, dual: bool) -> dict[str, Place]:
    block = f"joint_blocks.{i}."
    names = {**_BOTH_STREAMS, **({} if last else _TEXT_STREAM), **(_DUAL if dual else {})}
    places = {f"transformer_blocks.{i}.{theirs}": Place(block + ours) for theirs, ours in names.items()}
    places[f"transformer_blocks.{i}.norm1_context.linear"] = Place(block + "context_block.adaLN_modulation.1",
                                                                   swapped=last)
    for parts, ours in {**_FUSED, **(_DUAL_FUSED if dual else {})}.items():
        for row, theirs in enumerate(parts):
            places[f"transformer_blocks.{i}.{theirs}"] = Place(block + ours, (row * width, (row + 1) * width))
    return places


def diffusers_layer_places(width: int, depth: int, dual_attention_layers: Sequence[int] = ()) -> dict[str, Place]:
    """diffusers layer name -> its place in the released layout, for every layer with weights (the qk-norm
    layers are listed whether or not the model has them)."""
    places = {theirs: Place(ours) for theirs, ours in _TOP.items()}
    places["norm_out.linear"] = Place("final_layer.adaLN_modulation.1", swapped=True)
    for i in range(depth):
        places.update(_block_places(i, width, i == depth - 1, i in dual_attention_layers))
    return places


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def mmdit_state_from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers `SD3Transformer2DModel` state dict with the released key names (fused qkv, swapped adaLN
    halves undone); CheckpointError naming the first keys that have no place."""
    if "pos_embed.proj.weight" not in state or "pos_embed.pos_embed" not in state:
        raise CheckpointError("diffusers SD3 transformer: pos_embed.proj.weight / pos_embed.pos_embed are missing")
    width = state["pos_embed.proj.weight"].shape[0]
    dual = sorted({int(key.split(".")[1]) for key in state
                   if key.startswith("transformer_blocks.") and ".attn2." in key})
    places = diffusers_layer_places(width, width // HEAD_DIM, dual)
    out: dict[str, torch.Tensor] = {"pos_embed": state["pos_embed.pos_embed"]}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    unplaced = []
    for key, tensor in state.items():
        if key == "pos_embed.pos_embed":
            continue
        layer, _, parameter = key.rpartition(".")
        place = places.get(layer)
        if place is None:
            unplaced.append(key)
        elif place.rows is not None:
            pieces.setdefault(f"{place.layer}.{parameter}", []).append((place.rows[0], tensor))
        else:
            out[f"{place.layer}.{parameter}"] = _swap_halves(tensor) if place.swapped else tensor
    if unplaced:
        raise CheckpointError(f"diffusers SD3 transformer: {len(unplaced)} keys have no place in the MMDiT "
                              f"(another model?): {', '.join(unplaced[:3])}")
    for key, parts in pieces.items():
        if len(parts) != 3:
            raise CheckpointError(f"diffusers SD3 transformer: {key} needs q, k and v; found {len(parts)} of them")
        out[key] = torch.cat([tensor for _, tensor in sorted(parts, key=lambda part: part[0])], dim=0)
    return out
