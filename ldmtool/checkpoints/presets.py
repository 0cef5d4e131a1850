"""Built-in presets (presets/*.yaml, package `ldmtool.presets`) and shipped default models
(`ldmtool/assets/models/<name>.safetensors` + `<name>.yaml`)."""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from ldmtool.checkpoints.config import CONTROL_TARGETS, ldmtool_block, load_config, model_block
from ldmtool.errors import UsageError
from ldmtool.families.registry import preset_families

# The released checkpoint families of DESIGN.md section 3, one preset each (owned by ldmtool/families/).
RELEASED_FAMILIES = preset_families()


@dataclass(frozen=True)
class PresetInfo:
    name: str
    family: str
    task: str
    description: str


@dataclass(frozen=True)
class ShippedModel:
    name: str
    weights: Path
    config: Path


def _preset_files() -> dict[str, Any]:
    root = resources.files("ldmtool.presets")
    return {p.name[: -len(".yaml")]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def preset_names() -> list[str]:
    return sorted(_preset_files())


def load_preset(name: str) -> dict[str, Any]:
    """The config document of a preset, by name (e.g. 'sd1', 'ldm-bsr-sr', 'kl-f8')."""
    files = _preset_files()
    if name not in files:
        raise UsageError(f"unknown preset {name!r}; known presets: {', '.join(sorted(files))}")
    import yaml

    doc = load_config(yaml.safe_load(files[name].read_text(encoding="utf-8")))
    doc.setdefault("ldmtool", {}).setdefault("family", name)
    return doc


def preset_info(name: str) -> PresetInfo:
    block = ldmtool_block(load_preset(name))
    return PresetInfo(name, block.get("family", name), block.get("task", ""), block.get("description", ""))


def models_dir() -> Path:
    return Path(str(resources.files("ldmtool.assets"))) / "models"


def shipped_models() -> list[ShippedModel]:
    """Default models shipped in the package: every `<name>.safetensors` with a `<name>.yaml` beside it."""
    folder = models_dir()
    if not folder.is_dir():
        return []
    found = []
    for weights in sorted(folder.glob("*.safetensors")):
        config = weights.with_suffix(".yaml")
        if config.is_file():
            found.append(ShippedModel(weights.stem, weights, config))
    return found


def shipped_model(name: str) -> Optional[ShippedModel]:
    return next((m for m in shipped_models() if m.name == name), None)


def shipped_controlnet(name: str) -> Optional[Path]:
    """The weights of the shipped ControlNet `name` (a default whose config is a cldm ControlLDM), else None."""
    shipped = shipped_model(name)
    if shipped is None or model_block(load_config(shipped.config)).get("target") not in CONTROL_TARGETS:
        return None
    return shipped.weights


def controlnet_file(text: str | Path) -> Optional[Path]:
    """The file `text` names: a path, or the weights of a shipped ControlNet of that name; None if neither."""
    path = Path(text).expanduser()
    if path.is_file():
        return path
    return shipped_controlnet(str(text))
