"""How SD3 / SD3.5 run (the family's `FlowRecipe`): CLIP-L and bigG (tokens and pooled) plus T5 tokens, classifier-free
guidance with a negative prompt, the MMDiT called as the reference (`t = sigma * 1000`), and the static time shift
3.0 on the train-range schedule of `StableDiffusion3Pipeline`'s scheduler.

A tile of the tiled engine gets the positional embedding of its place in the canvas: its origin is the top-left
entry of its `Cond.position` crop and the canvas is the whole latent (`MMDiT.pos_window`), so a tile that covers the
canvas is the untiled call exactly.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ldmtool.families.base import FlowCall
from ldmtool.families.flux_flow import origins
from ldmtool.nets.t5 import SD3_PADDING, T5Padding

SHIFT = 3.0  # the references' (sd3_infer.py, diffusers' scheduler config) for SD3 and SD3.5


class SD3Flow:
    name = "SD3"
    required_encoders: tuple[str, ...] = ("clip_l", "clip_g")  # T5 is optional, as in the references (zeros in its place)
    t5_tokenizer_folder = "tokenizer_3"  # in a diffusers SD3 folder
    encoder_folders: tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    takes_cfg = True

    def takes_guidance(self, bundle: Any) -> bool:
        return False

    def t5_padding(self, bundle: Any) -> T5Padding:
        return SD3_PADDING

    def times(self, bundle: Any, latent_hw: tuple[int, int]) -> Any:
        from ldmtool.diffusion.flow import FlowSpacing, FlowTimes, TimeShift

        return FlowTimes(TimeShift(SHIFT), FlowSpacing.TRAIN_RANGE)

    def encode(self, bundle: Any, encoders: Any, texts: Sequence[str], *, negative: bool, clip_skip: Optional[int]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, 77 + T5 tokens, width), pooled (B, 2048)). `clip_skip` counts as A1111's (2: the penultimate
        layer, the references' default); it applies to prompts only, as in diffusers."""
        from ldmtool.errors import UsageError
        from ldmtool.nets.text3 import sd3_text_conditioning

        if clip_skip == 1:
            raise UsageError("--clip-skip 1: SD3 reads CLIP's penultimate layer or an earlier one (--clip-skip 2 or more)")
        skip = None if negative or clip_skip is None else clip_skip - 2  # diffusers' count: layers before the penultimate
        found = sd3_text_conditioning(encoders, texts, guidance=False, clip_skip=skip,
                                      context_width=bundle.denoiser.config.context_in_channels)
        return found.context, found.pooled

    def network(self, bundle: Any, canvas_hw: tuple[int, int], guidance: Optional[float], dtype: torch.dtype
                ) -> FlowCall:
        mmdit = bundle.denoiser
        p = mmdit.config.patch_size
        canvas = (canvas_hw[0] // p, canvas_hw[1] // p)

        def velocity(x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            places = [(top // p, left // p) for top, left in origins(cond.position, x_t.shape[0])]
            out: torch.Tensor = mmdit(x_t.to(dtype), t.to(dtype) * 1000, y=cond.y.to(dtype), context=cond.crossattn.to(dtype),
                        pos_origin=places, pos_canvas=canvas)
            return out.float()

        return velocity
