"""Sampler names, importable without torch (CLI help and early option checks); `samplers.SAMPLERS` has
the implementations, and a test keeps the two lists identical."""
from __future__ import annotations

SAMPLER_NAMES: tuple[str, ...] = ("ddim", "plms", "ddpm", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc")
