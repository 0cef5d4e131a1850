"""Stable Diffusion XL (Podell et al. 2023; Stability AI's `sgm` code base): a UNet with transformer depth
per level, cross-attention to CLIP ViT-L/14 (layer 11) and OpenCLIP ViT-bigG/14 (penultimate layer) text,
and a vector `y` (pooled bigG text plus sinusoidal embeddings of the image's original size, crop and target
size) through `label_emb`; kl-f8 with scale factor 0.13025, eps. The refiner conditions on bigG alone and
an aesthetic score instead of the target size; the inpainting UNet takes mask and masked-image latent by
concat (9 channels).

Detection looks at the conditioner's embedders (which text towers, and in which slot) and what the UNet's
`label_emb` takes beyond the pooled text: 6 micro-conditioning values of 256 (base: 2816 = 1280 + 1536) or 5
(refiner: 2560 = 1280 + 1280); the difference holds for small models too.
"""
from __future__ import annotations

from typing import Any, Optional

from ldmtool.families.base import Detection, Family, Shapes, unet_in_channels
from ldmtool.families.compvis import run_defaults
from ldmtool.families.info import Conditioning, InpaintKind, ModelInfo, Parameterization

CLIP_L_TOKENS = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
BIGG_PROJECTION = "conditioner.embedders.{}.model.text_projection"
LABEL_EMB_IN = "model.diffusion_model.label_emb.0.0.weight"
MICRO_WIDTH = 256  # each micro-conditioning value's embedding width (ConcatTimestepEmbedderND outdim)
BASE_MICRO, REFINER_MICRO = 6, 5  # (original h, w, crop top, left, target h, w); aesthetic score for target


def _micro_values(shapes: Shapes, slot: int) -> Optional[int]:
    """How many micro-conditioning values `y` holds beside the pooled bigG text."""
    projection = BIGG_PROJECTION.format(slot)
    if LABEL_EMB_IN not in shapes or projection not in shapes:
        return None
    extra = int(shapes[LABEL_EMB_IN][1]) - int(shapes[projection][1])
    return extra // MICRO_WIDTH if extra % MICRO_WIDTH == 0 else None


def _detect(shapes: Shapes) -> Optional[Detection]:
    in_ch = unet_in_channels(shapes)
    if in_ch is None:
        return None
    if CLIP_L_TOKENS in shapes and _micro_values(shapes, 1) == BASE_MICRO:
        evidence = ("conditioner: CLIP ViT-L + OpenCLIP bigG", "label_emb: pooled text + 6 x 256")
        return Detection("sdxl-inpainting" if in_ch == 9 else "sdxl-base", evidence=evidence)
    if CLIP_L_TOKENS not in shapes and _micro_values(shapes, 0) == REFINER_MICRO:
        return Detection("sdxl-refiner", evidence=("conditioner: OpenCLIP bigG", "label_emb: pooled text + 5 x 256"))
    return None


def sdxl_info(bundle: Any, family: Family) -> ModelInfo:
    """A `DiffusionEngine` bundle (sgm config: network_config, conditioner_config, first_stage_config)."""
    params = bundle.config["model"]["params"]
    unet = params["network_config"]["params"]
    block = dict(bundle.config.get("ldmtool") or {})
    ddconfig = params["first_stage_config"]["params"]["ddconfig"]
    downsampling = 2 ** (len(ddconfig.get("ch_mult", (1, 2, 4, 4))) - 1)
    latent_channels = int(unet["out_channels"])
    concat_channels = int(unet["in_channels"]) - latent_channels
    native = int(unet.get("image_size", 128))
    return ModelInfo(
        family=bundle.family,
        entry=family.name,
        conditioning=Conditioning(bundle.conditioning_key),
        parameterization=Parameterization(bundle.parameterization),
        latent_channels=latent_channels,
        downsampling=downsampling,
        pixel_multiple=downsampling * 2 ** (len(unet.get("channel_mult", (1,))) - 1),
        native_latent=native,
        concat_channels=concat_channels,
        takes_text=True,
        class_count=None,
        inpaint_kind=InpaintKind.SD_HYBRID if concat_channels == latent_channels + 1 else InpaintKind.MASKED,
        label_classes=None,
        box_tokens=None,
        box_raster=False,
        raster_classes=(),
        defaults=run_defaults(block, downsampling, native),
        micro_conditioning=tuple(bundle.conditioner.size_keys),
        zero_empty_negative=bool(block.get("zero_empty_negative", "aesthetic_score" not in bundle.conditioner.size_keys)),
        aesthetic_scores=_aesthetic_scores(block, bundle.conditioner.size_keys),
    )


def _aesthetic_scores(block: dict[str, Any], size_keys: tuple[str, ...]) -> Optional[tuple[float, float]]:
    """The refiner's (prompt, negative) aesthetic scores: the `ldmtool:` block's, else the reference's 6 / 2.5."""
    if "aesthetic_score" not in size_keys:
        return None
    return float(block.get("aesthetic_score", 6.0)), float(block.get("negative_aesthetic_score", 2.5))


SDXL = Family(
    name="sdxl",
    presets=("sdxl-base", "sdxl-refiner", "sdxl-inpainting"),
    detect=_detect,
    describe=sdxl_info,
    conditioner="CLIP ViT-L/14 (layer 11) + OpenCLIP ViT-bigG/14 text (penultimate), pooled text and "
                "image-size micro-conditioning in y; the refiner bigG and an aesthetic score",
)
