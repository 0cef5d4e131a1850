"""ControlNet (Zhang et al. 2023, lllyasviel/ControlNet `cldm.ControlNet`): a trainable copy of the UNet's
encoder and middle block that reads a hint image and returns one residual per UNet skip connection plus one
for the middle block, each through a zero-initialised 1x1 conv.

Attribute names equal the released keys without their `control_model.` prefix: `time_embed`,
`input_hint_block`, `input_blocks`, `zero_convs`, `middle_block`, `middle_block_out` (and `label_emb` for
SDXL's). Called as the reference: `controlnet(x, hint, timesteps, context, y=None)` -> the residuals in
the reference order (input blocks first, the middle block last; 13 for SD 1.x/2.x), hint at pixel
resolution in [0, 1]. The hint encoder has one stride-2 conv per width after the first, so it downsamples by
8 with the released widths and by 4 with ldmtool's defaults' (16, 32, 64), matching their kl-f4 first stage.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import Tensor, nn

from ldmtool.nets._layers import Conv2d, as_list, check_dims, zero_module
from ldmtool.nets.unet import (
    TimestepEmbedSequential,
    _Blocks,
    _check_config,
    _encoder_blocks,
    _label_embedding,
    _Levels,
    timestep_embedding,
)

HINT_CHANNELS = (16, 32, 96, 256)  # the reference's hint encoder widths (diffusers: conditioning_embedding_out_channels)


def hint_encoder(hint_channels: int, widths: Sequence[int], model_channels: int) -> TimestepEmbedSequential:
    """`input_hint_block`: pairs of 3x3 convs with SiLU, each width after the first entered by a stride-2 conv,
    ending in a zero conv to the UNet's width (so the hint enters at latent resolution)."""
    layers: list[nn.Module] = [Conv2d(hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for before, after in zip(widths[:-1], widths[1:]):
        layers += [Conv2d(before, before, 3, padding=1), nn.SiLU(), Conv2d(before, after, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(zero_module(Conv2d(widths[-1], model_channels, 3, padding=1)))
    return TimestepEmbedSequential(*layers)


class ControlNet(nn.Module):
    """`cldm.cldm.ControlNet`; keyword names equal the reference config's `control_stage_config.params`
    (`hint_block_channels` is ldmtool's, for diffusers files with other hint widths)."""

    config: dict  # the constructor parameters (set by whoever builds it: presets, `load_controlnet`)

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        hint_channels: int,
        num_res_blocks: Union[int, Sequence[int]],
        attention_resolutions: Sequence[int],
        image_size: int = 32,
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: Union[int, Sequence[int]] = 1,
        context_dim: Union[int, Sequence[int], None] = None,
        n_embed: Optional[int] = None,
        legacy: bool = True,
        disable_self_attentions: Optional[Sequence[bool]] = None,
        num_attention_blocks: Optional[Sequence[int]] = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        num_classes: Union[int, str, None] = None,
        adm_in_channels: Optional[int] = None,
        hint_block_channels: Sequence[int] = HINT_CHANNELS,
    ) -> None:
        super().__init__()
        check_dims(dims, "ControlNet")
        _check_config(use_spatial_transformer, context_dim, num_heads, num_head_channels, num_classes, adm_in_channels)
        n = len(channel_mult)
        where = "ControlNet"
        levels = _Levels(
            channel_mult, as_list(num_res_blocks, n, "num_res_blocks", where),
            as_list(transformer_depth, n, "transformer_depth", where),
            as_list(disable_self_attentions or False, n, "disable_self_attentions", where),
            as_list(num_attention_blocks if num_attention_blocks is not None else 1 << 30, n, "num_attention_blocks", where),
            attention_resolutions,
        )
        time_embed_dim = model_channels * 4
        blocks = _Blocks(time_embed_dim, dropout, use_scale_shift_norm, num_heads, num_head_channels, legacy,
                         use_spatial_transformer, context_dim, use_linear_in_transformer, use_new_attention_order)
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = _label_embedding(num_classes, time_embed_dim, adm_in_channels)
        self.input_hint_block = hint_encoder(hint_channels, tuple(hint_block_channels), model_channels)
        self.input_blocks, skip_channels = _encoder_blocks(blocks, levels, in_channels, model_channels,
                                                           conv_resample, resblock_updown)
        self.zero_convs = nn.ModuleList([_zero_conv(ch) for ch in skip_channels])
        ch = skip_channels[-1]
        middle_attention = blocks.attention(ch, num_heads, levels.depths[-1], disable_middle_self_attn)
        self.middle_block = TimestepEmbedSequential(blocks.resblock(ch, ch), middle_attention, blocks.resblock(ch, ch))
        self.middle_block_out = _zero_conv(ch)

    @property
    def dtype(self) -> Any:
        return self.time_embed[0].weight.dtype

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Optional[Tensor] = None,
                y: Optional[Tensor] = None) -> list[Tensor]:
        """Residuals for the UNet's skips (input-block order) then its middle block; hint (B, C, fh, fw) in
        [0, 1], f the hint encoder's downsampling (8 as released, 2^(len(hint_block_channels) - 1))."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.dtype))
        if y is not None and self.num_classes is not None:
            emb = emb + self.label_emb(y.to(self.dtype))
        if context is not None:
            context = context.to(self.dtype)
        h = self.input_blocks[0](x.to(self.dtype), emb, context) + self.input_hint_block(hint.to(self.dtype), emb, context)
        residuals = [self.zero_convs[0](h, emb, context)]
        for module, zero_conv in zip(self.input_blocks[1:], self.zero_convs[1:]):
            h = module(h, emb, context)
            residuals.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        residuals.append(self.middle_block_out(h, emb, context))
        return residuals


def _zero_conv(channels: int) -> TimestepEmbedSequential:
    return TimestepEmbedSequential(zero_module(Conv2d(channels, channels, 1)))
