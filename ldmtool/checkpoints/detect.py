"""Family detection (used when no --config or --preset is given): ldmtool's own recipe for the weights
first (the config `models convert` stores in the file, or the shipped `<name>.yaml` beside it), then the key
names and shapes. The key rules live with their families (ldmtool/families/); this is the checkpoints
layer's entry point to them."""
from __future__ import annotations

from typing import Optional

from ldmtool.checkpoints.config import ConfigLike, ldmtool_block, load_config
from ldmtool.errors import CheckpointError
from ldmtool.families.base import Detection, Shapes
from ldmtool.families.registry import detect_family

__all__ = ["Detection", "Shapes", "detect_checkpoint", "detect_family"]


def detect_checkpoint(shapes: Shapes, recipe: Optional[ConfigLike]) -> Optional[Detection]:
    """The family ldmtool recorded in `recipe` (its config for these weights), else the one the keys look
    like (key shapes alone cannot tell ldmtool's own small models from the released ones)."""
    family = _recorded_family(recipe)
    if family:
        return Detection(family, note="recorded by ldmtool with the weights")
    return detect_family(shapes)


def _recorded_family(recipe: Optional[ConfigLike]) -> Optional[str]:
    if recipe is None:
        return None
    try:
        family = ldmtool_block(load_config(recipe)).get("family")
    except CheckpointError:  # a broken recipe is reported where it is used, unless --config/--preset replace it
        return None
    return family if isinstance(family, str) and family != "custom" else None
