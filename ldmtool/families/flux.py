"""FLUX.1 (Black Forest Labs 2024): a rectified-flow transformer over packed 2x2 patches of a 16-channel
KL latent (factor 8, no quant convs; scale 0.3611, shift 0.1159), conditioned on T5-XXL token embeddings,
a pooled CLIP-L vector and, in the guidance-distilled dev models, the guidance value itself.

BFL ship the parts as separate files: the transformer (`flux1-dev.safetensors`, schnell, Fill, Krea-dev;
keys without a prefix, or under ComfyUI's `model.diffusion_model.`) and the autoencoder (`ae.safetensors`).
Neither has a reference config, so detection reads the architecture from the shapes (`Detection.config`,
built into an `ldmtool.TransformerBundle`) and reduced-width files of the same layout load too. Which preset
a transformer is: guidance embedding (dev) or not (schnell), and Fill's 384-wide input (latent, masked
latent and 8x8 mask, packed).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

from ldmtool.families.base import Detection, Family, Shapes
from ldmtool.families.compvis import run_defaults
from ldmtool.families.info import Conditioning, InpaintKind, ModelInfo, Parameterization

TRANSFORMER_KEY = "double_blocks.0.img_attn.norm.key_norm.scale"
TRANSFORMER_PREFIXES = ("", "model.diffusion_model.")  # BFL's files, ComfyUI's
AUTOENCODER_KEYS = ("encoder.conv_in.weight", "decoder.conv_in.weight")
FILL_IN = 384  # packed (latent 16 + masked latent 16 + mask 64) x 2x2
PATCH = 2  # the transformer's tokens are 2x2 latent patches
LATENT_CHANNELS, DOWNSAMPLING = 16, 8  # of the FLUX.1 autoencoder (for a transformer file alone)
NATIVE_LATENT = 128  # 1024 px
MISSING_AUTOENCODER = "the autoencoder (ae.safetensors)"
MISSING_TEXT_ENCODERS = "the text encoders (CLIP-L and T5-XXL)"
MISSING_TRANSFORMER = "a FLUX.1 transformer"


def _from_preset(name: str, part: str, params: dict[str, Any]) -> dict[str, Any]:
    """The preset's document with one part's architecture replaced by the one the shapes record."""
    from ldmtool.checkpoints.presets import load_preset

    doc = copy.deepcopy(load_preset(name))
    doc["model"]["params"][f"{part}_config"]["params"].update(params)
    return doc


def _transformer_preset(params: dict[str, Any]) -> str:
    if not params["guidance_embed"]:
        return "flux1-schnell"
    return "flux1-fill-dev" if params["in_channels"] == FILL_IN else "flux1-dev"


def _detect(shapes: Shapes) -> Optional[Detection]:
    from ldmtool.nets.autoencoder import autoencoder_config_from_shapes
    from ldmtool.nets.flux import flux_config_from_shapes

    prefix = next((p for p in TRANSFORMER_PREFIXES if p + TRANSFORMER_KEY in shapes), None)
    if prefix is not None:
        params = flux_config_from_shapes(shapes, prefix)
        name = _transformer_preset(params)
        evidence = (f"FLUX.1 transformer{' under ' + prefix if prefix else ''}",
                    f"guidance embedding: {'yes' if params['guidance_embed'] else 'no'}",
                    f"input width {params['in_channels']}")
        return Detection(name, evidence=evidence, config=_from_preset(name, "denoiser", params))
    if _is_flux_autoencoder(shapes):
        params = autoencoder_config_from_shapes(shapes)
        return Detection("flux-ae", evidence=(f"KL autoencoder without quant convs, {params['z_channels']} latent "
                                              "channels",), config=_from_preset("flux-ae", "first_stage", params))
    return None


def _is_flux_autoencoder(shapes: Shapes) -> bool:
    """BFL's autoencoder layout: the CompVis encoder/decoder names, but no quant convs or codebook."""
    return all(k in shapes for k in AUTOENCODER_KEYS) and "quant_conv.weight" not in shapes \
        and "quantize.embedding.weight" not in shapes


def flux_info(bundle: Any, family: Family) -> ModelInfo:
    """A `TransformerBundle` with a FLUX.1 transformer, an autoencoder, or both."""
    block = dict(bundle.config.get("ldmtool") or {})
    params = bundle.config["model"]["params"]
    first = (params.get("first_stage_config") or {}).get("params") if bundle.first_stage is not None else None
    latent = int(first["z_channels"]) if first else LATENT_CHANNELS
    downsampling = 2 ** (len(first["ch_mult"]) - 1) if first else DOWNSAMPLING
    missing = [] if bundle.first_stage is not None else [MISSING_AUTOENCODER]
    denoiser = bundle.denoiser
    if denoiser is None:
        return ModelInfo(
            family=bundle.family, entry=family.name, conditioning=Conditioning.NONE, parameterization=None,
            latent_channels=latent, downsampling=downsampling, pixel_multiple=downsampling, native_latent=None,
            concat_channels=0, takes_text=False, class_count=None, inpaint_kind=None, label_classes=None,
            box_tokens=None, box_raster=False, raster_classes=(), defaults=run_defaults(block, downsampling, None),
            missing_parts=(MISSING_TRANSFORMER,),
        )
    concat = (denoiser.in_channels - denoiser.out_channels) // PATCH ** 2
    return ModelInfo(
        family=bundle.family,
        entry=family.name,
        conditioning=Conditioning.CROSSATTN_ADM,  # text tokens joined to the image's, pooled text in `vec`
        parameterization=Parameterization(bundle.parameterization),
        latent_channels=latent,
        downsampling=downsampling,
        pixel_multiple=downsampling * PATCH,
        native_latent=NATIVE_LATENT,
        concat_channels=concat,
        takes_text=False,  # no text encoder is loaded with a transformer file (see missing_parts)
        class_count=None,
        # Fill's own conditioning (masked latent and packed mask) joins with FLUX.1 inpainting.
        inpaint_kind=None if concat else InpaintKind.MASKED,
        label_classes=None,
        box_tokens=None,
        box_raster=False,
        raster_classes=(),
        defaults=run_defaults(block, downsampling, NATIVE_LATENT),
        missing_parts=(*missing, MISSING_TEXT_ENCODERS),
    )


FLUX = Family(
    name="flux",
    presets=("flux1-dev", "flux1-schnell", "flux1-fill-dev", "flux-ae"),
    detect=_detect,
    describe=flux_info,
    conditioner="T5-XXL text tokens, pooled CLIP ViT-L/14 text and (dev) the distilled guidance value",
)
