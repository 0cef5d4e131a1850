"""Attention stages of a tiled first stage, in query chunks against keys and values kept off-device (the
reference AttnBlock: GroupNorm, 1x1 q/k/v, single-head softmax, proj_out, residual)."""
from __future__ import annotations

import torch
from torch import Tensor

from ldmtool.tiling.vae_norms import chunked_group_stats, group_norm
from ldmtool.tiling.vae_stages import Stage, device_dtype
from ldmtool.tiling.vae_store import VAETiling


@torch.no_grad()
def attention_stage(stage: Stage, x: Tensor, config: VAETiling, query_tokens: int = 2**13,
                    key_tokens: int = 2**12) -> Tensor:
    """An attention stage over the whole (off-device) canvas `x`, with bounded device memory.

    GroupNorm statistics are gathered chunk by chunk (float64); keys and values are computed per chunk and
    kept on `x`'s device; each chunk of queries attends to them block by block with an online softmax.
    Modules that do not look like the reference AttnBlock run whole on their device.
    """
    block = stage.modules[0]
    device, dtype = device_dtype([stage], x)
    if not all(hasattr(block, name) for name in ("norm", "q", "k", "v", "proj_out")):
        return stage.run(x.to(device=device, dtype=dtype)).to(x.device)
    rows = max(1, query_tokens // x.shape[-1])
    chunks = [(r, min(r + rows, x.shape[-2])) for r in range(0, x.shape[-2], rows)]
    load = lambda r0, r1: x[..., r0:r1, :].to(device=device, dtype=dtype)  # noqa: E731
    stats = chunked_group_stats(block.norm, (load(r0, r1) for r0, r1 in chunks))
    tokens = lambda conv, h: conv(h).flatten(2).transpose(1, 2)  # (B, n, C)  # noqa: E731
    keys, values = [], []
    for r0, r1 in chunks:
        h = group_norm(load(r0, r1), block.norm, *stats)
        keys.append(tokens(block.k, h).to(x.device))
        values.append(tokens(block.v, h).to(x.device))
    keys, values = torch.cat(keys, 1), torch.cat(values, 1)
    out = torch.empty_like(x)
    for r0, r1 in chunks:
        xc = load(r0, r1)
        attended = online_softmax_attention(tokens(block.q, group_norm(xc, block.norm, *stats)), keys, values,
                                            key_tokens)
        b, c, height, width = xc.shape
        projected = block.proj_out(attended.transpose(1, 2).reshape(b, c, height, width))
        out[..., r0:r1, :] = (xc + projected).to(x.device)
    return out


def online_softmax_attention(q: Tensor, keys: Tensor, values: Tensor, block: int) -> Tensor:
    """softmax(q k^T / sqrt(C)) v for q (B, n, C) on the device, keys/values (B, N, C) anywhere, in key blocks.

    Scores and the running maximum, normaliser and sum are float32, so fp16 models cannot overflow here.
    """
    q32 = q.float() * q.shape[-1] ** -0.5
    running_max = q32.new_full(q32.shape[:2], float("-inf"))
    normaliser = q32.new_zeros(q32.shape[:2])
    total = torch.zeros_like(q32)
    for k0 in range(0, keys.shape[1], block):
        k_block = keys[:, k0 : k0 + block].to(q.device, torch.float32)
        v_block = values[:, k0 : k0 + block].to(q.device, torch.float32)
        weights = q32 @ k_block.transpose(1, 2)  # (B, n, block) scores, made weights in place below
        new_max = torch.maximum(running_max, weights.amax(-1))
        weights.sub_(new_max[..., None]).exp_()  # in place: one (n, block) buffer instead of three
        correction = torch.exp(running_max - new_max)
        normaliser = normaliser * correction + weights.sum(-1)
        total = total * correction[..., None] + weights @ v_block
        running_max = new_max
    return (total / normaliser[..., None]).to(q.dtype)
