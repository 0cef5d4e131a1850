"""Stable Diffusion 2.x: cross-attention to OpenCLIP ViT-H/14 text (penultimate layer), kl-f8; eps (512)
or v (768-v: the weights do not record it, the preset does); the 9-channel inpainting UNet (hybrid); and
the x4 upscaler (low-res image by concat, noise level as `y` through `label_emb`, kl-f4; hybrid-adm)."""
from __future__ import annotations

from typing import Optional

from ldmtool.families.base import Detection, Family, Shapes, unet_in_channels
from ldmtool.families.compvis import diffusion_info

OPENCLIP_TOKENS = "cond_stage_model.model.token_embedding.weight"
LOW_SCALE_BETAS = "low_scale_model.betas"


def _detect(shapes: Shapes) -> Optional[Detection]:
    in_ch = unet_in_channels(shapes)
    if in_ch is None or OPENCLIP_TOKENS not in shapes:
        return None
    if LOW_SCALE_BETAS in shapes or in_ch == 7:
        return Detection("sd2-x4-upscaler")
    if in_ch == 9:
        return Detection("sd2-inpainting")
    return Detection("sd2", ("sd2-v",), "v-prediction is not recorded in the weights: for 768-v "
                     "checkpoints use --preset sd2-v or --prediction v")


SD2 = Family(
    name="sd2",
    presets=("sd2", "sd2-v", "sd2-inpainting", "sd2-x4-upscaler"),
    detect=_detect,
    describe=diffusion_info,
    conditioner="OpenCLIP ViT-H/14 text (penultimate layer); the x4 upscaler also a low-res image and its noise level",
)
