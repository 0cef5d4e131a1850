"""What an SD3 / SD3.5 single file holds, and the configs of its released models.

A single file (`sd3.5_large.safetensors`, `sd3.5_medium.safetensors`, `sd3_medium*.safetensors`) holds the
MMDiT under `model.diffusion_model.`, the 16-channel KL autoencoder under `first_stage_model.` and, in some
releases, the text encoders under `text_encoders.clip_l.`, `text_encoders.clip_g.` and `text_encoders.t5xxl.`.
`split_sd3_single_file` separates them. The autoencoder's keys are those of the LDM `Encoder` / `Decoder`
(`encoder.*`, `decoder.*`), without the `quant_conv` / `post_quant_conv` the LDM first stages have, so it
loads into `UnquantizedAutoencoderKL` built from `SD3_FIRST_STAGE_PARAMS`. The reference's latent scaling
(`SD3LatentFormat`) is `(z - SD3_SHIFT_FACTOR) * SD3_SCALE_FACTOR`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Optional, TypeVar

from ldmtool.nets.autoencoder import AutoencoderKL
from ldmtool.nets.mmdit import MMDiT, MMDiTConfig

V = TypeVar("V")

SD3_SCALE_FACTOR = 1.5305
SD3_SHIFT_FACTOR = 0.0609

SD3_FIRST_STAGE_PARAMS: dict[str, Any] = {
    "embed_dim": 16,
    "ddconfig": {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3,
                 "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
}

SD3_PRESETS: dict[str, MMDiTConfig] = {
    "sd3-medium": MMDiTConfig(depth=24, pos_embed_max_size=192),
    "sd3.5-medium": MMDiTConfig(depth=24, pos_embed_max_size=384, qk_norm=True,
                                dual_attention_layers=tuple(range(13))),
    "sd3.5-large": MMDiTConfig(depth=38, pos_embed_max_size=192, qk_norm=True),
}


def mmdit_params(config: MMDiTConfig) -> dict[str, Any]:
    """An MMDiT config as the `params` of a config document's `denoiser_config` (lists, for YAML)."""
    params = asdict(config)
    params["dual_attention_layers"] = list(config.dual_attention_layers)
    return params


def build_mmdit(**params: Any) -> MMDiT:
    """The `sd3.mmditx.MMDiTX` target of the SD3 presets: an MMDiT from `MMDiTConfig`'s fields."""
    params["dual_attention_layers"] = tuple(params.get("dual_attention_layers") or ())
    return MMDiT(MMDiTConfig(**params))


def sd3_preset_for(config: MMDiTConfig) -> str:
    """The release whose structure a transformer has (qk-norm, dual attention), whatever its widths."""
    if config.dual_attention_layers:
        return "sd3.5-medium"
    return "sd3.5-large" if config.qk_norm else "sd3-medium"


def reduced_mmdit_config(name: str, depth: int = 2) -> MMDiTConfig:
    """A preset's structure at `depth` blocks (hidden 64 * depth), a 16-patch grid and 32-wide text inputs,
    dual attention (if any) in the first depth - 1 blocks: for tests that write files in the released layout."""
    full = SD3_PRESETS[name]
    dual = tuple(range(depth - 1)) if full.dual_attention_layers else ()
    return replace(full, depth=depth, pos_embed_max_size=16, adm_in_channels=32, context_in_channels=32,
                   dual_attention_layers=dual)


TRANSFORMER_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIXES = {"clip_l": "text_encoders.clip_l.", "clip_g": "text_encoders.clip_g.",
                         "t5xxl": "text_encoders.t5xxl."}


class UnquantizedAutoencoderKL(AutoencoderKL):
    """The KL autoencoder without the 1x1 `quant_conv` / `post_quant_conv` (SD3's first stage): the encoder's
    2*z_channels output is the posterior's mean and log-variance directly. Same `encode` / `decode`."""

    def __init__(self, ddconfig: dict, lossconfig: Optional[dict] = None, embed_dim: int = 16,
                 **training_only: Any) -> None:
        super().__init__(ddconfig, lossconfig, embed_dim=ddconfig["z_channels"], use_quant_conv=False,
                         **training_only)


@dataclass
class SD3FileParts:
    """The parts of an SD3 single file, each with its prefix removed (text encoders keep their own inner
    names, e.g. `transformer.text_model.*`); None where the file lacks the part. `other` holds keys under
    none of the prefixes, for the loader to judge."""

    transformer: Optional[dict[str, Any]] = None
    first_stage: Optional[dict[str, Any]] = None
    text_encoders: dict[str, dict[str, Any]] = field(default_factory=dict)
    other: dict[str, Any] = field(default_factory=dict)


def _strip(state: Mapping[str, V], prefix: str) -> Optional[dict[str, V]]:
    part = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return part or None


def split_sd3_single_file(state: Mapping[str, V]) -> SD3FileParts:
    """Split a single file's state dict (or its key -> shape map) into its parts."""
    parts = SD3FileParts(transformer=_strip(state, TRANSFORMER_PREFIX), first_stage=_strip(state, FIRST_STAGE_PREFIX))
    for name, prefix in TEXT_ENCODER_PREFIXES.items():
        encoder = _strip(state, prefix)
        if encoder is not None:
            parts.text_encoders[name] = encoder
    known = (TRANSFORMER_PREFIX, FIRST_STAGE_PREFIX, *TEXT_ENCODER_PREFIXES.values())
    parts.other = {key: value for key, value in state.items() if not key.startswith(known)}
    return parts
