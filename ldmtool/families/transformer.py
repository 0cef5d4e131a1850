"""What FLUX.1 and SD3 share in describing a `TransformerBundle`: a 16-channel, factor-8 latent (read from the
autoencoder when the bundle has one), and the ModelInfo of an autoencoder-only or a transformer bundle."""
from __future__ import annotations

from typing import Any, Optional

from ldmtool.families.base import Family
from ldmtool.families.compvis import run_defaults
from ldmtool.families.info import Conditioning, InpaintKind, ModelInfo, Parameterization

LATENT_CHANNELS, DOWNSAMPLING = 16, 8  # of both families' autoencoders (for a transformer file alone)
NATIVE_LATENT = 128  # 1024 px


def latent_geometry(bundle: Any) -> tuple[int, int]:
    """(latent channels, downsampling factor): the bundle's autoencoder's, else the families' shared values."""
    params = bundle.config["model"]["params"]
    first = (params.get("first_stage_config") or {}).get("params") if bundle.first_stage is not None else None
    if not first:
        return LATENT_CHANNELS, DOWNSAMPLING
    return int(first["z_channels"]), 2 ** (len(first["ch_mult"]) - 1)


def autoencoder_only_info(bundle: Any, family: Family, *, missing_transformer: str, not_runnable: str = "") -> ModelInfo:
    """A bundle holding only the autoencoder: it encodes and decodes, and names the transformer it lacks."""
    latent, downsampling = latent_geometry(bundle)
    return ModelInfo(
        family=bundle.family, entry=family.name, conditioning=Conditioning.NONE, parameterization=None,
        latent_channels=latent, downsampling=downsampling, pixel_multiple=downsampling, native_latent=None,
        concat_channels=0, takes_text=False, class_count=None, inpaint_kind=None, label_classes=None,
        box_tokens=None, box_raster=False, raster_classes=(), defaults=run_defaults(_block(bundle), downsampling, None),
        missing_parts=(missing_transformer,), not_runnable=not_runnable,
    )


def transformer_info(bundle: Any, family: Family, *, patch: int, concat_channels: int,
                     inpaint_kind: Optional[InpaintKind], missing_parts: tuple[str, ...],
                     not_runnable: str = "") -> ModelInfo:
    """A bundle with a text-conditioned transformer on `patch`x`patch` latent patches: text tokens joined to the
    image's, pooled text as a vector (CROSSATTN_ADM); no text encoder is a bundle part (`missing_parts`)."""
    latent, downsampling = latent_geometry(bundle)
    return ModelInfo(
        family=bundle.family,
        entry=family.name,
        conditioning=Conditioning.CROSSATTN_ADM,
        parameterization=Parameterization(bundle.parameterization),
        latent_channels=latent,
        downsampling=downsampling,
        pixel_multiple=downsampling * patch,
        native_latent=NATIVE_LATENT,
        concat_channels=concat_channels,
        takes_text=False,
        class_count=None,
        inpaint_kind=inpaint_kind,
        label_classes=None,
        box_tokens=None,
        box_raster=False,
        raster_classes=(),
        defaults=run_defaults(_block(bundle), downsampling, NATIVE_LATENT),
        missing_parts=missing_parts,
        not_runnable=not_runnable,
    )


def _block(bundle: Any) -> dict[str, Any]:
    return dict(bundle.config.get("ldmtool") or {})
