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
import re
from typing import TYPE_CHECKING, Any, Mapping, Optional

from ldmtool.families.base import Detection, Family, FlowRecipe, Shapes
from ldmtool.families.info import InpaintKind, ModelInfo
from ldmtool.families.transformer import LATENT_CHANNELS, autoencoder_only_info, transformer_info

if TYPE_CHECKING:
    from ldmtool.nets.mmdit_names import Place

TRANSFORMER_KEY = "double_blocks.0.img_attn.norm.key_norm.scale"
TRANSFORMER_PREFIXES = ("", "model.diffusion_model.")  # BFL's files, ComfyUI's
AUTOENCODER_KEYS = ("encoder.conv_in.weight", "decoder.conv_in.weight")
FILL_IN = 384  # packed (latent 16 + masked latent 16 + mask 64) x 2x2
PATCH = 2  # the transformer's tokens are 2x2 latent patches
MISSING_AUTOENCODER = "the autoencoder (ae.safetensors)"
MISSING_TEXT_ENCODERS = "the text encoders (CLIP-L and T5-XXL)"
MISSING_TRANSFORMER = "a FLUX.1 transformer"
# The standalone SD3 / SD3.5 VAE has ae.safetensors' keys and shapes; only its latent constants differ.
SD3_VAE_PRESET = "sd3-vae"
SD3_VAE_NOTE = f"a standalone SD3 / SD3.5 VAE has the same keys: pass --preset {SD3_VAE_PRESET} for one"


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
        evidence: tuple[str, ...] = (f"FLUX.1 transformer{' under ' + prefix if prefix else ''}",
                                     f"guidance embedding: {'yes' if params['guidance_embed'] else 'no'}",
                                     f"input width {params['in_channels']}")
        doc = _from_preset(name, "denoiser", params)
        if _is_flux_autoencoder(shapes):  # both parts in one state (a diffusers folder): the autoencoder too
            first = _from_preset("flux-ae", "first_stage", autoencoder_config_from_shapes(shapes))
            doc["model"]["params"].update({k: v for k, v in first["model"]["params"].items() if "first_stage" in k})
            evidence += ("FLUX.1 autoencoder",)
        note = "" if params["in_channels"] in (PATCH ** 2 * LATENT_CHANNELS, FILL_IN) else (
            f"input width {params['in_channels']} (a control model such as Canny or Depth dev): its extra "
            "input is not one ldmtool can give yet")
        return Detection(name, evidence=evidence, config=doc, note=note)
    if _is_flux_autoencoder(shapes):
        params = autoencoder_config_from_shapes(shapes)
        return Detection("flux-ae", alternatives=(SD3_VAE_PRESET,), note=SD3_VAE_NOTE,
                         evidence=(f"KL autoencoder without quant convs, {params['z_channels']} latent channels",),
                         config=_from_preset("flux-ae", "first_stage", params))
    return None


def _is_flux_autoencoder(shapes: Shapes) -> bool:
    """BFL's autoencoder layout: the CompVis encoder/decoder names, but no quant convs or codebook."""
    return all(k in shapes for k in AUTOENCODER_KEYS) and "quant_conv.weight" not in shapes \
        and "quantize.embedding.weight" not in shapes


def flux_info(bundle: Any, family: Family) -> ModelInfo:
    """A `TransformerBundle` with a FLUX.1 transformer, an autoencoder, or both."""
    denoiser = bundle.denoiser
    if denoiser is None:
        return autoencoder_only_info(bundle, family, missing_transformer=MISSING_TRANSFORMER)
    concat = (denoiser.in_channels - denoiser.out_channels) // PATCH ** 2
    missing = () if bundle.first_stage is not None else (MISSING_AUTOENCODER,)
    return transformer_info(bundle, family, patch=PATCH, concat_channels=concat,
                            inpaint_kind=InpaintKind.FILL if concat else InpaintKind.MASKED,
                            missing_parts=(*missing, MISSING_TEXT_ENCODERS))


def _flow() -> FlowRecipe:
    from ldmtool.families.flux_flow import FluxFlow

    return FluxFlow()

FLUX = Family(
    name="flux",
    presets=("flux1-dev", "flux1-schnell", "flux1-fill-dev", "flux-ae"),
    detect=_detect,
    describe=flux_info,
    flow=_flow,
    conditioner="T5-XXL text tokens, pooled CLIP ViT-L/14 text and (dev) the distilled guidance value",
)


# diffusers' FluxTransformer2DModel names -> BFL's (the inverse of diffusers' single-file conversion).
_DIFFUSERS_RENAMES = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
}
_DOUBLE_RENAMES = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2", "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
}
_SINGLE_RENAMES = {"norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
                   "proj_out": "linear2"}
_JOINED = {  # BFL layers that diffusers splits: (BFL name, diffusers pieces in BFL's order)
    "double": (("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
               ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))),
    "single": (("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),),
}


def bfl_from_diffusers(state: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers `FluxTransformer2DModel` state dict under BFL's names: q/k/v (and the single blocks' MLP
    input) joined into one projection, RMSNorm `weight` as `scale`, the final modulation's halves swapped
    back to (shift, scale)."""
    import torch

    out: dict[str, Any] = {}
    for key, value in state.items():
        name, _, kind = key.rpartition(".")
        if m := re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", name):
            renames = _DOUBLE_RENAMES if m[1] == "transformer_blocks" else _SINGLE_RENAMES
            if m[3] not in renames:
                continue  # a piece of a joined projection, below
            block = "double_blocks" if m[1] == "transformer_blocks" else "single_blocks"
            target = f"{block}.{m[2]}.{renames[m[3]]}"
            out[f"{target}.{'scale' if target.endswith('_norm') else kind}"] = value
        elif name == "norm_out.linear":
            scale, shift = value.chunk(2, dim=0)
            out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale], dim=0)
        else:
            out[f"{_DIFFUSERS_RENAMES.get(name, name)}.{kind}"] = value
    for diffusers_block, block, joined in (("transformer_blocks", "double_blocks", _JOINED["double"]),
                                           ("single_transformer_blocks", "single_blocks", _JOINED["single"])):
        indices = {int(m[1]) for k in state if (m := re.match(re.escape(diffusers_block) + r"\.(\d+)\.", k))}
        for i in sorted(indices):
            for target, pieces in joined:
                for kind in ("weight", "bias"):
                    keys = [f"{diffusers_block}.{i}.{piece}.{kind}" for piece in pieces]
                    if all(k in state for k in keys):
                        out[f"{block}.{i}.{target}.{kind}"] = torch.cat([state[k] for k in keys], dim=0)
    return out


def diffusers_layer_places(depth: int, depth_single: int, hidden: int, mlp_hidden: int) -> dict[str, Place]:
    """diffusers layer name -> its place in BFL's layout, for every layer with weights: q/k/v (and the single
    blocks' `proj_mlp`) are row ranges of the joined projection; `norm_out.linear` holds the final modulation's
    halves swapped, (scale, shift)."""
    from ldmtool.nets.mmdit_names import Place

    places = {theirs: Place(ours) for theirs, ours in _DIFFUSERS_RENAMES.items()}
    places["norm_out.linear"] = Place("final_layer.adaLN_modulation.1", swapped=True)
    blocks = (("transformer_blocks", "double_blocks", depth, _DOUBLE_RENAMES, "double"),
              ("single_transformer_blocks", "single_blocks", depth_single, _SINGLE_RENAMES, "single"))
    for theirs_block, our_block, count, renames, kind in blocks:
        for i in range(count):
            places.update({f"{theirs_block}.{i}.{theirs}": Place(f"{our_block}.{i}.{ours}")
                           for theirs, ours in renames.items()})
            for ours, pieces in _JOINED[kind]:
                start = 0
                for piece in pieces:
                    width = mlp_hidden if piece == "proj_mlp" else hidden
                    places[f"{theirs_block}.{i}.{piece}"] = Place(f"{our_block}.{i}.{ours}", (start, start + width))
                    start += width
    return places
