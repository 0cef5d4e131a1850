"""Seeds and noise that reproduce whatever the device, batch size or tiling (DESIGN.md §4).

Every item gets its own seed, derived from the run's base seed and the item's key (its relative path or
prompt index), never from its position in the run. Noise is drawn from a CPU `torch.Generator` per item
and then moved to the device, so the same seed gives the same image on CPU and GPU, alone or batched.
"""
from __future__ import annotations

import hashlib
import secrets
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

SEED_LIMIT = 2**32


def random_seed() -> int:
    """A fresh base seed for runs without `--seed` (always recorded in the outputs)."""
    return secrets.randbelow(SEED_LIMIT)


def derive_seed(base_seed: int, key: str) -> int:
    """A stable 32-bit seed for one item: the same base seed and key always give the same value."""
    digest = hashlib.sha256(f"{base_seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class NoiseSource:
    """Gaussian noise for a batch of items, each item drawn from its own seeded CPU generator.

    `randn(shape, ...)` returns a tensor of shape (len(seeds), *shape); successive calls continue each
    item's stream, so a sampler that needs fresh noise per step stays reproducible per item.
    """

    def __init__(self, seeds: Sequence[int]):
        import torch

        self.seeds = list(seeds)
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in self.seeds]

    def randn(self, shape: Sequence[int], *, device="cpu", dtype=None) -> "torch.Tensor":
        import torch

        parts = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in self.generators]
        out = torch.stack(parts)
        return out.to(device=device, dtype=dtype or torch.float32)

    def like(self, x: "torch.Tensor") -> "torch.Tensor":
        """Noise shaped like a batch `x` whose first dimension is the number of items."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} but noise for {len(self.generators)} items")
        return self.randn(x.shape[1:], device=x.device, dtype=x.dtype)
