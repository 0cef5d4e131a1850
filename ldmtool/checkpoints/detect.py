"""Family detection from key names and shapes (used when no --config or --preset is given). The rules
live with their families (ldmtool/families/); this is the checkpoints layer's entry point to them."""
from __future__ import annotations

from ldmtool.families.base import Detection, Shapes
from ldmtool.families.registry import detect_family

__all__ = ["Detection", "Shapes", "detect_family"]
