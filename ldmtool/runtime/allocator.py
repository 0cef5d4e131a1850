"""Freed memory stays in the process for the next allocation (glibc malloc; issue 17).

PyTorch's CPU tensors come from `malloc`. By default glibc gives every block over its mmap threshold (which
rises with what is freed, to at most 32 MiB) a mapping of its own, handed back to the kernel on `free`, and
trims the heap's free top back to the kernel too; the next tensor of that size then faults in and zeroes
every page again. A latent diffusion run allocates the same large activations at every step and tile: the
first stage's at 512x512 are 67-134 MB each. Measured on a 2-core Xeon (AMX), `ldmtool txt2img` with an SD
1.5-size model, 512x512, six images of 2 steps (`benchmarks/malloc_run.py`): 13.7 million page faults and
21.8 s of kernel CPU time with glibc's behaviour, 1.1 million and 3.3 s with memory kept (about as many as
for one image: only the heap's first growth faults), at the same peak memory (4490 and 4489 MiB). Keeping
only blocks under 32 MiB (glibc's largest threshold) still took 10.6 million faults and 18.6 s: the first
stage's activations are larger.

So a batch run serves every block from the heap (no mapping of its own) and trims the heap's free top only
past 2 GiB, as PyTorch's allocator on the GPU keeps freed memory. glibc before 2.38 aligns a block by
carving it from a slightly larger one, which can leave a freed block a few bytes too small for the next
request of its size; peak memory did not grow from it on the runs above, nor over six images in one process,
nor over sixteen photos of different sizes through `superres` (596 MB kept, 593 MB glibc's own). After a
large tiled decode the engine still hands freed memory back once per image (`release_host_memory`, glibc's
`malloc_trim`), so the next phase is not charged with the decode's buffers.

It is set when a batch run opens its task (`JobRunner.open`, the local and the Ray engine alike): the
command-line process is ldmtool's own, while a program that imports ldmtool as a library keeps its malloc as
it is. A user's own choice wins: nothing is changed when `GLIBC_TUNABLES` sets a `glibc.malloc.` tunable,
or when `LDMTOOL_MALLOC=system`. Other C libraries (musl, macOS) and preloaded allocators (jemalloc,
tcmalloc, which keep memory anyway) are left alone.
"""
from __future__ import annotations

import ctypes
import os
import sys
from functools import cache
from typing import Optional

MALLOC_ENV = "LDMTOOL_MALLOC"
_M_TRIM_THRESHOLD = -1  # mallopt parameters, glibc's <malloc.h>
_M_MMAP_MAX = -4
_KEEP_UP_TO = 2**31 - 1  # mallopt takes an int: trim the heap's free top only past 2 GiB


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (2.33+): the allocator's own accounting, in bytes."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@cache
def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # only glibc has it
            return None
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


def user_chose_malloc() -> bool:
    """Whether the user's environment decides how malloc behaves."""
    return os.environ.get(MALLOC_ENV) == "system" or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def keep_freed_memory() -> bool:
    """Serve every block from the heap and keep the heap's free memory for reuse. True when this process's
    malloc now does so (calling it again is harmless)."""
    libc = _glibc()
    if libc is None or user_chose_malloc():
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO))


def release_host_memory() -> None:
    """Give the heap's free memory back to the system now (glibc `malloc_trim`; a no-op elsewhere).

    After a big tiled decode the heap holds hundreds of MiB of freed tile buffers (they count in the
    process's resident memory and would be charged to the next phase); trimming once per image returns
    them without slowing the tiles themselves down, as a low mmap threshold would (+40% measured)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def mapped_bytes() -> Optional[int]:
    """Bytes glibc holds in blocks mapped on their own (each freed straight back to the kernel), or None where
    unknown (not glibc, or one older than 2.33)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblkhd)
