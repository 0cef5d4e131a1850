"""A lossless first stage: each f×f patch of pixels becomes f²·C latent channels (pixel unshuffle).

The KL autoencoders compress: the shipped f4 one keeps 3 numbers per 4×4 patch, as many as the ×4 low-res
input itself has, and `benchmarks/first_stage_ceiling.py` measured what that costs a super-resolution
model (+1.29 dB over bicubic at best, with a perfect UNet). This first stage keeps all 48 and has no
weights: the latent grid is the KL one's (f = 4), so the UNet, the tiled sampler and the conditioning are
unchanged, while decoding is a reshape. Each latent cell decodes alone (`pointwise`), so strips of the
latent decode exactly and the engine needs no halo or streamed statistics.

ldmtool's own network, not a reference one: configs name it by `PATCH_TARGET`.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

PATCH_TARGET = "ldmtool.nets.patch_autoencoder.PatchAutoencoder"


class PatchAutoencoder(nn.Module):
    """`encode`: images (B, C, H, W) in [-1, 1], H and W multiples of `patch_size`, to (B, C·f², H/f, W/f);
    `decode` is its exact inverse."""

    pointwise = True  # a latent cell decodes to its own patch only

    def __init__(self, patch_size: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        if patch_size < 1 or in_channels < 1:
            raise ValueError(f"patch_size {patch_size} and in_channels {in_channels} must be positive")
        self.patch_size, self.in_channels = patch_size, in_channels
        self.embed_dim = in_channels * patch_size * patch_size

    def encode(self, x: Tensor) -> Tensor:
        return F.pixel_unshuffle(x, self.patch_size)

    def decode(self, z: Tensor) -> Tensor:
        return F.pixel_shuffle(z, self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
