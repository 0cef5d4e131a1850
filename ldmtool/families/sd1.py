"""Stable Diffusion 1.x: UNet with cross-attention to CLIP ViT-L/14 text (last layer), kl-f8, eps; the
9-channel inpainting UNet takes mask and masked-image latent by concat besides the text (hybrid)."""
from __future__ import annotations

from typing import Optional

from ldmtool.families.base import Detection, Family, Shapes, unet_in_channels
from ldmtool.families.compvis import diffusion_info

CLIP_TOKENS = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def _detect(shapes: Shapes) -> Optional[Detection]:
    in_ch = unet_in_channels(shapes)
    if in_ch is None or CLIP_TOKENS not in shapes:
        return None
    return Detection("sd1-inpainting" if in_ch == 9 else "sd1")


SD1 = Family(
    name="sd1",
    presets=("sd1", "sd1-inpainting"),
    detect=_detect,
    describe=diffusion_info,
    conditioner="CLIP ViT-L/14 text",
)
