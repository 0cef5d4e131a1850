"""First-stage autoencoders of the reference LDM code: Encoder, Decoder, AutoencoderKL, VQModel.

Constructed as `ClassName(**params)` with the exact CompVis YAML `params` (`ddconfig`, `lossconfig`,
`embed_dim`, `n_embed`, ...). Attribute names equal the checkpoint keys under `first_stage_model.`
(`encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`, `quantize.embedding.weight`). Training-only
arguments (loss, monitor, ckpt_path, ...) are accepted and ignored; the loss modules are not built, so
`loss.*` keys of released checkpoints are extras for the loader to drop.

`encode(x)` returns the unscaled latent (KL: posterior mean; VQ: the latent before quantization) and
`decode(z)` an image in [-1, 1] (VQ quantizes to the nearest codebook entries first, as the reference
`VQModelInterface.decode`).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmtool.errors import CheckpointError
from ldmtool.nets._layers import Conv2d, add_residual, normalization, pad_2d, silu


_KL_TRAINING_ARGS = {"ckpt_path", "ignore_keys", "image_key", "colorize_nlabels", "monitor", "ema_decay", "learn_logvar"}
_VQ_TRAINING_ARGS = _KL_TRAINING_ARGS | {"batch_resize_range", "scheduler_config", "lr_g_factor", "use_ema"}


def _check_training_only(kwargs: dict, allowed: set, where: str) -> None:
    """Training-only arguments of the reference are accepted; anything else is a config error."""
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise CheckpointError(f"{where} config: unknown params {', '.join(unknown)} (first_stage_config.params)")


def _norm(channels: int) -> nn.GroupNorm:
    return normalization(channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, with a 1x1 `nin_shortcut` (or 3x3 `conv_shortcut`) when channels change."""

    def __init__(self, *, in_channels: int, out_channels: Optional[int] = None, conv_shortcut: bool = False,
                 dropout: float = 0.0, temb_channels: int = 512) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = _norm(in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = Conv2d(in_channels, out_channels, 3, padding=1)
            else:
                self.nin_shortcut = Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, temb: Optional[Tensor] = None) -> Tensor:
        h = self.conv1(silu(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return add_residual(h, x)


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1 conv projections (`q`, `k`, `v`, `proj_out`)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = _norm(in_channels)
        self.q = Conv2d(in_channels, in_channels, 1)
        self.k = Conv2d(in_channels, in_channels, 1)
        self.v = Conv2d(in_channels, in_channels, 1)
        self.proj_out = Conv2d(in_channels, in_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (F.linear(h, conv.weight.flatten(1), conv.bias)[:, None] for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return add_residual(out.transpose(1, 2).reshape(b, c, height, width), x)


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    if attn_type in ("vanilla", "vanilla-xformers"):  # same weights and math; xformers is only a kernel
        return AttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise CheckpointError(f"autoencoder ddconfig: attn_type {attn_type!r} is not supported (use 'vanilla' or 'none')")


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric (0, 1, 0, 1) pad, or 2x2 average pooling."""

    seamless: tuple[bool, bool] = (False, False)

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = Conv2d(in_channels, in_channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        if not self.with_conv:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return self.conv(pad_2d(x, (0, 1, 0, 1), self.seamless))


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv when `with_conv`."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = Conv2d(in_channels, in_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


def _attn_type(attn_type: str, use_linear_attn: bool) -> str:
    if use_linear_attn:
        raise CheckpointError("autoencoder ddconfig: use_linear_attn (linear attention) is not supported")
    return attn_type


class Encoder(nn.Module):
    """Image -> latent moments (2*z_channels with double_z) at 1/2^(levels-1) resolution."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 use_linear_attn: bool = False, attn_type: str = "vanilla", **ignore_kwargs: Any) -> None:
        super().__init__()
        attn_type = _attn_type(attn_type, use_linear_attn)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = Conv2d(in_channels, ch, 3, padding=1)
        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=0, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (z_channels) -> image (out_ch), upsampling 2^(levels-1) times."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, use_linear_attn: bool = False, attn_type: str = "vanilla",
                 **ignorekwargs: Any) -> None:
        super().__init__()
        attn_type = _attn_type(attn_type, use_linear_attn)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=0, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = _norm(block_in)
        self.conv_out = Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class DiagonalGaussianDistribution:
    """The KL autoencoder's posterior: mean and log-variance (clamped to [-30, 20]) split along channels."""

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.zeros_like(self.mean) if deterministic else torch.exp(0.5 * self.logvar)
        self.var = torch.zeros_like(self.mean) if deterministic else torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL divergence to the standard normal, summed over (C, H, W)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (`ldm.models.autoencoder.AutoencoderKL`)."""

    def __init__(self, ddconfig: dict, lossconfig: Optional[dict] = None, embed_dim: int = 4,
                 use_quant_conv: bool = True, **training_only: Any) -> None:
        super().__init__()
        _check_training_only(training_only, _KL_TRAINING_ARGS, "AutoencoderKL")
        if not ddconfig.get("double_z", True):
            raise CheckpointError("AutoencoderKL config: ddconfig.double_z must be true (mean and log-variance)")
        self.embed_dim = embed_dim
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        # The 16-channel autoencoders of FLUX.1 and SD3 have no 1x1 convs around the latent (no keys either).
        self.quant_conv: nn.Module = nn.Identity()
        self.post_quant_conv: nn.Module = nn.Identity()
        if use_quant_conv:
            self.quant_conv = Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
            self.post_quant_conv = Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def posterior(self, x: Tensor) -> DiagonalGaussianDistribution:
        """The posterior q(z|x); `.mean`, `.sample(generator)`, `.kl()`."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def encode(self, x: Tensor) -> Tensor:
        """Unscaled latent: the posterior mean."""
        return self.posterior(x).mean.contiguous()

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z)).contiguous()

    def forward(self, x: Tensor, sample_posterior: bool = True) -> tuple[Tensor, DiagonalGaussianDistribution]:
        posterior = self.posterior(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class AutoEncoder(AutoencoderKL):
    """BFL's `flux.modules.autoencoder.AutoEncoder` (FLUX.1's `ae.safetensors`): the KL autoencoder without
    quant convs, built from the reference `AutoEncoderParams`. Its scale and shift constants are kept here as
    the reference keeps them, but `encode` returns the raw posterior mean and `decode` takes the raw latent,
    as for every first stage; the bundle applies the constants (`scale_factor`, `shift_factor`)."""

    def __init__(self, *, resolution: int = 256, in_channels: int = 3, ch: int = 128, out_ch: int = 3,
                 ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2, z_channels: int = 16,
                 scale_factor: float = 0.3611, shift_factor: float = 0.1159) -> None:
        ddconfig = dict(double_z=True, z_channels=z_channels, resolution=resolution, in_channels=in_channels,
                        out_ch=out_ch, ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                        attn_resolutions=[], dropout=0.0)
        super().__init__(ddconfig, embed_dim=z_channels, use_quant_conv=False)
        self.scale_factor, self.shift_factor = scale_factor, shift_factor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook quantizer (`quantize.embedding`), as taming's VectorQuantizer2."""

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, remap: Optional[str] = None,
                 unknown_index: str = "random", sane_index_shape: bool = False, legacy: bool = True) -> None:
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.legacy = n_e, e_dim, beta, legacy
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        self.remap = remap
        if remap is not None:
            # Only index remapping uses it; quantized vectors do not depend on it. Kept for the key `quantize.used`.
            self.register_buffer("used", torch.from_numpy(_load_remap(remap)))

    def nearest_indices(self, z: Tensor) -> Tensor:
        """Codebook index of the nearest entry for every latent pixel: (B, C, H, W) -> (B, H, W)."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        codebook = self.embedding.weight
        distances = (flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None]
                     - 2.0 * flat @ codebook.t())
        return distances.argmin(dim=1).view(b, h, w)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codebook vectors for (B, H, W) indices, as a (B, C, H, W) latent."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, tuple]:
        """(quantized latent with straight-through gradient, commitment loss, (None, None, indices))."""
        indices = self.nearest_indices(z)
        z_q = self.lookup(indices).to(z.dtype)
        if not (torch.is_grad_enabled() and z.requires_grad):
            return z_q, z.new_zeros(()), (None, None, indices if self.sane_index_shape else indices.flatten())
        commit = torch.mean((z_q.detach() - z) ** 2)
        codebook = torch.mean((z_q - z.detach()) ** 2)
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = z + (z_q - z).detach()
        return z_q, loss, (None, None, indices if self.sane_index_shape else indices.flatten())


def _load_remap(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"VQ config: cannot read the remap file {path!r} ({err}); remove `remap` or fix the path") from err


class VQModel(nn.Module):
    """Vector-quantised autoencoder with the LDM interface (`VQModelInterface`): encode stops before
    quantization, decode quantizes first."""

    def __init__(self, ddconfig: dict, lossconfig: Optional[dict] = None, n_embed: int = 8192,
                 embed_dim: int = 3, remap: Optional[str] = None, sane_index_shape: bool = False,
                 **training_only: Any) -> None:
        super().__init__()
        _check_training_only(training_only, _VQ_TRAINING_ARGS, "VQModel")
        self.embed_dim, self.n_embed = embed_dim, n_embed
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x: Tensor) -> Tensor:
        """Unscaled latent before quantization (after `quant_conv`)."""
        return self.quant_conv(self.encoder(x)).contiguous()

    def decode(self, h: Tensor, force_not_quantize: bool = False) -> Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant)).contiguous()

    def decode_code(self, indices: Tensor) -> Tensor:
        """Image from (B, H, W) codebook indices."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(indices)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        quant, loss, _ = self.quantize(self.encode(x))
        return self.decoder(self.post_quant_conv(quant)), loss


class VQModelInterface(VQModel):
    """The name LDM configs use for the VQ first stage (`embed_dim` first); same behaviour as VQModel."""

    def __init__(self, embed_dim: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, embed_dim=embed_dim, **kwargs)


def autoencoder_config_from_shapes(shapes: Mapping[str, Sequence[int]], prefix: str = "") -> dict[str, Any]:
    """The `AutoEncoder` keyword arguments (BFL's `AutoEncoderParams` without the latent constants) that a
    KL autoencoder's keys and shapes under `prefix` record: base width, per-level multipliers, blocks per
    level, image and latent channels."""
    def shape(key: str) -> Sequence[int]:
        if prefix + key not in shapes:
            raise CheckpointError(f"not a KL autoencoder: no {prefix + key}")
        return shapes[prefix + key]

    ch, in_channels = (int(d) for d in shape("encoder.conv_in.weight")[:2])
    levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in shapes
              if (m := re.match(re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.", k))}
    return dict(
        in_channels=in_channels, ch=ch, out_ch=int(shape("decoder.conv_out.weight")[0]),
        ch_mult=[int(shape(f"encoder.down.{i}.block.0.conv1.weight")[0]) // ch for i in levels],
        num_res_blocks=len(blocks), z_channels=int(shape("decoder.conv_in.weight")[1]),
    )
