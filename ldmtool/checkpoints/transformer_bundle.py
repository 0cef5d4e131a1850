"""The bundle of the transformer families whose references ship no CompVis or sgm config (FLUX.1, SD3): a
set of optional parts, each a `{target, params}` block of the document, built with `instantiate`.

    model:
      target: ldmtool.TransformerBundle
      params:
        parameterization: flow
        scale_factor: 0.3611          # the references' latent constants, applied by the pipelines
        shift_factor: 0.1159
        denoiser_config: {target: flux.model.Flux, params: {...}}
        denoiser_prefix: ""           # where the part's keys sit in the bundle's state dict
        denoiser_file_prefixes: ["model.diffusion_model."]   # other prefixes files use for them
        first_stage_config: {target: flux.modules.autoencoder.AutoEncoder, params: {...}}
        ignored_file_prefixes: ["text_encoders."]   # file keys no part takes (SD3's embedded text encoders)

A part the document leaves out is absent (`bundle.denoiser` / `bundle.first_stage` is None, and
`bundle.info.missing_parts` names it), as for a file that holds only a transformer or only an autoencoder.
`state_dict()` joins the parts' keys under their prefixes: the released key names (for FLUX.1, BFL's own
without a prefix; SD3's single files keep `model.diffusion_model.` and `first_stage_model.`). The family
entry derives the document from the file's shapes (`Detection.config`), so reduced-width files load too.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from torch import nn

from ldmtool.checkpoints.bundle import _BundleAliases
from ldmtool.checkpoints.config import instantiate, ldmtool_block, model_block

if TYPE_CHECKING:
    from torch.nn.modules.module import _IncompatibleKeys

TRANSFORMER_BUNDLE = "ldmtool.TransformerBundle"
PARTS = ("denoiser", "first_stage", "cond_stage")  # in the order their keys are matched


class TransformerBundle(_BundleAliases, nn.Module):
    low_scale_model = None
    conditioning_key = None

    def __init__(self, doc: Mapping[str, Any], family: Optional[str] = None):
        super().__init__()
        params = dict(model_block(doc).get("params") or {})
        self.config = dict(doc)
        self.family = family or ldmtool_block(doc).get("family") or "custom"
        self.parameterization = params.get("parameterization", "flow")
        self.scale_factor = float(params.get("scale_factor", 1.0))
        self.shift_factor = float(params.get("shift_factor", 0.0))
        self.prefixes = {part: str(params.get(f"{part}_prefix", "")) for part in PARTS}
        self.file_prefixes = {part: tuple(params.get(f"{part}_file_prefixes") or ()) for part in PARTS}
        self.ignored_file_prefixes = tuple(params.get("ignored_file_prefixes") or ())
        self.left_out_keys: tuple[str, ...] = ()  # the loaded file's keys under those prefixes
        self.parts = nn.ModuleDict({part: instantiate(params[f"{part}_config"]) for part in PARTS
                                    if isinstance(params.get(f"{part}_config"), Mapping)})

    def part(self, name: str) -> Optional[nn.Module]:
        return self.parts[name] if name in self.parts else None

    @property
    def denoiser(self) -> Optional[nn.Module]:
        """The network with its reference call convention (Flux: `(img, img_ids, txt, txt_ids, timesteps, y,
        guidance=None)`), or None when the file held no denoiser."""
        return self.part("denoiser")

    @property
    def first_stage(self) -> Optional[nn.Module]:  # type: ignore[override]  # absent in a transformer-only file
        return self.part("first_stage")

    @property
    def cond_stage(self) -> Optional[nn.Module]:
        return self.part("cond_stage")

    @property
    def cond_stage_model(self) -> Optional[nn.Module]:  # type: ignore[override]
        return self.part("cond_stage")

    def present_parts(self) -> tuple[str, ...]:
        return tuple(self.parts)

    def add_parts(self, other: "TransformerBundle") -> None:
        """Take the parts this bundle lacks from another bundle (FLUX.1's autoencoder from `ae.safetensors`
        beside a transformer file), with their config blocks; `info` is described again."""
        from ldmtool.families.registry import model_info

        params = self.config["model"].setdefault("params", {})
        for name, module in other.parts.items():
            if name in self.parts:
                continue
            self.parts[name] = module
            for suffix in ("config", "prefix", "file_prefixes"):
                if f"{name}_{suffix}" in other.config["model"]["params"]:
                    params[f"{name}_{suffix}"] = other.config["model"]["params"][f"{name}_{suffix}"]
            self.prefixes[name], self.file_prefixes[name] = other.prefixes[name], other.file_prefixes[name]
        self.info = model_info(self)

    def file_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A file's tensors under this bundle's key names: a part's keys under another prefix its files use
        (ComfyUI's `model.diffusion_model.` for a FLUX.1 transformer) move to the part's own prefix; keys
        under `ignored_file_prefixes` are left out (SD3's text encoders, which the pipeline reads from the file)
        and recorded in `left_out_keys`."""
        renames = [(alt, self.prefixes[part]) for part in self.parts for alt in self.file_prefixes[part]]
        out = {}
        left_out = []
        for key, value in state.items():
            if key.startswith(self.ignored_file_prefixes):
                left_out.append(key)
                continue
            alt, own = next(((a, o) for a, o in renames if key.startswith(a)), ("", ""))
            out[own + key[len(alt):]] = value
        self.left_out_keys = tuple(left_out)
        return out

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return {self.prefixes[name] + key: value for name, module in self.parts.items()
                for key, value in module.state_dict(*args, **kwargs).items()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> _IncompatibleKeys:
        """Each key goes to the first part that has it (parts may share a prefix: FLUX.1's are both empty)."""
        from torch.nn.modules.module import _IncompatibleKeys

        remaining = dict(state_dict)
        missing: list[str] = []
        for name, module in self.parts.items():
            prefix = self.prefixes[name]
            own = {prefix + key for key in module.state_dict()}
            mine = {key[len(prefix):]: remaining.pop(key) for key in list(remaining) if key in own}
            result = module.load_state_dict(mine, strict=False, assign=assign)
            missing += [prefix + key for key in result.missing_keys]
        if strict and (missing or remaining):
            raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {list(remaining)[:5]}")
        return _IncompatibleKeys(missing, list(remaining))

    def schedule_values(self) -> dict[str, torch.Tensor]:
        return {}
