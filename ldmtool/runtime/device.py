"""Device and precision choice (DESIGN.md §6: --device auto|cpu|cuda|mps, --precision auto|fp32|fp16|bf16)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from ldmtool.errors import UsageError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def choose_device(name: str = "auto") -> "torch.device":
    """`auto` picks cuda, then mps, then cpu; an explicit device that is not available is a usage error."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is not a device name (use auto, cpu, cuda, cuda:N or mps)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available (try --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for but MPS is not available (try --device cpu)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name!r} is not supported (use auto, cpu, cuda, cuda:N or mps)")
    return device


def choose_dtype(precision: str, device: "torch.device") -> "torch.dtype":
    """fp32 on CPU; fp16 on GPU by default (bf16 where asked). Half precision on CPU is refused."""
    import torch

    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if precision == "fp32":
        return torch.float32
    if device.type == "cpu":
        raise UsageError(f"--precision {precision} needs a GPU; on the CPU use fp32")
    return torch.float16 if precision == "fp16" else torch.bfloat16


def release_host_memory() -> None:
    """Give freed heap memory back to the system (glibc `malloc_trim`; a no-op elsewhere).

    After a big tiled decode, glibc keeps hundreds of MiB of freed tile buffers mapped (they count in the
    process's resident memory and would be charged to the next phase); trimming once per image returns
    them without slowing the tiles themselves down, as a low mmap threshold would (+40% measured)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (restored after): for work whose kernels would otherwise
    split their ranges, and so their rounding, by the thread count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def available_host_memory() -> int:
    """MemAvailable (free plus reclaimable cache) where /proc/meminfo exists, else free pages, else 4 GiB."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30
