"""Device and precision choice (DESIGN.md §6: --device auto|cpu|cuda|mps, --precision auto|fp32|fp16|bf16)."""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

from ldmtool.errors import UsageError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")

TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
EMULATED = "this CPU has no native {0}, so it is emulated (bf16 measured 100x slower than fp32 on an AVX2 CPU)"


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


@dataclass(frozen=True)
class PrecisionChoice:
    """The dtype a run computes in, its name as `--precision` spells it, and why it was chosen."""

    dtype: "torch.dtype"
    name: str
    reason: str
    emulated: bool = False  # half precision on a CPU without native support: far slower than fp32

    def to_json(self) -> dict[str, str]:
        return {"precision": self.name, "precision_reason": self.reason}


# CPU feature flags (Linux /proc/cpuinfo names) that make bf16 matrix multiplies faster than fp32 ones.
NATIVE_BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "bf16": "Arm BF16"}


# The test suite names the flags here (tests/conftest.py: a CPU without native bf16), so that `--precision
# auto` resolves alike on every machine that runs it, child processes included.
TEST_FLAGS_ENV = "LDMTOOL_TEST_CPU_FLAGS"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel lists them (x86 `flags`, Arm `Features`); empty where unknown."""
    pinned = os.environ.get(TEST_FLAGS_ENV)
    return frozenset(pinned.split()) if pinned is not None else _kernel_cpu_flags()


@functools.lru_cache(maxsize=1)
def _kernel_cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def machine_record(device: "torch.device") -> dict[str, Optional[str]]:
    """Where an output was computed, for its recipe: torch build, the CPU's kernel set and native bf16, and the
    GPU. Not part of a job's identity (another machine is the same job, within the bound README states), but
    what `replay` names when its pixels differ."""
    import torch

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16": native_cpu_bf16(), "gpu": gpu or (device.type if device.type != "cpu" else None)}


def native_cpu_bf16(flags: Optional[frozenset[str]] = None) -> Optional[str]:
    """The name of the CPU feature that computes bf16 natively, or None (bf16 is then emulated: slower than
    fp32). The kernel's flags decide; torch's own probe answers where they are unknown (macOS, Windows)."""
    flags = cpu_flags() if flags is None else flags
    for flag, name in NATIVE_BF16_FLAGS.items():
        if flag in flags:
            return name
    if not flags:
        import torch

        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        if probe is not None and probe():
            return "AVX512-BF16"
    return None


def _native_on_cpu(precision: str) -> bool:
    if precision == "fp16":
        return bool({"amx_fp16", "avx512_fp16"} & cpu_flags())
    return precision == "fp32" or native_cpu_bf16() is not None


def resolve_precision(precision: str, device: "torch.device") -> PrecisionChoice:
    """`--precision` as a dtype. `auto`: bf16 on CPUs that compute it natively (AMX, AVX512-BF16, Arm BF16),
    fp32 on others; fp16 on CUDA and MPS GPUs (the non-finite guard recomputes an overflow in fp32). An explicit
    bf16 or fp16 is honoured on any device (on a CPU without native support it is slower than fp32)."""
    import torch

    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        emulated = device.type == "cpu" and not _native_on_cpu(precision)
        reason = "asked for" + (f"; {EMULATED.format(precision)}" if emulated else "")
        return PrecisionChoice(getattr(torch, TORCH_DTYPE_NAMES[precision]), precision, reason, emulated)
    if device.type in ("cuda", "mps"):
        return PrecisionChoice(torch.float16, "fp16", f"auto: half precision on the {device.type} GPU")
    native = native_cpu_bf16()
    if device.type == "cpu" and native is not None:
        return PrecisionChoice(torch.bfloat16, "bf16", f"auto: the CPU computes bf16 natively ({native})")
    return PrecisionChoice(torch.float32, "fp32", "auto: the CPU has no native bf16")


def choose_dtype(precision: str, device: "torch.device") -> "torch.dtype":
    return resolve_precision(precision, device).dtype


def legacy_auto_dtype(device: "torch.device") -> "torch.dtype":
    """What `--precision auto` chose before it looked at CPU features (fp32 on every CPU): outputs recorded
    then name only `auto`, so a job's identity mentions the resolved precision only when it differs."""
    import torch

    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


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
