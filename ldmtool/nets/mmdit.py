"""The MMDiT of Stable Diffusion 3 / 3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers"), with the
parameter names of the released single files under `model.diffusion_model.` (Stability-AI/sd3.5 `mmditx.py`,
ComfyUI's `mmdit.py`): `x_embedder.proj`, `pos_embed`, `t_embedder.mlp.{0,2}`, `y_embedder.mlp.{0,2}`,
`context_embedder`, `joint_blocks.N.{context_block,x_block}.{attn.qkv, attn.proj, attn.ln_q, attn.ln_k,
attn2.*, mlp.fc1, mlp.fc2, adaLN_modulation.1}`, `final_layer.{linear, adaLN_modulation.1}`.

Each joint block holds two streams, text (`context_block`) and image (`x_block`), each with its own adaLN
modulation, projections and MLP; their queries, keys and values are concatenated (text first) for one
attention over both. The last block's text stream is "pre-only": it contributes keys and values but has no
output projection or MLP. SD3.5 adds RMS qk-norm (`ln_q`/`ln_k` over each head) and, in the medium model, a
second self-attention of the image stream alone (`x_block.attn2`, "dual attention") in its first layers.

The reference call is `model(x, t, y=pooled, context=tokens)` with `t = sigma * 1000`; the hidden width is
`64 * depth` and there are `depth` heads of 64, as the reference fixes them. `mmdit_config_from_shapes` reads
the architecture from a state dict's shapes as the reference loader does, so reduced-width files load.

Positions: `pos_embed` is a stored (1, M*M, D) grid. The reference crops the centre h x w patches of it for an
h x w latent (`cropped_pos_embed`); `pos_window` also takes an explicit placement, so that a tile of a larger
canvas gets the embedding of its place in that canvas (see there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmtool.errors import CheckpointError, UsageError
from ldmtool.nets._layers import Linear
from ldmtool.nets.unet import timestep_embedding

HEAD_DIM = 64  # the reference's "magic": hidden width 64 * depth, `depth` heads
TIME_FREQUENCIES = 256


@dataclass(frozen=True)
class MMDiTConfig:
    """What an MMDiT's weights record (widths in channels, `pos_embed_max_size` in patches a side)."""

    depth: int
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max_size: int = 192
    adm_in_channels: Optional[int] = 2048  # pooled text width (CLIP-L + bigG); None: no `y_embedder`
    context_in_channels: int = 4096  # T5-XXL width (CLIP hidden states are zero-padded to it)
    mlp_hidden: Optional[int] = None  # None: 4 * hidden
    qk_norm: bool = False
    dual_attention_layers: tuple[int, ...] = ()

    @property
    def hidden_size(self) -> int:
        return HEAD_DIM * self.depth

    @property
    def heads(self) -> int:
        return self.depth

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else 4 * self.hidden_size


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def _layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class Mlp(nn.Module):
    """fc1, tanh-approximated GELU, fc2."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Fused `qkv` projection, optional RMS norm of each head's queries and keys, `proj` out (absent when the
    stream is pre-only). `heads_of(x)` gives (B, heads, L, 64) tensors for a joint attention."""

    def __init__(self, width: int, heads: int, *, qk_norm: bool, pre_only: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = Linear(width, 3 * width)
        if not pre_only:
            self.proj = Linear(width, width)
        if qk_norm:
            self.ln_q = nn.RMSNorm(width // heads, eps=1e-6)
            self.ln_k = nn.RMSNorm(width // heads, eps=1e-6)
        self.qk_norm = qk_norm

    def heads_of(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).unbind(2)  # each (B, L, H, d)
        if self.qk_norm:
            q, k = self.ln_q(q), self.ln_k(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA over (B, H, L, d) -> (B, L, H*d)."""
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class StreamBlock(nn.Module):
    """One stream of a joint block (the reference's `DismantledBlock`): adaLN-modulated attention input, then
    the gated attention output, the gated second attention (dual), and the gated MLP."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, *, qk_norm: bool, pre_only: bool = False,
                 dual_attention: bool = False) -> None:
        super().__init__()
        self.pre_only, self.dual_attention = pre_only, dual_attention
        self.attn = SelfAttention(width, heads, qk_norm=qk_norm, pre_only=pre_only)
        if dual_attention:
            self.attn2 = SelfAttention(width, heads, qk_norm=qk_norm)
        if not pre_only:
            self.mlp = Mlp(width, mlp_hidden)
        self.n_mods = 2 if pre_only else 9 if dual_attention else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(width, self.n_mods * width))

    def modulation(self, c: Tensor) -> tuple[Tensor, ...]:
        """The adaLN outputs, each (B, D), in the reference's order: shift, scale, gate of the attention and of
        the MLP, then of the second attention (dual); a pre-only stream has the first shift and scale only."""
        return self.adaLN_modulation(c).chunk(self.n_mods, dim=1)

    def attention_input(self, normed: Tensor, mods: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        return self.attn.heads_of(modulate(normed, mods[0], mods[1]))

    def finish(self, x: Tensor, attended: Tensor, mods: tuple[Tensor, ...], normed: Tensor) -> Tensor:
        """The stream's output from its share of the joint attention; `normed` is layer-normed `x`."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp, *second = mods
        x = x + gate_msa[:, None] * self.attn.proj(attended)
        if self.dual_attention:
            shift_msa2, scale_msa2, gate_msa2 = second
            alone = _attend(*self.attn2.heads_of(modulate(normed, shift_msa2, scale_msa2)))
            x = x + gate_msa2[:, None] * self.attn2.proj(alone)
        return x + gate_mlp[:, None] * self.mlp(modulate(_layer_norm(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Text and image streams attending jointly (text tokens first, as the reference concatenates them)."""

    def __init__(self, config: MMDiTConfig, index: int) -> None:
        super().__init__()
        width, heads, mlp = config.hidden_size, config.heads, config.mlp_width
        self.context_block = StreamBlock(width, heads, mlp, qk_norm=config.qk_norm,
                                         pre_only=index == config.depth - 1)
        self.x_block = StreamBlock(width, heads, mlp, qk_norm=config.qk_norm,
                                   dual_attention=index in config.dual_attention_layers)

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Optional[Tensor], Tensor]:
        context_mods, x_mods = self.context_block.modulation(c), self.x_block.modulation(c)
        context_normed, x_normed = _layer_norm(context), _layer_norm(x)
        streams = (self.context_block.attention_input(context_normed, context_mods),
                   self.x_block.attention_input(x_normed, x_mods))
        joint = _attend(*(torch.cat(parts, dim=2) for parts in zip(*streams)))  # (B, Lc + Lx, D)
        context_attended, x_attended = joint.split([context.shape[1], x.shape[1]], dim=1)
        x = self.x_block.finish(x, x_attended, x_mods, x_normed)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.finish(context, context_attended, context_mods, context_normed), x


class Embedder(nn.Module):
    """Linear, SiLU, linear (`mlp.0`, `mlp.2`): the timestep and pooled-text embedders."""

    def __init__(self, in_width: int, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(Linear(in_width, width), nn.SiLU(), Linear(width, width))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches to tokens (`x_embedder.proj`, a strided conv), row-major."""

    def __init__(self, patch_size: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D)


class FinalLayer(nn.Module):
    """Layer norm modulated by (shift, scale), then the linear map to p*p*C values per token."""

    def __init__(self, width: int, out_width: int) -> None:
        super().__init__()
        self.linear = Linear(width, out_width)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(_layer_norm(x), shift, scale))


class MMDiT(nn.Module):
    """`model.diffusion_model` of an SD3 / SD3.5 single file. Velocity prediction, called as the reference."""

    pos_embed: Tensor

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        self.config = config
        width, m = config.hidden_size, config.pos_embed_max_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, width)
        self.register_buffer("pos_embed", torch.zeros(1, m * m, width))
        self.t_embedder = Embedder(TIME_FREQUENCIES, width)
        if config.adm_in_channels is not None:
            self.y_embedder = Embedder(config.adm_in_channels, width)
        self.context_embedder = Linear(config.context_in_channels, width)
        self.joint_blocks = nn.ModuleList(JointBlock(config, i) for i in range(config.depth))
        self.final_layer = FinalLayer(width, config.patch_size ** 2 * config.out_channels)

    def pos_window(self, rows: int, cols: int, origin: Optional[Sequence[int]] = None,
                   canvas: Optional[Sequence[int]] = None) -> Tensor:
        """Positional embedding (1, rows*cols, D) of a rows x cols patch window, in patch units throughout.

        `canvas` (canvas_rows, canvas_cols; default: the window itself) is the whole latent the window is part
        of; it is placed at the centre of the stored M x M grid as the reference places a latent, at
        ((M - canvas_rows) // 2, (M - canvas_cols) // 2). `origin` (top, left; default (0, 0)) is the window's
        place inside that canvas. So a tile at latent pixels (y, x) of an H x W canvas takes
        `origin=(y // p, x // p), canvas=(H // p, W // p)` and gets exactly the rows and columns of the
        whole canvas's embedding that it covers; with neither given this is the reference's centre crop. A window
        may run past the canvas's end (a `--seamless` tile across the wrap edge): it takes the grid's positions
        beyond it, so its positions continue unbroken.
        """
        m = self.config.pos_embed_max_size
        canvas_rows, canvas_cols = (rows, cols) if canvas is None else canvas
        top, left = (0, 0) if origin is None else origin
        if canvas_rows > m or canvas_cols > m:
            p = self.config.patch_size
            raise UsageError(f"a {canvas_rows * p}x{canvas_cols * p} latent is larger than this model's position "
                             f"grid of {m}x{m} patches ({m * p} latent pixels a side at most)")
        if not (0 <= top < canvas_rows and 0 <= left < canvas_cols):
            raise ValueError(f"a {rows}x{cols} patch window at {(top, left)} is outside the "
                             f"{canvas_rows}x{canvas_cols} canvas")
        top += (m - canvas_rows) // 2
        left += (m - canvas_cols) // 2
        if top + rows > m or left + cols > m:  # a seamless tile across the wrap edge, counting on past the canvas
            p = self.config.patch_size
            raise UsageError(f"--seamless: a {canvas_rows * p}x{canvas_cols * p} latent with {rows * p}x{cols * p} "
                             f"tiles runs past this model's position grid of {m}x{m} patches; make the image or "
                             "--tile smaller")
        grid = self.pos_embed.view(m, m, -1)
        return grid[top:top + rows, left:left + cols].reshape(1, rows * cols, -1)

    def cropped_pos_embed(self, height: int, width: int) -> Tensor:
        """The reference's centre crop for a height x width latent (latent pixels)."""
        p = self.config.patch_size
        return self.pos_window(height // p, width // p)

    def positions(self, rows: int, cols: int, origin: Union[Sequence[int], Sequence[Sequence[int]], None] = None,
                  canvas: Optional[Sequence[int]] = None) -> Tensor:
        """`pos_window` for one origin (1, N, D), or for one origin per batch item (B, N, D): a batch of
        tiles of one canvas, each at its own place."""
        if origin is not None and len(origin) > 0 and not isinstance(origin[0], int):
            return torch.cat([self.pos_window(rows, cols, cast(Sequence[int], one), canvas) for one in origin])
        return self.pos_window(rows, cols, cast(Optional[Sequence[int]], origin), canvas)

    def forward(self, x: Tensor, t: Union[Tensor, float], y: Optional[Tensor] = None,
                context: Optional[Tensor] = None, *,
                pos_origin: Union[Sequence[int], Sequence[Sequence[int]], None] = None,
                pos_canvas: Optional[Sequence[int]] = None, skip_layers: Sequence[int] = ()) -> Tensor:
        """x (B, C, H, W) latent, t (B,) or scalar = sigma * 1000, y (B, adm) pooled text, context (B, L, ctx)
        text tokens -> velocity (B, C_out, H, W). `pos_origin` (one (top, left), or one per batch item) and
        `pos_canvas`: see `pos_window`. `skip_layers`: joint blocks to pass over, as the reference does for
        skip-layer guidance."""
        b, _, height, width = x.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise UsageError(f"MMDiT: a {height}x{width} latent is not a multiple of the patch size {p}")
        rows, cols = height // p, width // p
        tokens = self.x_embedder(x) + self.positions(rows, cols, pos_origin, pos_canvas).to(x.dtype)
        c = self.conditioning(t, y, b, x.dtype)
        text = self.context_embedder(context) if context is not None else x.new_zeros(b, 0, tokens.shape[-1])
        for index, block in enumerate(self.joint_blocks):  # the last text stream is pre-only: text becomes None
            if index not in skip_layers:
                text, tokens = block(text, tokens, c)
        return self.unpatchify(self.final_layer(tokens, c), rows, cols)

    def conditioning(self, t: Union[Tensor, float], y: Optional[Tensor], batch: int, dtype: torch.dtype) -> Tensor:
        """The adaLN input: timestep embedding plus pooled-text embedding, (B, D)."""
        t = torch.as_tensor(t, device=self.pos_embed.device).reshape(-1).expand(batch)
        c = self.t_embedder(timestep_embedding(t, TIME_FREQUENCIES).to(dtype))
        if y is not None:
            c = c + self.y_embedder(y.to(dtype))
        return c

    def unpatchify(self, tokens: Tensor, rows: int, cols: int) -> Tensor:
        """(B, rows*cols, p*p*C) -> (B, C, rows*p, cols*p)."""
        p, c = self.config.patch_size, self.config.out_channels
        out = tokens.reshape(tokens.shape[0], rows, cols, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(tokens.shape[0], c, rows * p, cols * p)


def _shape(shapes: Mapping[str, Sequence[int]], key: str) -> Sequence[int]:
    if key not in shapes:
        raise CheckpointError(f"MMDiT weights: {key} is missing (not an SD3 / SD3.5 transformer?)")
    return shapes[key]


def _block_indices(shapes: Mapping[str, Sequence[int]], suffix: str) -> list[int]:
    return sorted(int(key.split(".")[1]) for key in shapes if key.startswith("joint_blocks.") and key.endswith(suffix))


def mmdit_config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> MMDiTConfig:
    """The architecture of an MMDiT state dict (keys without `model.diffusion_model.`), read as the reference
    loader reads it: depth = x_embedder width // 64, patch size, the square position grid, pooled and context
    widths from the shapes; qk-norm and the dual-attention layers from which keys exist."""
    proj = _shape(shapes, "x_embedder.proj.weight")
    width, in_channels, patch_size = proj[0], proj[1], proj[2]
    depth = width // HEAD_DIM
    blocks = _block_indices(shapes, ".x_block.attn.qkv.weight")
    if width % HEAD_DIM or blocks != list(range(depth)) or depth == 0:
        raise CheckpointError(f"MMDiT weights: hidden width {width} needs {width // HEAD_DIM} joint blocks of "
                              f"64-wide heads, found {len(blocks)}")
    num_patches = _shape(shapes, "pos_embed")[1]
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise CheckpointError(f"MMDiT weights: pos_embed holds {num_patches} positions, not a square grid")
    final = _shape(shapes, "final_layer.linear.weight")
    adm = shapes.get("y_embedder.mlp.0.weight")
    mlp_hidden = _shape(shapes, "joint_blocks.0.x_block.mlp.fc1.weight")[0]
    return MMDiTConfig(
        depth=depth, patch_size=patch_size, in_channels=in_channels, out_channels=final[0] // patch_size ** 2,
        pos_embed_max_size=grid, adm_in_channels=adm[1] if adm is not None else None,
        context_in_channels=_shape(shapes, "context_embedder.weight")[1],
        mlp_hidden=None if mlp_hidden == 4 * width else mlp_hidden,
        qk_norm="joint_blocks.0.context_block.attn.ln_k.weight" in shapes,
        dual_attention_layers=tuple(_block_indices(shapes, ".x_block.attn2.qkv.weight")))
