"""Opt-in CPU fast path for `Conv2d` and `Linear`: oneDNN with cached packed weights. NOT batch-invariant.

PyTorch's own CPU path re-lays a weight out on every call, which costs more than the arithmetic at a large
UNet's low resolutions (e.g. 1280-channel convs at 8x8, linears over 64 tokens). This path keeps a
oneDNN-reordered copy per layer instead, through private `torch.ops.mkldnn` ops. Their packed layout, and
so the kernel and its rounding, are chosen for the batch shape of the call that packed them
(`_reorder_linear_weight(w, rows)`, the conv reorder takes the input shape): with it on, an item's pixels
can depend on `--batch-size`, the tile batch and the thread count (measured on an AVX-512/AMX Xeon). So it
is off by default, and README "Reproducibility" does not hold while it is on. Switch it on for the process
with `set_cpu_prepack(True)`; it costs one extra copy of those weights (about 3.2 GiB for an SD 1.5 UNet
in fp32).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ldmtool.nets._layers import Conv2d, Linear

_AVAILABLE = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
              and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
_STATE = {"enabled": False}


def set_cpu_prepack(enabled: bool, model: Optional[nn.Module] = None) -> None:
    """Switch the oneDNN path on or off for the process. Switching off frees `model`'s packed copies."""
    _STATE["enabled"] = bool(enabled) and _AVAILABLE
    if not enabled and model is not None:
        for module in model.modules():
            module.__dict__.pop("_prepacked", None)


def applies(x: Tensor, weight: Tensor) -> bool:
    """The path is on and applies: CPU, float32, and no gradient to record."""
    return (_STATE["enabled"] and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)))


class PackedWeightCache:
    """A oneDNN-reordered copy of `self.weight`, kept while the weight is unchanged (same storage and
    version counter). Mixed into `Conv2d` and `Linear`; nothing is cached while the path is off."""

    weight: Tensor

    def _cached_pack(self, extra: tuple, build) -> Optional[Tensor]:
        weight = self.weight
        try:
            key = (weight.data_ptr(), weight._version, extra)
        except RuntimeError:  # inference tensors have no version counter: nothing safe to cache
            return None
        cached = self.__dict__.get("_prepacked")
        if cached is not None and cached[0] == key:
            return cached[1]
        packed = _guarded(build, weight.detach())
        self.__dict__["_prepacked"] = (key, packed) if packed is not None else None
        return packed

    def __getstate__(self) -> dict:
        # The packed weight is an opaque oneDNN tensor: it can be neither copied nor pickled. Rebuilt on use.
        state = dict(self.__dict__)
        state.pop("_prepacked", None)
        return state

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_prepacked", None)  # moved or cast: do not keep a stale CPU copy alive
        return super()._apply(fn, recurse)  # type: ignore[misc]


def linear(layer: Linear, x: Tensor) -> Optional[Tensor]:
    """`layer(x)` through oneDNN, or None when this build cannot (the caller then runs `F.linear`)."""
    rows = max(1, x.numel() // max(1, x.shape[-1]))
    packed = layer._cached_pack((), lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows))
    if packed is None:
        return None
    return _guarded(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], ""))


def conv2d(layer: Conv2d, x: Tensor, padding: list[int]) -> Optional[Tensor]:
    """`layer(x)` with explicit `padding` through oneDNN (a channels-last result), or None as for `linear`."""
    geometry = (padding, list(layer.stride), list(layer.dilation), layer.groups)
    packed = layer._cached_pack(tuple(padding), lambda w: torch.ops.mkldnn._reorder_convolution_weight(
        w, *geometry, list(x.shape)))
    if packed is None:
        return None
    return _guarded(lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, layer.bias, *geometry, "none", [], ""))


def _guarded(fn, *args) -> Optional[Tensor]:
    """Run a oneDNN op; on a build that cannot, switch the path off for the process and return None."""
    try:
        return fn(*args)
    except (RuntimeError, AttributeError):
        _STATE["enabled"] = False
        return None
