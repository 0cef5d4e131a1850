"""`--compile`: the denoising network, and the first stage's decode, through `torch.compile` (inductor) with
frozen weights.

With frozen weights inductor packs every convolution and linear weight once for oneDNN (eager PyTorch
re-lays them out on every call) and fuses the elementwise work between the products (normalisations,
activations, bias and residual adds) into loops of its own. Inside a compiled graph the activations run
whole (`ldmtool.nets._layers.pointwise`): split into fixed pieces, as eager runs them, they made the graph
thousands of nodes long (21 minutes to compile the SD 1.5 UNet, then slower than eager).

The network is compiled for the shapes and the thread count of its calls; the tiled engine calls it with
one shape per run, so one compilation serves the run. Measured (`benchmarks/compile_step.py`, README
"Performance"): the SD 1.5 UNet, bf16, one step of two rows on a 2-core Intel Xeon with AMX, 1.41 s against
2.32 s eager, after 78 s of compilation in a new process (less when inductor's on-disk cache, kept in
ldmtool's cache folder, already holds the network).

The first stage's `decode` is compiled beside its eager one (`compiled_decode`) for the images the engine
decodes whole (up to 128x128 latents); the tiled decode of larger ones runs its layers one by one and stays
eager, as does a seamless decode (the circular padding is switched on the modules, which a compiled graph
would have to guard). SD's KL-f8 decoder at 512x512 in bf16 on the Xeon: 2.4-2.6 s compiled against 5.3 s
eager, after 31 s of compilation.

What it changes: another kernel for every layer, so outputs differ from an eager run's by rounding (the
option is part of a job's identity), and oneDNN's packed kernels are chosen for the thread count, so a
compiled run's pixels follow the thread count as bf16 ones do (README "Reproducibility").
"""
from __future__ import annotations

import os
from typing import Callable, Optional, cast

import torch
from torch import nn

from ldmtool.errors import UsageError
from ldmtool.nets._layers import HALF_STORAGE_DTYPES, STORAGE_DTYPES, storage_weights

_COMPILED = "_ldmtool_compiled"
_COMPILED_DECODE = "_ldmtool_compiled_decode"


def compile_network(network: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make `network`'s calls (computing in `dtype`) go through `torch.compile` with frozen weights (in place;
    once per module). The weights must not change afterwards: the compiled graph holds them as constants."""
    _refuse_upcast_storage(network, dtype)
    if not is_compiled(network):
        _prepare_inductor()
        network.compile(dynamic=False)
        setattr(network, _COMPILED, True)
    return network


def compile_decode(first_stage: nn.Module, dtype: torch.dtype) -> None:
    """Give `first_stage` a compiled `decode` (frozen weights, computing in `dtype`) beside its eager one; a
    first stage without weights (a reshape) has nothing to gain and gets none."""
    if next(first_stage.parameters(), None) is None or compiled_decode(first_stage) is not None:
        return
    _refuse_upcast_storage(first_stage, dtype)
    _prepare_inductor()
    decode = cast(Callable[[torch.Tensor], torch.Tensor], first_stage.decode)
    setattr(first_stage, _COMPILED_DECODE, torch.compile(decode, dynamic=False))


def compiled_decode(first_stage: nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The first stage's compiled `decode`, or None."""
    return first_stage.__dict__.get(_COMPILED_DECODE)


def decoder(first_stage: nn.Module, *, seamless: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The first stage's decode for the engine: the compiled one where there is one, but the eager one for a
    seamless decode (its circular padding is switched on the modules, which a compiled graph would guard)."""
    compiled = None if seamless else compiled_decode(first_stage)
    return compiled or cast(Callable[[torch.Tensor], torch.Tensor], first_stage.decode)


def _prepare_inductor() -> None:
    _keep_compiled_code()
    import torch._inductor.config as inductor_config

    # Set for the process, not passed as `options`: inductor reads `freezing` before it applies a compile
    # call's options (with options={"freezing": True} the SD 1.5 step took 2.01 s, with this 1.52 s).
    inductor_config.freezing = True


def _refuse_upcast_storage(network: nn.Module, dtype: torch.dtype) -> None:
    """A model whose weights stay in fp8 (or bf16 under fp32 compute) and are cast one layer per call: frozen,
    every cast weight would become a constant, a second and larger copy of the whole model."""
    kept = [w for w in storage_weights(network, STORAGE_DTYPES + HALF_STORAGE_DTYPES).values() if w.dtype != dtype]
    if kept:
        raise UsageError(f"--compile: this model keeps {len(kept)} weights in {str(kept[0].dtype).split('.')[-1]} "
                         "and casts them one layer at a time; compiled, it would hold a cast copy of each (run it "
                         "without --compile)")


def is_compiled(network: nn.Module) -> bool:
    return bool(getattr(network, _COMPILED, False))


def _keep_compiled_code() -> None:
    """Inductor's on-disk cache in ldmtool's cache folder rather than under /tmp, which a machine may clear
    between cron runs: a later process then compiles the same network in about a third of the time (tiny SD
    1.x: 55 s cold, 20 s warm). A TORCHINDUCTOR_CACHE_DIR the user chose is kept; inductor writes its own
    default into the variable the first time it looks, so that value counts as not chosen."""
    from torch._inductor.runtime.runtime_utils import default_cache_dir

    from ldmtool.runtime.cache import cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is not None and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return
    try:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir(create=True) / "inductor")
    except OSError:  # a cache folder that cannot be made: inductor's own default then
        pass
