"""The UNet of the reference LDM / Stable Diffusion code (`openaimodel.UNetModel`), every switch included.

Constructed as `UNetModel(**params)` with the exact CompVis YAML `params`; attribute names equal the
checkpoint keys under `model.diffusion_model.` (`time_embed`, `label_emb`, `input_blocks`, `middle_block`,
`output_blocks`, `out`). Forward: `unet(x, timesteps, context=None, y=None)` on the already concatenated
input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmtool.errors import CheckpointError
from ldmtool.nets._layers import Conv2d, SiLU, add_residual, as_list, check_dims, normalization, silu, zero_module
from ldmtool.nets.attention import AttentionBlock, SpatialTransformer


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [cos, sin] halves, frequencies max_period^(-i/half)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedSequential(nn.Sequential):
    """Runs its layers in order, handing the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv when `use_conv`."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None,
                 padding: int = 1) -> None:
        super().__init__()
        check_dims(dims, "Upsample")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = Conv2d(channels, self.out_channels, 3, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (`op`) when `use_conv`, else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None,
                 padding: int = 1) -> None:
        super().__init__()
        check_dims(dims, "Downsample")
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = Conv2d(channels, self.out_channels, 3, stride=2, padding=padding)
        else:
            if self.out_channels != channels:
                raise CheckpointError("UNet Downsample without conv cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block with time-embedding injection (added, or scale-shift after the second norm)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False) -> None:
        super().__init__()
        check_dims(dims, "ResBlock")
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False, dims)
            self.x_upd: nn.Module = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = Conv2d(channels, self.out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = silu(self.in_layers[0](x))
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = self.in_layers[2](h)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        norm, rest = self.out_layers[0], self.out_layers[2:]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, norm(h), 1 + scale)
        else:
            h = norm(add_residual(h, emb_out))
        h = rest(silu(h))
        return add_residual(h, self.skip_connection(x))


@dataclass(frozen=True)
class _HeadLayout:
    heads: int
    dim_head: int


def _head_layout(ch: int, num_heads: int, num_head_channels: int, legacy: bool, spatial: bool) -> _HeadLayout:
    """Heads and head width at `ch` channels, following the reference's rules (including `legacy`)."""
    if num_head_channels == -1:
        dim_head = ch // num_heads
    else:
        num_heads = ch // num_head_channels
        dim_head = num_head_channels
    if legacy:
        dim_head = ch // num_heads if spatial else num_head_channels
    return _HeadLayout(num_heads, dim_head)


@dataclass(frozen=True)
class _Blocks:
    """Builds the UNet's residual and attention blocks from the settings they all share."""

    time_embed_dim: int
    dropout: float
    use_scale_shift_norm: bool
    num_heads: int
    num_head_channels: int
    legacy: bool
    spatial: bool
    context_dim: Union[int, Sequence[int], None]
    use_linear: bool
    new_attention_order: bool

    def resblock(self, ch: int, out: int, **updown: bool) -> ResBlock:
        return ResBlock(ch, self.time_embed_dim, self.dropout, out_channels=out,
                        use_scale_shift_norm=self.use_scale_shift_norm, **updown)

    def attention(self, ch: int, heads_plain: int, depth: int, disable_self_attn: bool) -> nn.Module:
        """SpatialTransformer, or the plain AttentionBlock (whose head count in the decoder is `heads_plain`)."""
        layout = _head_layout(ch, self.num_heads, self.num_head_channels, self.legacy, self.spatial)
        if not self.spatial:
            heads = heads_plain if self.num_head_channels == -1 else layout.heads
            return AttentionBlock(ch, heads, layout.dim_head, use_new_attention_order=self.new_attention_order)
        return SpatialTransformer(ch, layout.heads, layout.dim_head, depth=depth, context_dim=self.context_dim,
                                  disable_self_attn=disable_self_attn, use_linear=self.use_linear)


@dataclass(frozen=True)
class _Levels:
    """Per-level settings, each checked to have one entry per `channel_mult` level."""

    mults: Sequence[int]
    res_blocks: list
    depths: list
    no_self_attn: list
    attn_blocks: list
    attention_resolutions: Sequence[int]

    def has_attention(self, level: int, ds: int, index: int) -> bool:
        return ds in self.attention_resolutions and index < self.attn_blocks[level]


class UNetModel(nn.Module):
    """The reference diffusion UNet; keyword names equal the CompVis YAML `params`."""

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: Union[int, Sequence[int]],
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Union[int, str, None] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        use_bf16: bool = False,
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
        adm_in_channels: Optional[int] = None,
    ) -> None:
        super().__init__()
        check_dims(dims, "UNetModel")
        _check_config(use_spatial_transformer, context_dim, num_heads, num_head_channels, num_classes, adm_in_channels)
        n = len(channel_mult)
        where = "UNetModel"
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
        self.num_res_blocks = levels.res_blocks
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.predict_codebook_ids = n_embed is not None

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = _label_embedding(num_classes, time_embed_dim, adm_in_channels)
        self.input_blocks, skip_channels = _encoder_blocks(blocks, levels, in_channels, model_channels,
                                                           conv_resample, resblock_updown)
        ch = skip_channels[-1]
        middle_attention = blocks.attention(ch, num_heads, levels.depths[-1], disable_middle_self_attn)
        self.middle_block = TimestepEmbedSequential(blocks.resblock(ch, ch), middle_attention, blocks.resblock(ch, ch))
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.output_blocks = _decoder_blocks(blocks, levels, skip_channels, model_channels, heads_up,
                                             conv_resample, resblock_updown)
        ch = model_channels * channel_mult[0]  # what the decoder ends with (the reference assumes mult 1)
        self.out = nn.Sequential(normalization(ch), SiLU(), zero_module(Conv2d(model_channels, out_channels, 3, padding=1)))
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), Conv2d(model_channels, n_embed, 1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Optional[Tensor] = None,
                y: Optional[Tensor] = None, control: Optional[Sequence[Tensor]] = None,
                adapter: Optional[Sequence[Tensor]] = None) -> Tensor:
        """Prediction (eps, v or x0 by the model's training) for input x at integer-scale `timesteps`;
        `control`: ControlNet residuals (skips in input-block order, then the middle block's), added as
        the reference `ControlledUnetModel` adds them; `adapter`: T2I-Adapter features, added in order where
        diffusers' `down_intrablock_additional_residuals` go (`_adapter_points`; before the skip is kept), and
        one left over after the middle block when its shape matches (SDXL's adapters)."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("UNetModel: pass y exactly when the model is class-conditional (num_classes set)")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(self.dtype) if y.is_floating_point() else y)
        if context is not None:
            context = context.to(self.dtype)
        h = x.to(self.dtype)
        skips = []
        features = list(adapter or ())
        points = _adapter_points(self.input_blocks)[:len(features)] if features else ()
        for index, module in enumerate(self.input_blocks):
            h = module(h, emb, context)
            if index in points:
                h = h + features.pop(0).to(h.dtype)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if features and features[0].shape == h.shape:
            h = h + features.pop(0).to(h.dtype)
        if control is not None:
            skips, h = _controlled(skips, h, control)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        head = self.id_predictor if self.predict_codebook_ids else self.out
        return head(h).to(x.dtype).contiguous()  # the CPU fast path computes in channels-last


def adapter_slots(input_blocks: nn.ModuleList) -> list[tuple[int, int]]:
    """(channels, downsampling factor from the latent) of the UNet's features that T2I-Adapter features are
    added to, in order (`_adapter_points`); the middle block's, which takes one more, is the last one's."""
    blocks = list(input_blocks)
    slots = []
    for point in _adapter_points(input_blocks):
        widths = [layer.out_channels for layer in blocks[point].children() if hasattr(layer, "out_channels")]
        halvings = sum(_downsamples(block) for block in blocks[1:point + 1])
        slots.append((int(widths[-1]), 2**halvings))
    return slots


def _downsamples(block: nn.Module) -> bool:
    first = block[0]  # type: ignore[index]
    return isinstance(first, Downsample) or (isinstance(first, ResBlock) and isinstance(first.x_upd, Downsample))


def _adapter_points(input_blocks: nn.ModuleList) -> tuple[int, ...]:
    """Indices of the input blocks after which T2I-Adapter features are added, one per level, as diffusers'
    UNet adds them: a level with attention takes its feature after its last block (before the downsampling),
    a level without takes it after its downsampling (SDXL's first level), or after its last block if none."""
    blocks = list(input_blocks)
    downsamples = _downsamples
    points, level = [], []
    for index in range(1, len(blocks)):
        if not downsamples(blocks[index]):
            level.append(index)
            if index < len(blocks) - 1:
                continue
        attends = any(isinstance(layer, (SpatialTransformer, AttentionBlock)) for i in level for layer in blocks[i].children())
        points.append(level[-1] if attends or not downsamples(blocks[index]) else index)
        level = []
    return tuple(points)


def _controlled(skips: list[Tensor], middle: Tensor, control: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
    if len(control) != len(skips) + 1:
        raise ValueError(f"UNetModel: control has {len(control)} residuals, the UNet takes {len(skips) + 1}")
    added = [skip + residual.to(skip.dtype) for skip, residual in zip(skips, control)]
    return added, middle + control[-1].to(middle.dtype)


def _encoder_blocks(blocks: _Blocks, levels: _Levels, in_channels: int, model_channels: int,
                    conv_resample: bool, resblock_updown: bool) -> tuple[nn.ModuleList, list[int]]:
    """`input_blocks` and the channel count of every skip connection they leave for the decoder."""
    modules = nn.ModuleList([TimestepEmbedSequential(Conv2d(in_channels, model_channels, 3, padding=1))])
    skip_channels = [model_channels]
    ch, ds = model_channels, 1
    for level, mult in enumerate(levels.mults):
        for index in range(levels.res_blocks[level]):
            layers = [blocks.resblock(ch, mult * model_channels)]
            ch = mult * model_channels
            if levels.has_attention(level, ds, index):
                layers.append(blocks.attention(ch, blocks.num_heads, levels.depths[level], levels.no_self_attn[level]))
            modules.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(levels.mults) - 1:
            down = blocks.resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, out_channels=ch)
            modules.append(TimestepEmbedSequential(down))
            skip_channels.append(ch)
            ds *= 2
    return modules, skip_channels


def _decoder_blocks(blocks: _Blocks, levels: _Levels, skip_channels: list[int], model_channels: int,
                    heads_up: int, conv_resample: bool, resblock_updown: bool) -> nn.ModuleList:
    """`output_blocks`: one more residual block per level than the encoder, each eating one skip."""
    skips = list(skip_channels)
    modules = nn.ModuleList()
    ch, ds = skips[-1], 2 ** (len(levels.mults) - 1)
    for level, mult in list(enumerate(levels.mults))[::-1]:
        for index in range(levels.res_blocks[level] + 1):
            layers = [blocks.resblock(ch + skips.pop(), model_channels * mult)]
            ch = model_channels * mult
            if levels.has_attention(level, ds, index):
                layers.append(blocks.attention(ch, heads_up, levels.depths[level], levels.no_self_attn[level]))
            if level and index == levels.res_blocks[level]:
                layers.append(blocks.resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, out_channels=ch))
                ds //= 2
            modules.append(TimestepEmbedSequential(*layers))
    return modules


def _label_embedding(num_classes: Union[int, str], dim: int, adm_in_channels: Optional[int]) -> nn.Module:
    if isinstance(num_classes, int):
        return nn.Embedding(num_classes, dim)
    if num_classes == "continuous":
        return nn.Linear(1, dim)
    # "sequential" (checked in _check_config): ADM vector conditioning
    return nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, dim), nn.SiLU(), nn.Linear(dim, dim)))


def _check_config(spatial: bool, context_dim, num_heads: int, num_head_channels: int,
                  num_classes, adm_in_channels) -> None:
    """Config combinations the reference rejects, as one-line CheckpointErrors."""
    where = "UNet config (unet_config.params)"
    if spatial and context_dim is None:
        raise CheckpointError(f"{where}: use_spatial_transformer needs context_dim")
    if context_dim is not None and not spatial:
        raise CheckpointError(f"{where}: context_dim is set but use_spatial_transformer is false")
    if num_heads == -1 and num_head_channels == -1:
        raise CheckpointError(f"{where}: set num_heads or num_head_channels")
    if isinstance(num_classes, str) and num_classes not in ("continuous", "sequential"):
        raise CheckpointError(f"{where}: num_classes {num_classes!r} is not an int, 'continuous' or 'sequential'")
    if num_classes == "sequential" and adm_in_channels is None:
        raise CheckpointError(f"{where}: num_classes 'sequential' needs adm_in_channels")
