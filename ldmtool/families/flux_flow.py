"""How FLUX.1 runs (the family's `FlowRecipe`): T5 tokens, pooled CLIP-L and, for dev, the distilled guidance value;
packed 2x2 patches with rotary (index, row, column) ids; the resolution-dependent time shift (dev) or none
(schnell), on the sigmas `FluxPipeline` passes, linspace(1, 1/n, n). No classifier-free guidance.

FLUX.1 Fill takes `Cond.concat` (the masked image's latent and the mask's 8x8 pixel blocks, at latent resolution)
beside the noisy latent: packed together, they are the 384-wide tokens of BFL's and diffusers' Fill input.

A tile of the tiled engine gets its global place through its image ids: each token's row and column are those of
its patch in the whole canvas (`Cond.position`, cropped per tile), so a tile that covers the canvas is the untiled
call exactly.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ldmtool.errors import UsageError
from ldmtool.families.base import FlowCall
from ldmtool.nets.t5 import FLUX_DEV_PADDING, FLUX_SCHNELL_PADDING, T5Padding

PATCH = 2


class FluxFlow:
    name = "FLUX.1"
    required_encoders: tuple[str, ...] = ("clip_l", "t5xxl")
    t5_tokenizer_folder = "tokenizer_2"  # in a diffusers FLUX.1 folder
    encoder_folders: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    takes_cfg = False

    def takes_guidance(self, bundle: Any) -> bool:
        return bool(bundle.denoiser.guidance_embed)

    def t5_padding(self, bundle: Any) -> T5Padding:
        return FLUX_DEV_PADDING if self.takes_guidance(bundle) else FLUX_SCHNELL_PADDING

    def times(self, bundle: Any, latent_hw: tuple[int, int]) -> Any:
        """dev: the exponential shift with mu from the image's token count; schnell: no shift."""
        from ldmtool.diffusion.flow import FlowSpacing, FlowTimes, TimeShift, image_tokens, resolution_mu

        if not self.takes_guidance(bundle):
            return FlowTimes(TimeShift(1.0), FlowSpacing.UNIFORM)
        return FlowTimes(TimeShift(mu=resolution_mu(image_tokens(latent_hw, PATCH))), FlowSpacing.UNIFORM)

    def encode(self, bundle: Any, encoders: Any, texts: Sequence[str], *, negative: bool, clip_skip: Optional[int]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 tokens (B, L, 4096), pooled CLIP-L (B, 768)); FLUX.1 reads no CLIP hidden layer (no clip skip)."""
        from ldmtool.nets.text3 import flux_text_conditioning

        if clip_skip is not None:
            raise UsageError(f"--clip-skip {clip_skip}: FLUX.1 reads only CLIP-L's pooled output; drop --clip-skip")
        found = flux_text_conditioning(encoders, texts)
        return found.txt, found.y

    def network(self, bundle: Any, canvas_hw: tuple[int, int], guidance: Optional[float], dtype: torch.dtype
                ) -> FlowCall:
        net = bundle.denoiser

        def velocity(x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            b, _, h, w = x_t.shape
            img_ids = image_ids(origins(cond.position, b), h // PATCH, w // PATCH).to(x_t.device, dtype)
            txt = cond.crossattn.to(dtype)
            txt_ids = txt.new_zeros(b, txt.shape[1], 3)
            g = None if guidance is None else torch.full((b,), guidance, device=x_t.device, dtype=dtype)
            x_in = x_t if cond.concat is None else torch.cat([x_t, cond.concat.to(x_t.dtype)], dim=1)  # Fill's input
            out = net(pack(x_in.to(dtype)), img_ids, txt, txt_ids, t.to(dtype), cond.y.to(dtype), guidance=g)
            return unpack(out.float(), h, w)

        return velocity


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latent -> (B, h/2 * w/2, 4C) tokens of 2x2 patches, channels first within a token."""
    b, c, h, w = z.shape
    patches = z.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for an h x w latent."""
    b, _, width = tokens.shape
    c = width // (PATCH * PATCH)
    patches = tokens.reshape(b, h // PATCH, w // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, h, w)


def origins(position: Optional[torch.Tensor], batch: int) -> list[tuple[int, int]]:
    """Each row's (top, left) in latent pixels: the top-left entry of its `Cond.position`, else (0, 0)."""
    if position is None:
        return [(0, 0)] * batch
    return [(int(r), int(c)) for r, c in position[:, :, 0, 0].tolist()]


def image_ids(places: Sequence[tuple[int, int]], rows: int, cols: int) -> torch.Tensor:
    """(B, rows * cols, 3) ids (0, row, column) of each patch, counted in the whole canvas from each place."""
    out = torch.zeros(len(places), rows, cols, 3)
    for i, (top, left) in enumerate(places):
        out[i, ..., 1] = torch.arange(rows)[:, None] + top // PATCH
        out[i, ..., 2] = torch.arange(cols)[None] + left // PATCH
    return out.reshape(len(places), rows * cols, 3)
