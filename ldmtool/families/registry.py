"""The registry: a plain list of the families, most specific detection first (the LDM rules end with
catch-alls for any UNet with a first stage). A new family is a module in this folder and a line here."""
from __future__ import annotations

from typing import Any, Optional

from ldmtool.families.base import Detection, Family, Shapes
from ldmtool.families.flux import FLUX
from ldmtool.families.info import ModelInfo
from ldmtool.families.ldm import LDM, LDM_FIRST_STAGES
from ldmtool.families.sd1 import SD1
from ldmtool.families.sd2 import SD2
from ldmtool.families.sd3 import SD3
from ldmtool.families.sdxl import SDXL

# SD3 before FLUX.1: a diffusers SD3 folder also holds a bare VAE, which FLUX.1 alone would take for ae.safetensors.
FAMILIES: list[Family] = [SDXL, SD1, SD2, SD3, FLUX, LDM, LDM_FIRST_STAGES]


def detect_family(shapes: Shapes) -> Optional[Detection]:
    """The most likely family for a checkpoint's keys/shapes, or None when nothing matches."""
    for family in FAMILIES:
        found = family.detect(shapes)
        if found is not None:
            return found
    return None


def family_named(name: str) -> Optional[Family]:
    """The entry that owns a family or preset name."""
    return next((family for family in FAMILIES if family.owns(name)), None)


def preset_families() -> tuple[str, ...]:
    """Every preset a family owns, in registry order (the released checkpoint families)."""
    return tuple(preset for family in FAMILIES for preset in family.presets)


def family_names() -> tuple[str, ...]:
    """Every name a family goes by: entries and their presets."""
    return tuple(name for family in FAMILIES for name in (family.name, *family.presets))


def model_info(bundle: Any) -> ModelInfo:
    """The bundle's ModelInfo, from the entry that owns its recorded family name, else the entry its own
    keys are detected as (custom and shipped models), else the generic latent diffusion or first-stage one."""
    family = family_named(bundle.family) or _detected(bundle)
    if family is None:
        family = LDM if getattr(bundle, "model", None) is not None else LDM_FIRST_STAGES
    return family.model_info(bundle)


def _detected(bundle: Any) -> Optional[Family]:
    found = detect_family({k: tuple(v.shape) for k, v in bundle.state_dict().items()})
    return None if found is None else family_named(found.family)
