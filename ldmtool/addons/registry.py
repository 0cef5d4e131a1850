"""The add-on formats, one entry each, asked in order (as `families/registry.py` asks the families).

An entry says which kind of add-on it reads (`NETWORK`: per-layer weight changes such as LoRA; `EMBEDDING`:
textual-inversion vectors; `VAE`: a first stage), which keys it recognises and how it turns them into
ldmtool's form. Network entries work per layer: a LoRA file is grouped by layer address first, and each
layer's keys are read by the first entry that takes them, so a LyCORIS file that mixes LoRA, LoHa and LoKr
layers needs no entry of its own. A new format (a ControlNet, an IP-Adapter) is a new entry and the code
that applies its kind, not edits across pipelines.
"""
from __future__ import annotations

from typing import Sequence

from ldmtool.addons.base import AddonFormat
from ldmtool.addons.controlnet_keys import CONTROLNET_FORMATS
from ldmtool.addons.embeddings import EMBEDDING_FORMATS
from ldmtool.addons.lora import NETWORK_FORMATS
from ldmtool.addons.t2i_adapter import ADAPTER_FORMATS
from ldmtool.addons.vae import VAE_FORMATS

ADDON_FORMATS: tuple[AddonFormat, ...] = (*NETWORK_FORMATS, *EMBEDDING_FORMATS, *VAE_FORMATS,
                                            *CONTROLNET_FORMATS, *ADAPTER_FORMATS)


def formats(kind: str) -> Sequence[AddonFormat]:
    """The entries that read add-ons of one kind, in the order they are asked."""
    return [entry for entry in ADDON_FORMATS if entry.kind == kind]
