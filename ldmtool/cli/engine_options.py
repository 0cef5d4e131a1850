"""Model and sampling option values → the pipeline engine's choice records (no torch at import)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ldmtool.pipelines.engine import ModelChoice, SamplingChoice


def model_choice(model: str, config: Optional[Path], preset: Optional[str], no_ema: bool,
                 prediction: Optional[str], device: str, precision: str) -> "ModelChoice":
    from ldmtool.pipelines.engine import ModelChoice

    return ModelChoice(model=model, config=config, preset=preset, use_ema=not no_ema, prediction=prediction,
                       device=device, precision=precision)


def sampling_choice(sampler: Optional[str], steps: Optional[int], cfg: Optional[float], eta: Optional[float],
                    karras: Optional[bool], tile: Optional[int], tile_overlap: Optional[int],
                    max_memory: Optional[str], seamless: Optional[str] = None) -> "SamplingChoice":
    from ldmtool.pipelines.engine import SamplingChoice

    return SamplingChoice(sampler=sampler, steps=steps, cfg=cfg, eta=eta, karras=karras, tile=tile,
                          tile_overlap=tile_overlap, max_memory=max_memory, seamless=seamless)
