"""Masked sampling for models without an inpainting head, and the final feathered composite.

Masks follow the user convention (DESIGN.md §6): 1 (white) = repaint, 0 (black) = keep.

`masked_model` wraps the sampler-facing `model(x, sigma) -> x0` so that it works for every sampler: before
the network sees x, the kept region is replaced by the known latent re-noised to the current sigma (fresh
noise each call, as the CompVis DDIM `mask`/`x0` path does), and the x0 it returns there is the known
latent itself, which pulls the sampler's state in that region onto the known latent as sigma goes to 0.
The decoded result still differs slightly from the input in the kept region (the VAE round trip), so the
pipeline finishes with `composite`, which copies the input back exactly outside the feathered band.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


def masked_model(model: Model, known: torch.Tensor, repaint: torch.Tensor, noise: NoiseFn) -> Model:
    """`model` restricted to the repaint region; `known` (B, C, h, w) latent, `repaint` (B, 1, h, w) in [0, 1]."""
    keep = 1 - repaint.to(device=known.device, dtype=known.dtype)

    def wrapped(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        level = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        x_in = keep * (known + level * noise(x)) + (1 - keep) * x
        return keep * known + (1 - keep) * model(x_in, sigma)

    return wrapped


def latent_repaint_mask(repaint: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """An image-space repaint mask (B, 1, H, W) at latent size: a latent cell is repainted if any of its
    pixels is, so the kept region never reaches into pixels that must change."""
    return F.adaptive_max_pool2d(repaint.float(), latent_hw)


def feather(repaint: torch.Tensor, radius: int) -> torch.Tensor:
    """The repaint mask (B, 1, H, W) blurred by a Gaussian truncated at `radius` pixels: exactly 0 at every
    pixel farther than `radius` (along either axis) from the repaint region, exactly the mask for radius 0."""
    if radius <= 0:
        return repaint.float()
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / (radius / 2)) ** 2)
    kernel = (kernel / kernel.sum()).to(repaint.device)
    out = F.pad(repaint.float(), (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.reshape(1, 1, 1, -1))
    out = F.conv2d(out, kernel.reshape(1, 1, -1, 1))
    return out.clamp(0, 1)


def composite(image: torch.Tensor, result: torch.Tensor, repaint: torch.Tensor, radius: int) -> torch.Tensor:
    """Blend `result` into `image` (both (B, C, H, W), any value range) through the feathered repaint mask.

    Outside the feathered band the output is the input image exactly; inside the fully repainted region it
    is the result exactly.
    """
    if image.shape != result.shape:
        raise ValueError(f"image {tuple(image.shape)} and result {tuple(result.shape)} differ in shape")
    weight = feather(repaint, radius).to(image.dtype)
    blended = image + (result - image) * weight
    return torch.where(weight == 0, image, torch.where(weight == 1, result, blended))
