"""Stable Diffusion 3 / 3.5 (Stability AI 2024): a rectified-flow MMDiT over 2x2 patches of a 16-channel KL
latent (factor 8, no quant convs; scale 1.5305, shift 0.0609), conditioned on CLIP-L and OpenCLIP bigG (pooled
and token embeddings) and T5-XXL tokens.

The single files (`sd3.5_large.safetensors`, `sd3.5_medium.safetensors`, `sd3_medium*.safetensors`) hold the
MMDiT under `model.diffusion_model.`, the VAE under `first_stage_model.` and, in some releases, the text
encoders under `text_encoders.{clip_l,clip_g,t5xxl}.`; ComfyUI also saves the transformer alone, prefixed or
bare; a diffusers folder (`transformer/`, `vae/`) is read as a bare transformer with a bare VAE. There is no reference config, so detection reads the architecture from the shapes (`Detection.config`,
an `ldmtool.TransformerBundle`) and reduced-width files load too. Which release a transformer is: dual
attention (3.5 medium), qk-norm (3.5 large) or neither (3 medium). The text encoders are not a bundle part:
the pipeline opens them from the file itself (`nets.text3.open_text_encoders`), so the bundle leaves their
keys out (`TransformerBundle.left_out_keys` records them).
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Optional

from ldmtool.families.base import Detection, Family, FlowRecipe, Shapes
from ldmtool.families.info import InpaintKind, ModelInfo
from ldmtool.families.transformer import autoencoder_only_info, transformer_info

TRANSFORMER_KEY = "joint_blocks.0.x_block.attn.qkv.weight"
SINGLE_FILE_PREFIX = "model.diffusion_model."  # the single files' and ComfyUI's; bare: ComfyUI's diffusion model
FIRST_STAGE_PREFIX = "first_stage_model."
SD3_SCALE, SD3_SHIFT = 1.5305, 0.0609  # the reference's SD3LatentFormat
PATCH = 2
REQUIRED_TEXT_ENCODERS = {"clip_l": "CLIP-L", "clip_g": "OpenCLIP bigG"}  # T5 is optional, as in the references
MISSING_AUTOENCODER = "the VAE (first_stage_model.*, as the full single files hold it)"
MISSING_TRANSFORMER = "an SD3 / SD3.5 transformer"
VAE_PRESET = "sd3-vae"


def _detect(shapes: Shapes) -> Optional[Detection]:
    from ldmtool.nets.autoencoder import autoencoder_config_from_shapes
    from ldmtool.nets.mmdit import mmdit_config_from_shapes
    from ldmtool.nets.sd3_files import mmdit_params, sd3_preset_for, split_sd3_single_file

    prefix = next((p for p in (SINGLE_FILE_PREFIX, "") if p + TRANSFORMER_KEY in shapes), None)
    if prefix is None:
        return None
    config = mmdit_config_from_shapes({k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)})
    name = sd3_preset_for(config)
    doc = _from_preset(name)
    params = doc["model"]["params"]
    params["denoiser_config"]["params"] = mmdit_params(config)
    if not prefix:  # a bare transformer: the bundle keeps the file's names, as FLUX.1's does
        params.update(denoiser_prefix="", denoiser_file_prefixes=[SINGLE_FILE_PREFIX])
    evidence: tuple[str, ...] = (f"SD3 MMDiT{' under ' + prefix if prefix else ''}", f"{config.depth} joint blocks",
                                 f"qk-norm: {'yes' if config.qk_norm else 'no'}",
                                 f"dual attention in {len(config.dual_attention_layers)} blocks")
    vae_prefix = _first_stage_prefix(shapes, prefix)
    if vae_prefix is not None:
        params["first_stage_config"]["params"].update(autoencoder_config_from_shapes(shapes, vae_prefix))
        params["first_stage_prefix"] = vae_prefix
        evidence += (f"16-channel VAE{' under ' + vae_prefix if vae_prefix else ''}",)
    else:
        for key in ("first_stage_config", "first_stage_prefix"):
            params.pop(key)
    encoders = sorted(split_sd3_single_file(shapes).text_encoders)
    if encoders:
        evidence += (f"text encoders: {', '.join(encoders)}",)
    return Detection(name, evidence=evidence, config=doc)


def _from_preset(name: str) -> dict[str, Any]:
    from ldmtool.checkpoints.presets import load_preset

    return copy.deepcopy(load_preset(name))


def _first_stage_prefix(shapes: Shapes, transformer_prefix: str) -> Optional[str]:
    """Where the VAE's keys are: under `first_stage_model.` (single files), bare beside a bare transformer (a
    diffusers folder, read under the released names), or nowhere (None)."""
    prefixes = (FIRST_STAGE_PREFIX, "") if not transformer_prefix else (FIRST_STAGE_PREFIX,)
    return next((p for p in prefixes if p + "decoder.conv_in.weight" in shapes), None)


def sd3_info(bundle: Any, family: Family) -> ModelInfo:
    """A `TransformerBundle` with an MMDiT and (single files) the VAE, or the VAE alone (`sd3-vae`)."""
    denoiser = bundle.denoiser
    if denoiser is None:
        return autoencoder_only_info(bundle, family, missing_transformer=MISSING_TRANSFORMER)
    info = transformer_info(bundle, family, patch=denoiser.config.patch_size, concat_channels=0,
                            inpaint_kind=InpaintKind.MASKED, missing_parts=_missing_parts(bundle))
    return replace(info, max_side=denoiser.config.pos_embed_max_size * info.pixel_multiple)


def _missing_parts(bundle: Any) -> tuple[str, ...]:
    """The VAE, and the CLIP towers the loaded file did not hold (its `text_encoders.*` keys, left out of the
    bundle: `TransformerBundle.left_out_keys`)."""
    from ldmtool.nets.sd3_files import split_sd3_single_file

    missing = [] if bundle.first_stage is not None else [MISSING_AUTOENCODER]
    held = set(split_sd3_single_file(dict.fromkeys(getattr(bundle, "left_out_keys", ()))).text_encoders)
    absent = [label for kind, label in REQUIRED_TEXT_ENCODERS.items() if kind not in held]
    if absent:
        missing.append(f"the {' and '.join(absent)} text encoder{'s' if len(absent) > 1 else ''}")
    return tuple(missing)


def _flow() -> FlowRecipe:
    from ldmtool.families.sd3_flow import SD3Flow

    return SD3Flow()

SD3 = Family(
    name="sd3",
    presets=("sd3.5-large", "sd3.5-medium", "sd3-medium", VAE_PRESET),
    detect=_detect,
    describe=sd3_info,
    flow=_flow,
    conditioner="CLIP-L and OpenCLIP bigG text (tokens and pooled) and T5-XXL tokens",
)
