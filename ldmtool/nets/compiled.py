"""`--compile`: the denoising network through `torch.compile` (inductor) with frozen weights.

With frozen weights inductor packs every convolution and linear weight once for oneDNN (eager PyTorch
re-lays them out on every call) and fuses the elementwise work between the products (normalisations,
activations, bias and residual adds) into loops of its own. Inside a compiled graph the activations run
whole (`ldmtool.nets._layers.pointwise`): split into fixed pieces, as eager runs them, they made the graph
thousands of nodes long (21 minutes to compile the SD 1.5 UNet, then slower than eager).

The network is compiled for the shapes and the thread count of its calls; the tiled engine calls it with
one shape per run, so one compilation serves the run. Measured (`benchmarks/compile_step.py`, README
"Speed"): the SD 1.5 UNet, bf16, one step of two rows on a 2-core Intel Xeon with AMX, 1.41 s against
2.32 s eager, after 78 s of compilation in a new process (less when inductor's on-disk cache, kept in
ldmtool's cache folder, already holds the network).

What it changes: another kernel for every layer, so outputs differ from an eager run's by rounding (the
option is part of a job's identity), and oneDNN's packed kernels are chosen for the thread count, so a
compiled run's pixels follow the thread count as bf16 ones do (README "Reproducibility").
"""
from __future__ import annotations

import os

from torch import nn

_COMPILED = "_ldmtool_compiled"


def compile_network(network: nn.Module) -> nn.Module:
    """Make `network`'s calls go through `torch.compile` with frozen weights (in place; once per module).
    The weights must not change afterwards: the compiled graph holds them as constants."""
    if not getattr(network, _COMPILED, False):
        _keep_compiled_code()
        network.compile(dynamic=False, options={"freezing": True})
        setattr(network, _COMPILED, True)
    return network


def is_compiled(network: nn.Module) -> bool:
    return bool(getattr(network, _COMPILED, False))


def _keep_compiled_code() -> None:
    """Inductor's on-disk cache in ldmtool's cache folder (unless TORCHINDUCTOR_CACHE_DIR is set) rather than
    under /tmp, which a machine may clear between cron runs: a later process then compiles the same network
    in about a third of the time (tiny SD 1.x: 55 s cold, 20 s warm)."""
    from ldmtool.runtime.cache import cache_dir

    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        try:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir(create=True) / "inductor")
        except OSError:  # a cache folder that cannot be made: inductor's own default then
            pass
