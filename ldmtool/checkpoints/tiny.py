"""Small variants of the presets: the same structure (levels, conditioner kind, input channels, vocab
and sequence sizes, attention switches) with tiny widths, for tests and quick experiments."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, TypeVar

from ldmtool.checkpoints.presets import load_preset
from ldmtool.checkpoints.transformer_bundle import TRANSFORMER_BUNDLE

if TYPE_CHECKING:
    from torch import nn

    from ldmtool.checkpoints.bundle import Bundle

ModuleT = TypeVar("ModuleT", bound="nn.Module")

TINY_CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def tiny_config(preset_or_doc: str | Mapping[str, Any]) -> dict[str, Any]:
    """A preset's config with widths shrunk so the whole bundle has a few million parameters."""
    doc = copy.deepcopy(load_preset(preset_or_doc) if isinstance(preset_or_doc, str) else dict(preset_or_doc))
    params = doc["model"].setdefault("params", {})
    if doc["model"]["target"] == TRANSFORMER_BUNDLE:  # FLUX.1 (parts without a reference config)
        _shrink_parts(params)
        return doc
    if "network_config" in params:  # sgm (SDXL)
        _shrink_sgm(params)
        return doc
    if "control_stage_config" in params:  # a ControlNet, for a tiny model with the CLIP text width
        _shrink_unet(params["control_stage_config"]["params"], TINY_CLIP_TEXT["hidden_size"])
        return doc
    if "unet_config" not in params:  # a first stage alone
        _shrink_first_stage(params)
        return doc
    context = _shrink_cond_stage(params.get("cond_stage_config"))
    _shrink_first_stage(params["first_stage_config"]["params"])
    _shrink_unet(params["unet_config"]["params"], context)
    return doc


def _shrink_first_stage(p: dict[str, Any]) -> None:
    dd = p["ddconfig"]
    dd.update(ch=32, num_res_blocks=1)
    if "n_embed" in p:
        p["n_embed"] = 64


def _shrink_unet(p: dict[str, Any], context_dim: int | None) -> None:
    p.update(model_channels=32, num_res_blocks=1)
    if p.get("num_head_channels", -1) != -1:
        p["num_head_channels"] = 16
    if p.get("num_heads", -1) not in (-1, 1):
        p["num_heads"] = 2
    if p.get("use_spatial_transformer"):
        p["context_dim"] = context_dim
        p["transformer_depth"] = 1


def _shrink_cond_stage(cond: Any) -> int | None:
    """Shrink the conditioner in place; return its new context width (None without cross-attention)."""
    if not isinstance(cond, dict):
        return None
    name = cond["target"].rsplit(".", 1)[-1]
    p = cond.setdefault("params", {})
    if name == "BERTEmbedder":
        p.update(n_embed=32, n_layer=1)
        return 32
    if name == "ClassEmbedder":
        p["embed_dim"] = 32
        return 32
    if name == "FrozenCLIPEmbedder":
        p["text_config"] = dict(TINY_CLIP_TEXT)
        return TINY_CLIP_TEXT["hidden_size"]
    if name == "FrozenOpenCLIPEmbedder":
        p.update(width=32, layers=2, heads=2)
        return 32
    return None


def _shrink_sgm(params: dict[str, Any]) -> None:
    """SDXL: each text tower shrunk, the UNet's context and `y` widths recomputed from them (micro-conditioning
    embeddings keep their 256 width), transformer depths capped at 2 (levels keep or lose attention as before)."""
    context, pooled, micro = 0, 0, 0
    for block in params["conditioner_config"]["params"]["emb_models"]:
        name = block["target"].rsplit(".", 1)[-1]
        p = block.setdefault("params", {})
        if name == "FrozenCLIPEmbedder":
            p["text_config"] = dict(TINY_CLIP_TEXT)
            if p.get("layer") == "hidden":  # layer 11 of 12 is the penultimate; so stays it
                p["layer_idx"] = TINY_CLIP_TEXT["num_hidden_layers"] - 1
            context += TINY_CLIP_TEXT["hidden_size"]
        elif name == "FrozenOpenCLIPEmbedder2":
            p.update(width=32, layers=2, heads=2)
            context += 32
            pooled += 32 if p.get("always_return_pooled") else 0
        elif name == "ConcatTimestepEmbedderND":
            micro += p["outdim"] * (1 if block.get("input_key") == "aesthetic_score" else 2)
    _shrink_first_stage(params["first_stage_config"]["params"])
    unet = params["network_config"]["params"]
    unet.update(model_channels=32, num_res_blocks=1, num_head_channels=16, adm_in_channels=pooled + micro)
    depth = unet.get("transformer_depth", 1)
    unet["transformer_depth"] = [min(d, 2) for d in depth] if isinstance(depth, list) else min(depth, 2)
    levels = len(unet.get("channel_mult", ()))
    unet["context_dim"] = [context] * levels if isinstance(unet.get("context_dim"), list) else context


def _shrink_parts(params: dict[str, Any]) -> None:
    """A transformer bundle's parts: one block of each kind with one 128-wide head (the width the rotary
    axes fix), small text widths; the autoencoder as the CompVis ones. Input widths, MLP ratio and guidance
    embedding stay: they are what tells the presets apart."""
    if params.get("denoiser_config", {}).get("target") == MMDIT_TARGET:
        _shrink_mmdit(params["denoiser_config"]["params"])
    elif "denoiser_config" in params:
        params["denoiser_config"]["params"].update(hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1,
                                                   context_in_dim=32, vec_in_dim=32)
    if "first_stage_config" in params:
        params["first_stage_config"]["params"].update(ch=32, num_res_blocks=1)


MMDIT_TARGET = "sd3.mmditx.MMDiTX"


def _shrink_mmdit(p: dict[str, Any]) -> None:
    """SD3's MMDiT at two 64-wide blocks with the structure (qk-norm, dual attention) that names its release."""
    from ldmtool.nets.mmdit import MMDiTConfig
    from ldmtool.nets.sd3_files import mmdit_params, reduced_mmdit_config, sd3_preset_for

    full = MMDiTConfig(**{**p, "dual_attention_layers": tuple(p.get("dual_attention_layers") or ())})
    p.update(mmdit_params(reduced_mmdit_config(sd3_preset_for(full))))


def randomise_(module: ModuleT, seed: int = 0, scale: float = 0.05) -> ModuleT:
    """Fill every parameter with seeded N(0, scale²) values (fresh inits leave some layers at zero)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return module


def tiny_model(preset: str, seed: int = 0) -> Bundle:
    """A randomly initialised small bundle of a preset's family (CPU, float32, eval mode)."""
    from ldmtool.checkpoints.api import build_model

    return randomise_(build_model(tiny_config(preset)), seed).eval()


def save_tiny_checkpoint(path: str | Path, preset: str, seed: int = 0, *, with_config: bool = False) -> Bundle:
    """Write a small random checkpoint of a family in its original key layout (.safetensors, or a
    Lightning-style .ckpt); with `with_config`, also `<stem>.yaml` beside it. Returns the bundle."""
    from pathlib import Path

    import torch
    import yaml

    from ldmtool.checkpoints.files import save_safetensors

    path = Path(path)
    bundle = tiny_model(preset, seed)
    state = bundle.state_dict()
    if path.suffix == ".safetensors":
        save_safetensors(state, path)
    else:
        torch.save({"state_dict": state, "epoch": 1, "global_step": 10}, path)
    if with_config:
        path.with_suffix(".yaml").write_text(yaml.safe_dump(bundle.config, sort_keys=False))
    return bundle
