"""Helpers shared by the benchmark scripts: JSON-line output, machine description, running a fresh child
process, its peak memory (the child reads its own `VmHWM`), and per-phase peaks inside one process
(`/proc/self/clear_refs` resets the kernel's high-water mark, `VmHWM` reads it)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


def emit(record: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed so a long sweep can be followed as it runs."""
    print(json.dumps(record), flush=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers were measured on (the load average matters on a shared machine)."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version()}


# -- a fresh child process --------------------------------------------------------------------------
# Its peak memory must come from the child itself (`VmHWM`, see `peak_rss`): the kernel's `ru_maxrss` from
# `wait4` carries over the parent's RSS through fork/vfork + exec, so it would report at least the size of
# the (possibly large) benchmark process that started the child.


@dataclass
class ChildRun:
    """A finished child process: exit status, wall seconds, its stdout and stderr."""

    returncode: int
    seconds: float
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, Any]]:
        """The child's stdout lines that are JSON objects (others are ignored)."""
        records = []
        for line in self.stdout.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records


def run_child(argv: Sequence[str], *, env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None,
              timeout: Optional[float] = None) -> ChildRun:
    """Run `argv` to completion (killed after `timeout` seconds), capturing its output in files."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=env, cwd=cwd)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return ChildRun(proc.returncode, seconds, out.read(), err.read())


def peak_rss() -> int:
    """This process's RSS high-water mark in bytes (its own address space only, unlike `ru_maxrss`)."""
    return status_kib("VmHWM") * 1024


def python_env(threads: Optional[int] = None) -> dict[str, str]:
    """The environment for a child Python: the repository importable, optionally a fixed thread count."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]


# -- per-phase peaks inside this process ----------------------------------------------------------


def status_kib(field: str) -> int:
    """A `VmRSS`/`VmHWM`-style field of /proc/self/status in KiB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class PhaseMemory:
    """One phase: RSS when it began, the highest RSS during it, RSS when it ended (bytes), wall seconds and
    the process's CPU seconds (user + system: unlike wall time, barely changed by other jobs on the machine)."""

    name: str
    start_rss: int
    peak_rss: int
    end_rss: int
    seconds: float
    cpu_seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        return {"phase": self.name, "start_rss_mib": round(self.start_rss / MIB, 1),
                "peak_rss_mib": round(self.peak_rss / MIB, 1),
                "peak_above_start_mib": round((self.peak_rss - self.start_rss) / MIB, 1),
                "retained_mib": round((self.end_rss - self.start_rss) / MIB, 1), "seconds": round(self.seconds, 3),
                "cpu_seconds": round(self.cpu_seconds, 3)}


class PhaseRecorder:
    """Wraps functions so each call is measured as a phase. Phases may nest: every open phase keeps a running
    peak, folded from the kernel's high-water mark before an inner phase resets it and again at each end."""

    def __init__(self, on_start: Optional[Callable[[str], None]] = None) -> None:
        self.on_start = on_start  # e.g. a progress line on stderr for long runs
        self.phases: list[PhaseMemory] = []
        self.exact = reset_peak()  # False: peaks are only as good as the RSS samples at phase edges
        self._running_peaks: list[int] = []

    def wrap(self, name: str, fn: Callable) -> Callable:
        def measured(*args, **kwargs):
            if self.on_start is not None:
                self.on_start(name)
            start_rss = status_kib("VmRSS") * 1024
            self._fold(status_kib("VmHWM") * 1024)
            reset_peak()
            self._running_peaks.append(start_rss)
            started, cpu_started = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
                self._fold(status_kib("VmHWM") * 1024)
                peak = self._running_peaks.pop()
                self.phases.append(PhaseMemory(name, start_rss, peak, status_kib("VmRSS") * 1024, seconds, cpu))

        return measured

    def _fold(self, high_water: int) -> None:
        self._running_peaks[:] = [max(p, high_water) for p in self._running_peaks]


# -- what the CPU can do --------------------------------------------------------------------------------


# Matrix products the peak is measured on (m, k, n): square ones and the token x channel shapes of an SD
# UNet's linear layers (64² latent, batch 2: 8192 tokens; 320 -> 2560 and 1280 -> 320 channels). A single
# square 1024 product measured a third of this CPU's bf16 rate on a Xeon with AMX (1.28 of 3.4 TFLOP/s).
PEAK_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (8192, 320, 2560), (8192, 1280, 320))


def matmul_peaks(seconds: float = 1.0) -> dict[str, Any]:
    """The CPU's instruction set, whether it computes bf16 natively, and its measured fp32 and bf16 matrix
    multiply rates (GFLOP/s): for each dtype the best over `PEAK_SHAPES` of repeated calls into a preallocated
    output within about `seconds` per shape, at torch's current thread count, with the shape that gave it.
    Every benchmark prints this beside its timings. Emulated bf16 (about 0.2 GFLOP/s on AVX2) is measured
    on one 256-side product, so that a call stays short."""
    import torch

    from ldmtool.runtime.device import native_cpu_bf16

    native = native_cpu_bf16()
    peaks: dict[str, Any] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        shapes = ((256, 256, 256),) if name == "bf16" and native is None else PEAK_SHAPES
        rates = {shape: _matmul_rate(shape, dtype, seconds) for shape in shapes}
        best = max(rates, key=lambda shape: rates[shape])
        peaks[f"{name}_matmul_gflops"] = round(rates[best], 1)
        peaks[f"{name}_matmul_shape"] = "x".join(map(str, best))
    return {"isa": torch.backends.cpu.get_cpu_capability(), "native_bf16": native,
            "threads": torch.get_num_threads(), **peaks}


def _matmul_rate(shape: tuple[int, int, int], dtype: Any, seconds: float) -> float:
    """GFLOP/s of the fastest of repeated (m, k) @ (k, n) products within about `seconds`."""
    import torch

    m, k, n = shape
    a, b, out = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype), torch.empty(m, n, dtype=dtype)
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return 2 * m * k * n / best / 1e9


def count_cpu_attention() -> None:
    """Teach torch's FlopCounterMode the CPU flash-attention kernel that SDPA runs (it counts the CUDA ones
    only), with the same formula: without it a UNet step's attention products are missing from its count."""
    import torch
    from torch.utils import flop_counter

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)
