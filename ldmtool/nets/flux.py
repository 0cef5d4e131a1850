"""The FLUX.1 transformer (Black Forest Labs, 2024): a rectified-flow denoiser over packed 2x2 latent
patches, with double-stream blocks (image and text tokens keep their own weights and attend jointly) then
single-stream blocks over the joined sequence, rotary position embeddings over (index, row, column) ids,
and a vector `vec` (timestep, pooled CLIP text, distilled guidance) that modulates every block.

Module and parameter names are those of BFL's released files (`img_in`, `txt_in`, `time_in`, `vector_in`,
`guidance_in`, `double_blocks.N.*`, `single_blocks.N.*`, `final_layer.*`), so they load without renaming,
and the call is the reference's: `Flux()(img, img_ids, txt, txt_ids, timesteps, y, guidance=None)`.

`flux_config_from_shapes` reads the architecture back from a state dict's shapes, as the reference loaders
do; the rotary axes are the one thing no shape records (fixed at (16, 56, 56) for 128-wide heads).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmtool.errors import CheckpointError
from ldmtool.nets._layers import Linear

ROPE_AXES = (16, 56, 56)  # (index, row, column) widths of a 128-wide head's rotary embedding
ROPE_THETA = 10000
TIME_WIDTH = 256  # sinusoidal embedding width of the timestep and the guidance value
NORM_EPS = 1e-6


def timestep_embedding(t: Tensor, dim: int = TIME_WIDTH, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] scaled by 1000 (cosines first, as the reference)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_angles(ids: Tensor, axes: Sequence[int], theta: float) -> Tensor:
    """(B, L, n_axes) positions -> (B, L, head_dim / 2) rotation angles, each axis its own frequency band.
    Frequencies in float64 as the reference computes them, so large positions keep their precision."""
    bands = []
    for axis, width in enumerate(axes):
        omega = theta ** -(torch.arange(0, width, 2, dtype=torch.float64, device=ids.device) / width)
        bands.append(ids[..., axis].double()[..., None] * omega)
    return torch.cat(bands, dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs (x0, x1) of each head's features by the angles: (B, H, L, D) in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, with a learned `scale` per feature."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        rrms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + NORM_EPS)
        return (x.float() * rrms).type_as(x) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = Linear(in_dim, hidden)
        self.out_layer = Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """`vec` -> one or two (shift, scale, gate) triples, each (B, 1, hidden)."""

    def __init__(self, hidden: int, double: bool) -> None:
        super().__init__()
        self.triples = 2 if double else 1
        self.lin = Linear(hidden, 3 * self.triples * hidden)

    def forward(self, vec: Tensor) -> list[tuple[Tensor, ...]]:
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.triples, dim=-1)
        return [tuple(chunks[3 * i: 3 * i + 3]) for i in range(self.triples)]


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=NORM_EPS) + shift


def _heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*H*D) -> q, k, v each (B, H, L, D)."""
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def attention(q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotary-embedded scaled dot-product attention: (B, H, L, D) -> (B, L, H*D)."""
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // heads)
        self.proj = Linear(dim, dim)


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), Linear(mlp_hidden, hidden))


class DoubleStreamBlock(nn.Module):
    """Image and text tokens with their own modulation, attention projections and MLPs, attending jointly
    (text first in the joined sequence)."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int, qkv_bias: bool) -> None:
        super().__init__()
        self.img_mod = Modulation(hidden, double=True)
        self.img_attn = SelfAttention(hidden, heads, qkv_bias)
        self.img_mlp = _mlp(hidden, mlp_hidden)
        self.txt_mod = Modulation(hidden, double=True)
        self.txt_attn = SelfAttention(hidden, heads, qkv_bias)
        self.txt_mlp = _mlp(hidden, mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        img_attn_mod, img_mlp_mod = self.img_mod(vec)
        txt_attn_mod, txt_mlp_mod = self.txt_mod(vec)
        img_q, img_k, img_v = self._qkv(self.img_attn, img, img_attn_mod)
        txt_q, txt_k, txt_v = self._qkv(self.txt_attn, txt, txt_attn_mod)
        joined = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2),
                           rope)
        txt_out, img_out = joined[:, : txt.shape[1]], joined[:, txt.shape[1]:]
        img = self._residuals(img, img_out, self.img_attn, self.img_mlp, img_attn_mod, img_mlp_mod)
        txt = self._residuals(txt, txt_out, self.txt_attn, self.txt_mlp, txt_attn_mod, txt_mlp_mod)
        return img, txt

    @staticmethod
    def _qkv(attn: SelfAttention, x: Tensor, mod: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        shift, scale, _ = mod
        q, k, v = _heads(attn.qkv(_modulate(x, shift, scale)), attn.heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    @staticmethod
    def _residuals(x: Tensor, attended: Tensor, attn: SelfAttention, mlp: nn.Module, attn_mod: tuple[Tensor, ...],
                   mlp_mod: tuple[Tensor, ...]) -> Tensor:
        x = x + attn_mod[2] * attn.proj(attended)
        shift, scale, gate = mlp_mod
        return x + gate * mlp(_modulate(x, shift, scale))


class SingleStreamBlock(nn.Module):
    """One projection to q, k, v and the MLP's hidden layer side by side, and one back (parallel
    attention and MLP over the joined text + image sequence)."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.heads, self.widths = heads, [3 * hidden, mlp_hidden]
        self.linear1 = Linear(hidden, 3 * hidden + mlp_hidden)
        self.linear2 = Linear(hidden + mlp_hidden, hidden)
        self.norm = QKNorm(hidden // heads)
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x: Tensor, vec: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        ((shift, scale, gate),) = self.modulation(vec)
        qkv, mlp = self.linear1(_modulate(x, shift, scale)).split(self.widths, dim=-1)
        q, k, v = _heads(qkv, self.heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, rope), F.gelu(mlp, approximate="tanh")), 2))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.linear = Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(_modulate(x, shift[:, None], scale[:, None]))


class Flux(nn.Module):
    """BFL's `flux.model.Flux`; keyword arguments are the fields of the reference `FluxParams`."""

    def __init__(self, *, in_channels: int = 64, out_channels: Optional[int] = None, vec_in_dim: int = 768,
                 context_in_dim: int = 4096, hidden_size: int = 3072, mlp_ratio: float = 4.0, num_heads: int = 24,
                 depth: int = 19, depth_single_blocks: int = 38, axes_dim: Sequence[int] = ROPE_AXES,
                 theta: float = ROPE_THETA, qkv_bias: bool = True, guidance_embed: bool = False) -> None:
        super().__init__()
        if hidden_size % num_heads or sum(axes_dim) != hidden_size // num_heads:
            raise CheckpointError(f"Flux config: hidden_size {hidden_size} / num_heads {num_heads} must be a whole "
                                  f"head width equal to the rotary axes' sum {sum(axes_dim)}")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.axes_dim, self.theta = tuple(axes_dim), theta
        self.guidance_embed = guidance_embed
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_in = Linear(in_channels, hidden_size)
        self.time_in = MLPEmbedder(TIME_WIDTH, hidden_size)
        self.vector_in = MLPEmbedder(vec_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(TIME_WIDTH, hidden_size) if guidance_embed else None
        self.txt_in = Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden_size, num_heads, mlp_hidden, qkv_bias) for _ in range(depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden_size, num_heads, mlp_hidden) for _ in range(depth_single_blocks))
        self.final_layer = LastLayer(hidden_size, self.out_channels)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                guidance: Optional[Tensor] = None) -> Tensor:
        """img (B, L, in_channels) packed 2x2 patches with ids (B, L, 3); txt (B, T, context) with ids
        (B, T, 3); timesteps (B,) in [0, 1]; y (B, vec_in_dim) pooled text; guidance (B,) for dev models."""
        vec = self.time_in(timestep_embedding(timesteps).to(img.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this Flux model embeds the guidance value: pass guidance=")
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(img.dtype))
        vec = vec + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)
        angles = rope_angles(torch.cat((txt_ids, img_ids), dim=1), self.axes_dim, self.theta)[:, None]
        rope = (angles.cos().float(), angles.sin().float())  # (B, 1, T+L, D/2)
        for double in self.double_blocks:
            img, txt = double(img, txt, vec, rope)
        joined = torch.cat((txt, img), 1)
        for single in self.single_blocks:
            joined = single(joined, vec, rope)
        return self.final_layer(joined[:, txt.shape[1]:], vec)


def _depth(keys: Sequence[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def flux_config_from_shapes(shapes: Mapping[str, Sequence[int]], prefix: str = "") -> dict[str, Any]:
    """The `Flux` keyword arguments a state dict's keys and shapes (under `prefix`) record: widths from the
    embedders, head width from the q/k norm, MLP ratio from the first MLP, depths from the block indices,
    guidance embedding and q/k/v bias from the keys present."""
    def shape(key: str) -> Sequence[int]:
        if prefix + key not in shapes:
            raise CheckpointError(f"not a Flux transformer: no {prefix + key}")
        return shapes[prefix + key]

    hidden, in_channels = (int(d) for d in shape("img_in.weight"))
    head = int(shape("double_blocks.0.img_attn.norm.query_norm.scale")[0])
    if hidden % head or head != sum(ROPE_AXES):
        raise CheckpointError(f"Flux transformer with {head}-wide heads: only {sum(ROPE_AXES)}-wide heads are "
                              f"supported (the rotary axes {ROPE_AXES} are fixed as the reference fixes them)")
    keys = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
    return dict(
        in_channels=in_channels,
        out_channels=int(shape("final_layer.linear.weight")[0]),
        vec_in_dim=int(shape("vector_in.in_layer.weight")[1]),
        context_in_dim=int(shape("txt_in.weight")[1]),
        hidden_size=hidden,
        mlp_ratio=int(shape("double_blocks.0.img_mlp.0.weight")[0]) / hidden,
        num_heads=hidden // head,
        depth=_depth(keys, r"double_blocks\.(\d+)\."),
        depth_single_blocks=_depth(keys, r"single_blocks\.(\d+)\."),
        axes_dim=list(ROPE_AXES),
        theta=ROPE_THETA,
        qkv_bias=prefix + "double_blocks.0.img_attn.qkv.bias" in shapes,
        guidance_embed=prefix + "guidance_in.in_layer.weight" in shapes,
    )
