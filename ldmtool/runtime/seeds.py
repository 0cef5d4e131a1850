"""Seeds as users mean them, and noise that reproduces whatever the batch (DESIGN.md §4, §6).

With `--seed N` (the run's base seed), generated items (prompts, `--n` samples) use N, N+1, ... in run
order, as A1111 and ComfyUI count; file items use a seed derived from N and the item's key (its relative
path), so adding files changes no other item's seed. An item may carry its own seed (a JSON prompt line's),
and `--item-seed S` runs the given items with exactly S. Noise is drawn per item from a CPU
`torch.Generator` seeded with the item's seed (as diffusers and ComfyUI draw the initial latent), then moved
to the device, so an item's noise never depends on the batch it shares.
"""
from __future__ import annotations

import hashlib
import secrets
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

if TYPE_CHECKING:
    import torch

SEED_LIMIT = 2**32
RANDOM = -1  # `--seed -1`: a random base seed, as in A1111 and stable-diffusion.cpp


def random_seed() -> int:
    """A fresh base seed for runs without `--seed` (always recorded in the outputs)."""
    return secrets.randbelow(SEED_LIMIT)


def item_seed(base_seed: int, *, key: str, offset: Optional[int] = None, own: Optional[int] = None) -> int:
    """An item's seed: its own when it has one, base + offset for generated items, else derived from the key."""
    if own is not None:
        return own
    if offset is not None:
        return (base_seed + offset) % SEED_LIMIT
    return derive_seed(base_seed, key)


def derive_seed(base_seed: int, key: str) -> int:
    """A stable 32-bit seed for one item: the same base seed and key always give the same value.

    The key is hashed as the bytes of its name (UTF-8, with surrogateescape as `os.fsencode` on Linux), so a
    file name that is not valid UTF-8 has a seed too, and UTF-8 keys keep the seeds they always had."""
    digest = hashlib.sha256(f"{base_seed}\x00{key}".encode("utf-8", "surrogateescape")).digest()
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

    def randn(self, shape: Sequence[int], *, device: "torch.device | str" = "cpu",
              dtype: "Optional[torch.dtype]" = None) -> "torch.Tensor":
        import torch

        parts = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in self.generators]
        out = torch.stack(parts)
        return out.to(device=device, dtype=dtype or torch.float32)

    def like(self, x: "torch.Tensor") -> "torch.Tensor":
        """Noise shaped like a batch `x` whose first dimension is the number of items."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} but noise for {len(self.generators)} items")
        return self.randn(x.shape[1:], device=x.device, dtype=x.dtype)


@contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Torch's CPU RNG seeded with `seed` inside the block and restored after: networks built inside
    initialise the same way for the same seed, and the caller's global random state is left alone."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
