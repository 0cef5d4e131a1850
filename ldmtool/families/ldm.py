"""CompVis latent diffusion (Rombach et al. 2022): the released LDM kinds and their first stages.

The kinds share one architecture family (UNet + KL/VQ first stage + an optional cond stage) and differ in
what conditions them: nothing, the first stage itself (inpainting), a low-res image (super-resolution), a
label map, box tokens, BERT text or ImageNet classes.
"""
from __future__ import annotations

import re
from typing import Optional

from ldmtool.families.base import UNET_IN, Detection, Family, Shapes, unet_in_channels
from ldmtool.families.compvis import diffusion_info, first_stage_info

BERT_POSITIONS = "cond_stage_model.transformer.pos_emb.emb.weight"
CLASS_EMBEDDING = "cond_stage_model.embedding.weight"
RESCALER = "cond_stage_model.channel_mapper.weight"
FIRST_STAGE_IN_COND = "cond_stage_model.encoder.conv_in.weight"
FIRST_STAGE_PREFIX = "first_stage_model."

KL_BY_FACTOR = {4: "kl-f4", 8: "kl-f8", 16: "kl-f16", 32: "kl-f32"}
VQ_BY_FACTOR = {8: "vq-f8", 16: "vq-f16"}


def _levels(shapes: Shapes, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"encoder\.down\.(\d+)\.")
    return len({m.group(1) for k in shapes if (m := pattern.match(k))})


def detect_first_stage(shapes: Shapes, prefix: str = "") -> Optional[Detection]:
    """A KL or VQ autoencoder by its depth (downsampling factor), quantizer and mid-block attention."""
    factor = 2 ** (_levels(shapes, prefix) - 1)
    family: Optional[str]
    if f"{prefix}quantize.embedding.weight" in shapes:
        if factor == 4:
            family = "vq-f4" if f"{prefix}encoder.mid.attn_1.q.weight" in shapes else "vq-f4-noattn"
        else:
            family = VQ_BY_FACTOR.get(factor)
    else:
        family = KL_BY_FACTOR.get(factor)
    if family is None:
        return None
    return Detection(family, evidence=(f"first stage factor {factor}",))


def _detect_autoencoder(shapes: Shapes) -> Optional[Detection]:
    if UNET_IN in shapes:
        return None
    for prefix in ("", FIRST_STAGE_PREFIX):
        if f"{prefix}encoder.conv_in.weight" in shapes:
            return detect_first_stage(shapes, prefix)
    return None


def _detect_diffusion(shapes: Shapes) -> Optional[Detection]:
    """Checked after the SD families: the last rules take any UNet with a first stage."""
    in_ch = unet_in_channels(shapes)
    if in_ch is None:
        return None
    first = detect_first_stage(shapes, FIRST_STAGE_PREFIX)
    vq = first is not None and first.family.startswith("vq")
    if BERT_POSITIONS in shapes:
        if int(shapes[BERT_POSITIONS][0]) != 77:
            return Detection("ldm-layout2img-openimages256")
        return Detection("ldm-text2img256" if vq else "ldm-txt2img-1p4b")
    if CLASS_EMBEDDING in shapes:
        return Detection("ldm-cin256-v2" if in_ch == 3 else "ldm-cin256")
    if RESCALER in shapes:
        return Detection("ldm-semantic-synthesis256", ("ldm-semantic-synthesis512",))
    if FIRST_STAGE_IN_COND in shapes or (vq and in_ch == 7):
        return Detection("ldm-inpainting-big")
    if vq and in_ch == 6:
        return Detection("ldm-bsr-sr")
    if first is not None and not vq:
        return Detection("ldm-lsun-churches256")
    if vq:
        return Detection("ldm-celebahq256", ("ldm-ffhq256", "ldm-lsun-bedrooms256"))
    return None


LDM = Family(
    name="ldm",
    presets=("ldm-bsr-sr", "ldm-inpainting-big", "ldm-semantic-synthesis256", "ldm-semantic-synthesis512",
             "ldm-layout2img-openimages256", "ldm-text2img256", "ldm-txt2img-1p4b", "ldm-cin256", "ldm-cin256-v2",
             "ldm-celebahq256", "ldm-ffhq256", "ldm-lsun-churches256", "ldm-lsun-bedrooms256"),
    detect=_detect_diffusion,
    describe=diffusion_info,
    conditioner="none, first stage, low-res image, label map, box tokens, LDM-BERT text or ImageNet class",
)

LDM_FIRST_STAGES = Family(
    name="ldm-first-stage",
    presets=("kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f4-noattn", "vq-f8", "vq-f16"),
    detect=_detect_autoencoder,
    describe=first_stage_info,
)
