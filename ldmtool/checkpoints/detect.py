"""Family detection from key names and shapes (used when no --config or --preset is given).

Rules look at structure only (which conditioner is present, UNet input channels, first-stage kind and
depth, vocabulary and sequence sizes), never at widths, so they hold for small models of a family as
well as for the released checkpoints. Some families share one architecture; the weights cannot tell them
apart, so detection names the first and lists the others as `alternatives`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

Shapes = Mapping[str, Sequence[int]]

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
CLIP_TOKENS = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
OPENCLIP_TOKENS = "cond_stage_model.model.token_embedding.weight"
BERT_POSITIONS = "cond_stage_model.transformer.pos_emb.emb.weight"
CLASS_EMBEDDING = "cond_stage_model.embedding.weight"
RESCALER = "cond_stage_model.channel_mapper.weight"


@dataclass(frozen=True)
class Detection:
    family: str
    alternatives: tuple[str, ...] = ()
    note: str = ""
    evidence: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        alt = f" (same architecture as {', '.join(self.alternatives)})" if self.alternatives else ""
        return f"{self.family}{alt}{'; ' + self.note if self.note else ''}"


def detect_family(shapes: Shapes) -> Optional[Detection]:
    """The most likely family for a checkpoint's keys/shapes, or None when nothing matches."""
    if UNET_IN in shapes:
        return _diffusion_family(shapes)
    for prefix in ("", "first_stage_model."):
        if f"{prefix}encoder.conv_in.weight" in shapes:
            return _first_stage_family(shapes, prefix)
    return None


def _levels(shapes: Shapes, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"encoder\.down\.(\d+)\.")
    return len({m.group(1) for k in shapes if (m := pattern.match(k))})


def _first_stage_family(shapes: Shapes, prefix: str = "") -> Optional[Detection]:
    factor = 2 ** (_levels(shapes, prefix) - 1)
    if f"{prefix}quantize.embedding.weight" in shapes:
        attn = f"{prefix}encoder.mid.attn_1.q.weight" in shapes
        family = {4: "vq-f4" if attn else "vq-f4-noattn", 8: "vq-f8", 16: "vq-f16"}.get(factor)
    else:
        family = {4: "kl-f4", 8: "kl-f8", 16: "kl-f16", 32: "kl-f32"}.get(factor)
    if family is None:
        return None
    return Detection(family, evidence=(f"first stage factor {factor}",))


def _diffusion_family(shapes: Shapes) -> Optional[Detection]:
    in_ch = int(shapes[UNET_IN][1])
    first = _first_stage_family(shapes, "first_stage_model.")
    vq = first is not None and first.family.startswith("vq")
    if CLIP_TOKENS in shapes:
        return Detection("sd1-inpainting" if in_ch == 9 else "sd1")
    if OPENCLIP_TOKENS in shapes:
        if "low_scale_model.betas" in shapes or in_ch == 7:
            return Detection("sd2-x4-upscaler")
        if in_ch == 9:
            return Detection("sd2-inpainting")
        return Detection("sd2", ("sd2-v",), "v-prediction is not recorded in the weights: for 768-v "
                         "checkpoints use --preset sd2-v or --prediction v")
    if BERT_POSITIONS in shapes:
        if int(shapes[BERT_POSITIONS][0]) != 77:
            return Detection("ldm-layout2img-openimages256")
        return Detection("ldm-text2img256" if vq else "ldm-txt2img-1p4b")
    if CLASS_EMBEDDING in shapes:
        return Detection("ldm-cin256-v2" if in_ch == 3 else "ldm-cin256")
    if RESCALER in shapes:
        return Detection("ldm-semantic-synthesis256", ("ldm-semantic-synthesis512",))
    if "cond_stage_model.encoder.conv_in.weight" in shapes or (vq and in_ch == 7):
        return Detection("ldm-inpainting-big")
    if vq and in_ch == 6:
        return Detection("ldm-bsr-sr")
    if first is not None and not vq:
        return Detection("ldm-lsun-churches256")
    if vq:
        return Detection("ldm-celebahq256", ("ldm-ffhq256", "ldm-lsun-bedrooms256"))
    return None
