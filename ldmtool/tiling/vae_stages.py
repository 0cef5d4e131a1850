"""The reference `Encoder.forward` and `Decoder.forward` of the CompVis autoencoder as lists of stages
over the networks' own modules, which the tiled passes run a piece at a time."""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Stage:
    """One step of the reference forward: `run(h)`, its modules, and its output/input resolution."""

    name: str
    run: Callable[[Tensor], Tensor]
    modules: list
    scale: Fraction = Fraction(1)

    @property
    def has_attention(self) -> bool:
        return any("attn" in type(m).__name__.lower() or "attention" in type(m).__name__.lower()
                   for module in self.modules for m in module.modules())


def _resnet_and_attention(prefix: str, level, count: int) -> list[Stage]:
    stages = []
    for i in range(count):
        stages.append(Stage(f"{prefix}.block.{i}", level.block[i], [level.block[i]]))
        if len(level.attn) > 0:
            stages.append(Stage(f"{prefix}.attn.{i}", level.attn[i], [level.attn[i]]))
    return stages


def _mid(net) -> list[Stage]:
    return [Stage(f"mid.{name}", getattr(net.mid, name), [getattr(net.mid, name)]) for name in ("block_1", "attn_1", "block_2")]


def decoder_stages(decoder: nn.Module) -> list[Stage]:
    """The reference `Decoder.forward` as a list of stages over the decoder's own modules."""
    stages = [Stage("conv_in", decoder.conv_in, [decoder.conv_in]), *_mid(decoder)]
    for i_level in reversed(range(decoder.num_resolutions)):
        up = decoder.up[i_level]
        stages += _resnet_and_attention(f"up.{i_level}", up, len(up.block))
        if i_level != 0:
            stages.append(Stage(f"up.{i_level}.upsample", up.upsample, [up.upsample], Fraction(2)))
    if not getattr(decoder, "give_pre_end", False):
        tanh = getattr(decoder, "tanh_out", False)

        def head(h: Tensor) -> Tensor:
            h = decoder.conv_out(F.silu(decoder.norm_out(h)))
            return torch.tanh(h) if tanh else h

        stages.append(Stage("out", head, [decoder.norm_out, decoder.conv_out]))
    return stages


def encoder_stages(encoder: nn.Module) -> list[Stage]:
    """The reference `Encoder.forward` as a list of stages over the encoder's own modules."""
    stages = [Stage("conv_in", encoder.conv_in, [encoder.conv_in])]
    for i_level in range(encoder.num_resolutions):
        down = encoder.down[i_level]
        stages += _resnet_and_attention(f"down.{i_level}", down, len(down.block))
        if i_level != encoder.num_resolutions - 1:
            stages.append(Stage(f"down.{i_level}.downsample", down.downsample, [down.downsample], Fraction(1, 2)))
    stages += _mid(encoder)

    def head(h: Tensor) -> Tensor:
        return encoder.conv_out(F.silu(encoder.norm_out(h)))

    stages.append(Stage("out", head, [encoder.norm_out, encoder.conv_out]))
    return stages


def device_dtype(stages: list[Stage], source: Tensor) -> tuple[torch.device, torch.dtype]:
    for stage in stages:
        for module in stage.modules:
            for p in module.parameters():
                return p.device, p.dtype
    return source.device, source.dtype
