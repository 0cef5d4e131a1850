"""ModelInfo of bundles built from CompVis-format configs (every family so far): read the config document
and the built modules once, at load time, so nothing downstream reads the document again."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from ldmtool.errors import CheckpointError
from ldmtool.families.base import Family
from ldmtool.families.info import (
    BoxTokens,
    Conditioning,
    InpaintKind,
    ModelInfo,
    Parameterization,
    RunDefaults,
)

# Cond stages whose `encode(list[str])` gives cross-attention context (the class names of their modules).
TEXT_ENCODERS = frozenset({"BERTEmbedder", "FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder"})


def diffusion_info(bundle: Any, family: Family) -> ModelInfo:
    """A latent diffusion bundle (UNet, first stage, optional cond stage)."""
    params = bundle.config["model"]["params"]
    unet = params["unet_config"]["params"]
    block = dict(bundle.config.get("ldmtool") or {})
    conditioning = _conditioning(bundle.conditioning_key)
    downsampling = first_stage_downsampling(params["first_stage_config"]["params"])
    latent_channels = int(unet["out_channels"])
    concat_channels = int(unet["in_channels"]) - latent_channels
    native = unet.get("image_size")
    defaults = run_defaults(block, downsampling, native)
    return ModelInfo(
        family=bundle.family,
        entry=family.name,
        conditioning=conditioning,
        parameterization=Parameterization(bundle.parameterization),
        latent_channels=latent_channels,
        downsampling=downsampling,
        pixel_multiple=downsampling * 2 ** (len(unet.get("channel_mult", (1,))) - 1),
        native_latent=None if native is None else int(native),
        concat_channels=concat_channels,
        takes_text=_stage_name(bundle.cond_stage) in TEXT_ENCODERS,
        class_count=int(bundle.cond_stage.n_classes) if _stage_name(bundle.cond_stage) == "ClassEmbedder" else None,
        inpaint_kind=_inpaint_kind(bundle, conditioning, concat_channels == latent_channels + 1),
        label_classes=_label_classes(bundle.cond_stage, conditioning, concat_channels),
        box_tokens=_box_tokens(params.get("cond_stage_config"), conditioning),
        box_raster=bool(block.get("box_raster")),
        raster_classes=tuple(c.get("name") for c in block.get("classes") or [] if isinstance(c, dict)),
        defaults=defaults,
        vocabulary=frozenset(block["vocabulary"]) if isinstance(block.get("vocabulary"), list) else None,
        trained_size=defaults.size if "training" in block else None,  # ldmtool-trained: the size it saw
        residual_base=_residual_base(block.get("residual")),
    )


def first_stage_info(bundle: Any, family: Family) -> ModelInfo:
    """A first-stage autoencoder alone (no sampling: generation defaults are those of an empty config)."""
    params = bundle.config["model"].get("params") or {}
    downsampling = first_stage_downsampling(params)
    return ModelInfo(
        family=bundle.family, entry=family.name, conditioning=Conditioning.NONE, parameterization=None,
        latent_channels=int(params.get("embed_dim") or params["ddconfig"]["z_channels"]),
        downsampling=downsampling, pixel_multiple=downsampling, native_latent=None, concat_channels=0,
        takes_text=False, class_count=None, inpaint_kind=None, label_classes=None, box_tokens=None,
        box_raster=False, raster_classes=(),
        defaults=run_defaults({}, downsampling, None),
    )


def run_defaults(block: Mapping[str, Any], downsampling: int, native: Any) -> RunDefaults:
    """The `ldmtool:` block's run defaults. The tile is `default_tile`, else the UNet's training size but
    at least 64 (small models trained on small crops are convolutional and run fine on 64² tiles, while 16²
    tiles would multiply the per-call overhead)."""
    tile = int(block.get("default_tile") or max(64, int(native if native is not None else 64)))
    width, height = block.get("default_size") or [tile * downsampling] * 2
    return RunDefaults(
        sampler=block.get("default_sampler") or "ddim",
        steps=block.get("default_steps") or None,
        cfg=float(block.get("default_cfg", 1.0)),
        temperature=float(block.get("default_temperature", 1.0)),
        size=(int(width), int(height)),
        tile=tile,
        noise_level=int(block.get("default_noise_level", 20)),
        colour_fix=block.get("colour_fix", False),
        consistency=block.get("consistency", False),
        guidance=None if block.get("default_guidance") is None else float(block["default_guidance"]),
        spacing=block.get("default_spacing") or None,
    )


def _residual_base(value: Any) -> Optional[str]:
    if value in (None, False):
        return None
    if value != "bicubic":
        raise CheckpointError(f"config ldmtool.residual {value!r} is not supported (known: bicubic)")
    return "bicubic"


def _conditioning(key: Optional[str]) -> Conditioning:
    try:
        return Conditioning(key)
    except ValueError:
        known = ", ".join(str(c.value) for c in Conditioning)
        raise CheckpointError(f"config conditioning_key {key!r} is not supported (known: {known})") from None


def first_stage_downsampling(first_stage_params: Mapping[str, Any]) -> int:
    """Image pixels per latent pixel of a first stage's CompVis params (KL/VQ autoencoder or PatchAutoencoder)."""
    if "patch_size" in first_stage_params:  # PatchAutoencoder
        return int(first_stage_params["patch_size"])
    # The autoencoder's own default when the config leaves ch_mult out (read at load time, it must not fail).
    ch_mult: Sequence[int] = first_stage_params["ddconfig"].get("ch_mult", (1, 2, 4, 8))
    factor: int = 2 ** (len(ch_mult) - 1)  # int ** int is typed Any (a negative power is a float)
    return factor


def _stage_name(stage: Any) -> Optional[str]:
    return None if stage is None else type(stage).__name__


def _inpaint_kind(bundle: Any, conditioning: Conditioning, mask_head: bool) -> Optional[InpaintKind]:
    """From the conditioning and whether the UNet takes latent + masked latent + mask."""
    text = _stage_name(bundle.cond_stage) in TEXT_ENCODERS
    if conditioning is Conditioning.CONCAT and mask_head and bundle.cond_stage is bundle.first_stage:
        return InpaintKind.LDM_CONCAT
    if conditioning is Conditioning.HYBRID and mask_head and text:
        return InpaintKind.SD_HYBRID
    if conditioning is Conditioning.NONE or (conditioning is Conditioning.CROSSATTN and text):
        return InpaintKind.MASKED
    return None


def _label_classes(stage: Any, conditioning: Conditioning, concat_channels: int) -> Optional[int]:
    """Semantic synthesis: the label map's classes (the rescaler's input channels, or the concat width)."""
    if conditioning is not Conditioning.CONCAT or _stage_name(stage) != "SpatialRescaler":
        return None
    if getattr(stage, "remap_output", False):
        return int(stage.channel_mapper.in_channels)
    return concat_channels


def _box_tokens(cond_config: Any, conditioning: Conditioning) -> Optional[BoxTokens]:
    """Layout models: a BERT cond stage that takes token ids (no text tokenizer), by cross-attention or
    beside a concatenated box raster."""
    if not isinstance(cond_config, dict) or not cond_config.get("target", "").endswith("BERTEmbedder"):
        return None
    params = cond_config.get("params", {})
    if params.get("use_tokenizer", True) or conditioning not in (Conditioning.CROSSATTN, Conditioning.HYBRID):
        return None
    return BoxTokens(vocab_size=int(params["vocab_size"]), max_seq_len=int(params["max_seq_len"]))
