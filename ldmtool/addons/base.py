"""What an add-on format entry is, and reading an add-on file (torch-free at import)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

if TYPE_CHECKING:
    import torch

NETWORK = "network"  # per-layer weight changes (LoRA, LoHa, LoKr): `LayerChange` records
EMBEDDING = "embedding"  # textual-inversion vectors: a `TextualInversion`
VAE = "vae"  # a first stage: a state dict in the CompVis layout

ADDON_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".pth", ".bin")


@dataclass(frozen=True)
class AddonFormat:
    """One file format. `matches(keys)` says whether it reads these keys (for a network: one layer's
    parameter names, the address taken off); `read(content, where)` gives ldmtool's form."""

    name: str
    kind: str
    matches: Callable[[frozenset[str]], bool]
    read: Callable[[Mapping[str, Any], str], Any]


def read_addon_file(path: Path) -> Mapping[str, Any]:
    """The content of an add-on file: a safetensors file's tensors, or a pickle's object (weights only;
    textual-inversion .pt files hold nested dicts)."""
    from ldmtool.checkpoints.files import read_nested
    from ldmtool.errors import CheckpointError

    content = read_nested(path)
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path}: not an add-on file (found {type(content).__name__}, expected a dict)")
    return content


@dataclass(frozen=True)
class TextualInversion:
    """A textual-inversion embedding: its name (used in prompts) and its vectors per text encoder, keyed
    "" for SD 1.x/2.x files and "clip_l"/"clip_g" for SDXL's two encoders."""

    name: str
    vectors: Mapping[str, "torch.Tensor"]
    sha256: str = ""

    def for_width(self, width: int) -> Optional["torch.Tensor"]:
        """The (n, width) vectors for an encoder of that width, or None when the file has none."""
        found = [v for v in self.vectors.values() if v.shape[-1] == width]
        return found[0] if found else None
