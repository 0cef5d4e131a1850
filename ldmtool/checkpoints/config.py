"""CompVis-format YAML configs (and sgm's, SDXL's): reading (yaml.safe_load only, no omegaconf) and building
networks.

A config is the reference `model:` block: `target` (a dotted class path of the reference code) and
`params`. Every network is built as `ClassName(**params)` from the map below; ldmtool's own fields sit in
an optional top-level `ldmtool:` block (family, default sampler/steps/size) that the reference ignores.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping, Union

import yaml

from ldmtool.errors import CheckpointError, UsageError
from ldmtool.io.files import MAX_CONFIG_BYTES, read_text_file

ConfigLike = Union[str, Path, Mapping[str, Any]]

# Reference target -> "module:Class" in ldmtool (identity is torch.nn.Identity; unconditional has no block).
TARGETS: dict[str, str] = {
    "ldm.modules.diffusionmodules.openaimodel.UNetModel": "ldmtool.nets.unet:UNetModel",
    "ldm.models.autoencoder.AutoencoderKL": "ldmtool.nets.autoencoder:AutoencoderKL",
    "ldm.models.autoencoder.VQModel": "ldmtool.nets.autoencoder:VQModel",
    "ldm.models.autoencoder.VQModelInterface": "ldmtool.nets.autoencoder:VQModelInterface",
    "ldm.modules.encoders.modules.BERTEmbedder": "ldmtool.nets.ldm_bert:BERTEmbedder",
    "ldm.modules.encoders.modules.ClassEmbedder": "ldmtool.nets.encoders:ClassEmbedder",
    "ldm.modules.encoders.modules.SpatialRescaler": "ldmtool.nets.encoders:SpatialRescaler",
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": "ldmtool.nets.encoders:FrozenCLIPEmbedder",
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": "ldmtool.nets.openclip_text:FrozenOpenCLIPEmbedder",
    "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation":
        "ldmtool.nets.encoders:ImageConcatWithNoiseAugmentation",
    "torch.nn.Identity": "torch.nn:Identity",
    # Stability AI's sgm code base (SDXL); the sgm VAE, CLIP-L and UNet share the CompVis layouts.
    "sgm.modules.diffusionmodules.openaimodel.UNetModel": "ldmtool.nets.sgm:UNetModel",
    "sgm.models.autoencoder.AutoencoderKL": "ldmtool.nets.autoencoder:AutoencoderKL",
    "sgm.models.autoencoder.AutoencoderKLInferenceWrapper": "ldmtool.nets.autoencoder:AutoencoderKL",
    "sgm.modules.GeneralConditioner": "ldmtool.nets.sgm:GeneralConditioner",
    "sgm.modules.encoders.modules.GeneralConditioner": "ldmtool.nets.sgm:GeneralConditioner",
    "sgm.modules.encoders.modules.FrozenCLIPEmbedder": "ldmtool.nets.encoders:FrozenCLIPEmbedder",
    "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2": "ldmtool.nets.openclip_text:FrozenOpenCLIPEmbedder2",
    "sgm.modules.encoders.modules.ConcatTimestepEmbedderND": "ldmtool.nets.sgm:ConcatTimestepEmbedderND",
    # Black Forest Labs' flux code base (FLUX.1): parts of an `ldmtool.TransformerBundle`.
    "flux.model.Flux": "ldmtool.nets.flux:Flux",
    "flux.modules.autoencoder.AutoEncoder": "ldmtool.nets.autoencoder:AutoEncoder",
    # Stability AI's sd3.5 reference (SD3 / SD3.5): the MMDiT from `MMDiTConfig`'s fields, and its VAE, which
    # is FLUX.1's autoencoder layout with other latent constants.
    "sd3.mmditx.MMDiTX": "ldmtool.nets.sd3_files:build_mmdit",
    "sd3.sd3_impls.SDVAE": "ldmtool.nets.autoencoder:AutoEncoder",
    "cldm.cldm.ControlNet": "ldmtool.nets.controlnet:ControlNet",
    # ldmtool's own lossless f4 first stage (default-superres): no reference class, no weights.
    "ldmtool.nets.patch_autoencoder.PatchAutoencoder": "ldmtool.nets.patch_autoencoder:PatchAutoencoder",
}
DIFFUSION_TARGETS = {
    "ldm.models.diffusion.ddpm.LatentDiffusion",
    "ldm.models.diffusion.ddpm.LatentInpaintDiffusion",
    "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion",
}
# sgm's `DiffusionEngine` (SDXL): network_config, conditioner_config, first_stage_config, denoiser_config.
SGM_DIFFUSION_TARGETS = {"sgm.models.diffusion.DiffusionEngine"}
# ControlNet's `ControlLDM`: `build_model` gives its `control_stage_config` network alone, as its files hold it.
CONTROL_TARGETS = {"cldm.cldm.ControlLDM"}
FIRST_STAGE_TARGETS = {
    "ldm.models.autoencoder.AutoencoderKL",
    "ldm.models.autoencoder.VQModel",
    "ldm.models.autoencoder.VQModelInterface",
}


def load_config(config: ConfigLike) -> dict[str, Any]:
    """The whole config document (with its `model:` block) from a YAML path, YAML text or a dict."""
    if isinstance(config, Mapping):
        doc = dict(config)
    else:
        path = Path(config)
        if not path.exists():
            raise UsageError(f"{path}: config file not found")
        try:
            doc = yaml.safe_load(read_text_file(path, MAX_CONFIG_BYTES))
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: cannot read the config ({getattr(err, 'strerror', None) or err})") from None
        except yaml.YAMLError as err:
            raise CheckpointError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
        except RecursionError:
            raise CheckpointError(f"{path}: not a CompVis config (YAML nested too deep)") from None
        if not isinstance(doc, Mapping):
            raise CheckpointError(f"{path}: a CompVis config is a mapping with a 'model:' block")
        doc = dict(doc)
    if "model" not in doc and "target" in doc:
        doc = {"model": doc}  # a bare model block
    model = doc.get("model")
    if not isinstance(model, Mapping) or "target" not in model:
        raise CheckpointError(f"{_name(config)}: config has no 'model.target' (CompVis format expected)")
    for block, value in (("ldmtool:", doc.get("ldmtool")), ("model.params", model.get("params"))):
        if not isinstance(value or {}, Mapping):
            raise CheckpointError(f"{_name(config)}: the config's {block} block is not a mapping")
    _check_family(config, (doc.get("ldmtool") or {}).get("family"))
    return doc


def _check_family(config: ConfigLike, family: Any) -> None:
    """`ldmtool.family` is a name on one line. A family or preset of ldmtool/families/ gives the model its
    description; any other name (`train ship --name`, the shipped default-*) is the model's own label, and the
    model runs as its keys are detected."""
    if family is not None and not (isinstance(family, str) and family.strip() and family.isprintable()):
        raise CheckpointError(f"{_name(config)}: the config's ldmtool.family {family!r} is not a name "
                              f"(a family or preset of 'ldmtool models list', or the model's own name)")


def model_block(doc: Mapping[str, Any]) -> dict[str, Any]:
    return dict(doc["model"])


def ldmtool_block(doc: Mapping[str, Any]) -> dict[str, Any]:
    """ldmtool's own fields (family, default_sampler, default_steps, default_size, ...); may be empty."""
    block = doc.get("ldmtool") or {}
    if not isinstance(block, Mapping):
        raise CheckpointError("the config's ldmtool: block is not a mapping")
    return dict(block)


def resolve_target(target: str) -> type:
    if target not in TARGETS:
        known = ", ".join(sorted(t.rsplit(".", 1)[-1] for t in TARGETS))
        raise CheckpointError(f"config target {target!r} is not supported (known: {known})")
    spec = TARGETS[target]
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def instantiate(block: Mapping[str, Any]) -> Any:
    """`Class(**params)` for a `{target, params}` block of the reference config."""
    target = block.get("target")
    if not isinstance(target, str):
        raise CheckpointError(f"config block without a target: {dict(block)!r}")
    cls = resolve_target(target)
    params = dict(block.get("params") or {})
    try:
        return cls(**params)
    except TypeError as err:
        raise CheckpointError(f"config for {target}: {err}") from err


def _name(config: ConfigLike) -> str:
    return "config" if isinstance(config, Mapping) else str(config)
