"""The model bundle: an `nn.Module` laid out like the reference `LatentDiffusion`, so `state_dict()` has
the original checkpoint key names (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`,
`low_scale_model.*`, schedule buffers); sgm's `DiffusionEngine` (SDXL) gets its own bundle with the
`conditioner.*` keys. First-stage-only checkpoints (kl-f8, vq-f4, ...) get a
`FirstStageBundle` whose state dict is the autoencoder's own, as in their released files.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import torch
from torch import nn

from ldmtool.checkpoints.config import instantiate, ldmtool_block, model_block
from ldmtool.checkpoints.schedule import LOW_SCALE_BUFFERS, schedule_buffers
from ldmtool.errors import CheckpointError
from ldmtool.families.info import Parameterization

if TYPE_CHECKING:
    from torch.nn.modules.module import _IncompatibleKeys

    from ldmtool.checkpoints.api import LoadInfo
    from ldmtool.checkpoints.transformer_bundle import TransformerBundle
    from ldmtool.families.info import ModelInfo

# What a UNet bundle's config or --prediction may name (flow models are transformer bundles of their own).
PARAMETERIZATIONS = tuple(p.value for p in Parameterization if p is not Parameterization.FLOW)
SCHEDULE_KEYS = ("beta_schedule", "timesteps", "linear_start", "linear_end", "cosine_s")
UNCONDITIONAL = "__is_unconditional__"
SAME_AS_FIRST_STAGE = "__is_first_stage__"


class DiffusionWrapper(nn.Module):
    """Holds the UNet under the name `diffusion_model`, as the reference does."""

    def __init__(self, diffusion_model: nn.Module, conditioning_key: Optional[str]):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key


class _BundleAliases:
    """The short names of DESIGN.md §6, and `info`, the typed description the registry builds when the
    bundle is built or loaded (`ldmtool.checkpoints.api`)."""

    info: "ModelInfo"
    load_info: "LoadInfo"  # set by load_model
    # Set by each bundle class (declared here for the aliases below, and so mypy does not read them
    # through nn.Module.__getattr__ as `Tensor | Module`).
    first_stage_model: nn.Module
    cond_stage_model: Optional[nn.Module]

    @property
    def denoiser(self) -> Optional[nn.Module]:
        """The network, with the reference call convention `(x, timesteps, context=None, y=None)`."""
        model = getattr(self, "model", None)
        return None if model is None else model.diffusion_model

    @property
    def unet(self) -> Optional[nn.Module]:
        """`denoiser` by its older name (every family's denoiser so far is a UNet)."""
        return self.denoiser

    @property
    def first_stage(self) -> nn.Module:
        return self.first_stage_model

    def file_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint's tensors under this bundle's key names (a bundle whose files use several layouts
        renames them here)."""
        return dict(state)

    @property
    def cond_stage(self) -> Optional[nn.Module]:
        return self.cond_stage_model


class LatentDiffusionBundle(_BundleAliases, nn.Module):
    """`LatentDiffusion` / `LatentInpaintDiffusion` / `LatentUpscaleDiffusion` without the training code."""

    def __init__(self, doc: Mapping[str, Any], family: Optional[str] = None):
        super().__init__()
        block = model_block(doc)
        params = dict(block.get("params") or {})
        self.config = dict(doc)
        self.family = family or ldmtool_block(doc).get("family") or "custom"
        self.parameterization = params.get("parameterization", "eps")
        if self.parameterization not in PARAMETERIZATIONS:
            raise CheckpointError(f"config parameterization {self.parameterization!r} is not one of eps, v, x0")
        self.scale_factor = float(params.get("scale_factor", 1.0))
        if params.get("scale_by_std", False):
            # The reference keeps scale_factor as a buffer then, so such checkpoints store it as a key.
            self.register_state_dict_post_hook(_save_scale_factor)
            self.register_load_state_dict_pre_hook(_load_scale_factor)
        cond_config = params.get("cond_stage_config", UNCONDITIONAL)
        self.conditioning_key = _conditioning_key(params, cond_config)
        self.schedule_params = {k: params[k] for k in SCHEDULE_KEYS if k in params}
        for name, value in schedule_buffers(**self.schedule_params).items():
            self.register_buffer(name, value)
        self.model = DiffusionWrapper(instantiate(_required(params, "unet_config")), self.conditioning_key)
        self.first_stage_model = instantiate(_required(params, "first_stage_config"))
        self.cond_stage_model = self._cond_stage(cond_config)
        self.low_scale_model = instantiate(params["low_scale_config"]) if "low_scale_config" in params else None
        self.low_scale_key = params.get("low_scale_key")

    def _cond_stage(self, cond_config: Any) -> Optional[nn.Module]:
        if cond_config == UNCONDITIONAL or cond_config is None:
            return None
        if cond_config == SAME_AS_FIRST_STAGE:
            return self.first_stage_model  # shared: the reference saves its weights under both names
        return instantiate(cond_config)

    def schedule_values(self) -> dict[str, torch.Tensor]:
        """Fresh CPU values of every schedule buffer (by state-dict key), computed from the config."""
        values = schedule_buffers(**self.schedule_params)
        if self.low_scale_model is not None:
            low = schedule_buffers(**_low_scale_schedule(self.config))
            values.update({f"low_scale_model.{k}": low[k] for k in LOW_SCALE_BUFFERS})
        return values


class FirstStageBundle(_BundleAliases, nn.Module):
    """A first-stage autoencoder alone; `state_dict()` keys are the autoencoder's (`encoder.*`, ...)."""

    model = None
    cond_stage_model = None
    low_scale_model = None
    parameterization = None
    conditioning_key = None
    scale_factor = 1.0

    def __init__(self, doc: Mapping[str, Any], family: Optional[str] = None):
        super().__init__()
        self.config = dict(doc)
        self.family = family or ldmtool_block(doc).get("family") or "custom"
        self.first_stage_model = instantiate(model_block(doc))

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.first_stage_model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> _IncompatibleKeys:
        return self.first_stage_model.load_state_dict(state_dict, strict=strict, assign=assign)

    def schedule_values(self) -> dict[str, torch.Tensor]:
        return {}


class DiffusionEngineBundle(_BundleAliases, nn.Module):
    """sgm's `DiffusionEngine` (SDXL) without the training code: `model.diffusion_model` (the UNet),
    `conditioner` (`GeneralConditioner`: text encoders and micro-conditioning) and `first_stage_model`, so
    `state_dict()` has the released single-file keys. Its schedule (`denoiser_config`: the legacy DDPM
    discretisation) is computed, not stored: the buffers are not part of the state dict."""

    low_scale_model = None

    def __init__(self, doc: Mapping[str, Any], family: Optional[str] = None):
        super().__init__()
        params = dict(model_block(doc).get("params") or {})
        self.config = dict(doc)
        self.family = family or ldmtool_block(doc).get("family") or "custom"
        self.parameterization = _sgm_parameterization(params.get("denoiser_config"))
        self.scale_factor = float(params.get("scale_factor", 1.0))
        self.schedule_params = _sgm_schedule(params.get("denoiser_config"))
        for name, value in schedule_buffers(**self.schedule_params).items():
            self.register_buffer(name, value, persistent=False)
        network = instantiate(_required(params, "network_config"))
        concat = network.input_blocks[0][0].in_channels > network.out[-1].out_channels
        self.conditioning_key = "hybrid-adm" if concat else "crossattn-adm"
        self.model = DiffusionWrapper(network, self.conditioning_key)
        self.first_stage_model = instantiate(_required(params, "first_stage_config"))
        self.conditioner = instantiate(_required(params, "conditioner_config"))

    @property
    def cond_stage(self) -> Optional[nn.Module]:
        return self.conditioner

    def schedule_values(self) -> dict[str, torch.Tensor]:
        return schedule_buffers(**self.schedule_params)


_SGM_SCALINGS = {"EpsScaling": "eps", "VScaling": "v"}


def _sgm_parameterization(denoiser: Any) -> str:
    scaling = ((denoiser or {}).get("params") or {}).get("scaling_config") or {}
    name = str(scaling.get("target", "EpsScaling")).rsplit(".", 1)[-1]
    if name not in _SGM_SCALINGS:
        raise CheckpointError(f"config denoiser_config scaling {name!r} is not supported (EpsScaling, VScaling)")
    return _SGM_SCALINGS[name]


def _sgm_schedule(denoiser: Any) -> dict[str, Any]:
    """The reference `LegacyDDPMDiscretization`: SD's scaled-linear betas over `num_idx` steps."""
    params = (denoiser or {}).get("params") or {}
    discretization = params.get("discretization_config") or {}
    name = str(discretization.get("target", "LegacyDDPMDiscretization")).rsplit(".", 1)[-1]
    if name != "LegacyDDPMDiscretization":
        raise CheckpointError(f"config denoiser_config discretization {name!r} is not supported "
                              "(LegacyDDPMDiscretization)")
    values = discretization.get("params") or {}
    return {"beta_schedule": "linear", "timesteps": int(params.get("num_idx", 1000)),
            "linear_start": float(values.get("linear_start", 0.00085)),
            "linear_end": float(values.get("linear_end", 0.0120))}


def _save_scale_factor(module: LatentDiffusionBundle, state_dict: dict[str, Any], prefix: str,
                       local_metadata: dict[str, Any]) -> None:
    state_dict[prefix + "scale_factor"] = torch.tensor(module.scale_factor)


def _load_scale_factor(module: LatentDiffusionBundle, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    value = state_dict.pop(prefix + "scale_factor", None)
    if value is not None and value.device.type != "meta":
        module.scale_factor = float(value)


def _required(params: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    if not isinstance(params.get(key), Mapping):
        raise CheckpointError(f"config model.params has no {key} block")
    return params[key]


def _conditioning_key(params: Mapping[str, Any], cond_config: Any) -> Optional[str]:
    """As the reference: unconditional -> None; unset -> 'concat' if concat_mode (default) else 'crossattn'."""
    if cond_config == UNCONDITIONAL or cond_config is None:
        return None
    key = params.get("conditioning_key")
    if key is None:
        key = "concat" if params.get("concat_mode", True) else "crossattn"
    return key


def _low_scale_schedule(doc: Mapping[str, Any]) -> dict[str, Any]:
    low = model_block(doc)["params"]["low_scale_config"]
    return dict((low.get("params") or {}).get("noise_schedule_config") or {})


Bundle = Union[LatentDiffusionBundle, FirstStageBundle, DiffusionEngineBundle, "TransformerBundle"]


def build_bundle(doc: Mapping[str, Any], family: Optional[str] = None) -> Bundle:
    """The bundle class the config's top-level target asks for, built on the current default device."""
    from ldmtool.checkpoints.config import (
        CONTROL_TARGETS,
        DIFFUSION_TARGETS,
        FIRST_STAGE_TARGETS,
        SGM_DIFFUSION_TARGETS,
    )
    from ldmtool.checkpoints.transformer_bundle import TRANSFORMER_BUNDLE, TransformerBundle

    target = model_block(doc)["target"]
    if target == TRANSFORMER_BUNDLE:
        return TransformerBundle(doc, family)
    if target in DIFFUSION_TARGETS:
        return LatentDiffusionBundle(doc, family)
    if target in SGM_DIFFUSION_TARGETS:
        return DiffusionEngineBundle(doc, family)
    if target in FIRST_STAGE_TARGETS:
        return FirstStageBundle(doc, family)
    if target in CONTROL_TARGETS:
        raise CheckpointError(f"config model.target {target!r} is a ControlNet, which runs beside a model: "
                              "give it with --controlnet (ldmtool.load_controlnet in Python)")
    raise CheckpointError(
        f"config model.target {target!r} is not a latent diffusion model or first-stage autoencoder "
        f"(known: {', '.join(sorted(t.rsplit('.', 1)[-1] for t in DIFFUSION_TARGETS | SGM_DIFFUSION_TARGETS | FIRST_STAGE_TARGETS))})"
    )
