"""Small layers shared by the UNet and the autoencoders.

Every spatial padding of the networks goes through `Conv2d` below (and `pad_2d` for the autoencoder's
asymmetric downsample pad), so seamless mode is one call: `set_seamless(model, x=True, y=False)` makes
every padding circular along the chosen axes and zero along the others. The state-dict keys stay those of
`torch.nn.Conv2d`.

`Conv2d` and `Linear` also carry the CPU inference fast path (oneDNN with cached packed weights, switched
by `set_cpu_prepack`); training, other devices and other dtypes use the plain PyTorch ops.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmtool.errors import CheckpointError


def pad_2d(x: Tensor, pad: tuple[int, int, int, int], seamless: tuple[bool, bool]) -> Tensor:
    """Pad (left, right, top, bottom): circular along the axes marked in `seamless` (x, y), zeros elsewhere."""
    left, right, top, bottom = pad
    wrap_x, wrap_y = seamless
    if wrap_x and (left or right):
        x = F.pad(x, (left, right, 0, 0), mode="circular")
        left = right = 0
    if wrap_y and (top or bottom):
        x = F.pad(x, (0, 0, top, bottom), mode="circular")
        top = bottom = 0
    if left or right or top or bottom:
        x = F.pad(x, (left, right, top, bottom))
    return x


class _PackedWeightCache:
    """A oneDNN-reordered copy of `self.weight`, kept while the weight is unchanged (same storage and
    version counter). PyTorch's own CPU path re-lays the weight out on every call, which costs more than the
    arithmetic at the UNet's low resolutions (e.g. 1280-channel convs at 8x8, linears over 64 tokens)."""

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


def _guarded(fn, *args) -> Optional[Tensor]:
    """Run a oneDNN op; on a build that cannot, switch the fast path off for the process and return None."""
    try:
        return fn(*args)
    except (RuntimeError, AttributeError):
        _PREPACK["enabled"] = False
        return None


class Linear(_PackedWeightCache, nn.Linear):
    """`nn.Linear` that runs oneDNN with a cached packed weight on the CPU at inference (same keys)."""

    def forward(self, x: Tensor) -> Tensor:
        if _fast_cpu(x, self.weight) and x.dim() >= 2:
            rows = max(1, x.numel() // max(1, x.shape[-1]))
            packed = self._cached_pack((), lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows))
            if packed is not None:
                out = _guarded(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], ""))
                if out is not None:
                    return out
        return F.linear(x, self.weight, self.bias)


class Conv2d(_PackedWeightCache, nn.Conv2d):
    """`nn.Conv2d` whose zero padding can be switched to circular per axis (`seamless = (x, y)`).

    On the CPU at inference it runs oneDNN with a cached packed weight (see `_PackedWeightCache`); the
    output is then channels-last, which everything downstream accepts.
    """

    seamless: tuple[bool, bool] = (False, False)

    def forward(self, x: Tensor) -> Tensor:
        padding = _explicit_padding(self)
        if padding is None:  # 'same' with an even kernel: asymmetric, left to PyTorch (zero padding only)
            return super().forward(x)
        if any(self.seamless) and padding != (0, 0):
            pad_y, pad_x = padding  # type: ignore[misc]
            x = pad_2d(x, (pad_x, pad_x, pad_y, pad_y), self.seamless)
            padding = (0, 0)
        if _fast_cpu(x, self.weight) and x.dim() == 4:
            out = self._packed_forward(x, list(padding))
            if out is not None:
                return out
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def _packed_forward(self, x: Tensor, padding: list) -> Optional[Tensor]:
        geometry = (padding, list(self.stride), list(self.dilation), self.groups)
        packed = self._cached_pack(tuple(padding), lambda w: torch.ops.mkldnn._reorder_convolution_weight(
            w, *geometry, list(x.shape)))
        if packed is None:
            return None
        return _guarded(lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, *geometry, "none", [], ""))


def _explicit_padding(conv: nn.Conv2d) -> Optional[tuple[int, int]]:
    """The conv's padding as (pad_y, pad_x); None for 'same' padding that would be asymmetric."""
    if not isinstance(conv.padding, str):
        return conv.padding  # type: ignore[return-value]
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(t % 2 for t in total):
        return None
    return (total[0] // 2, total[1] // 2)


_PREPACK_AVAILABLE = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                      and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
_PREPACK = {"enabled": _PREPACK_AVAILABLE}


def set_cpu_prepack(enabled: bool, model: Optional[nn.Module] = None) -> None:
    """Switch the CPU oneDNN fast path (convs and linears) on or off for the process. It costs one extra
    copy of those weights (about 3.2 GiB for an SD 1.5 UNet in fp32). Switching off frees `model`'s copies."""
    _PREPACK["enabled"] = bool(enabled) and _PREPACK_AVAILABLE
    if not enabled and model is not None:
        for module in model.modules():
            module.__dict__.pop("_prepacked", None)


def _fast_cpu(x: Tensor, weight: Tensor) -> bool:
    """The oneDNN path applies: CPU, float32, and no gradient to record."""
    return (_PREPACK["enabled"] and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)))


def set_seamless(model: nn.Module, x: bool, y: bool) -> None:
    """Make every padding inside `model` circular along x and/or y (False, False restores zero padding)."""
    for module in model.modules():
        if hasattr(module, "seamless"):
            module.seamless = (bool(x), bool(y))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, as the reference `GroupNorm32`."""

    # Set by the tiled autoencoder passes (ldmtool/tiling/vae_norms.py) to normalise with statistics of the
    # whole canvas: `override(norm, x)` returns the output, or None for the usual one.
    override: ClassVar[Optional[Callable[[nn.GroupNorm, Tensor], Optional[Tensor]]]] = None

    def forward(self, x: Tensor) -> Tensor:
        if GroupNorm32.override is not None and (out := GroupNorm32.override(self, x)) is not None:
            return out
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        weight, bias = self.weight.float(), self.bias.float()  # a model cast whole to fp16/bf16
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """32-group normalisation of the reference code (eps 1e-5 in the UNet, 1e-6 in the autoencoder)."""
    return GroupNorm32(32, channels, eps=eps)


def silu(x: Tensor) -> Tensor:
    """SiLU, in place when no gradient is recorded (saves one activation-sized allocation per call)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return F.silu(x)
    return F.silu(x, inplace=True)


def add_residual(h: Tensor, x: Tensor) -> Tensor:
    """h + x, in place into h (a fresh tensor the caller owns) when autograd is not recording."""
    if torch.is_grad_enabled() and (h.requires_grad or x.requires_grad):
        return h + x
    return h.add_(x)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of `module` (the reference's initialisation of residual output layers)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def check_dims(dims: int, where: str) -> None:
    if dims != 2:
        raise CheckpointError(f"{where}: dims={dims} is not supported (only 2-D image networks, dims: 2)")


def as_list(value, length: int, name: str, where: str) -> list:
    """An int repeated per level, or a per-level list checked for length."""
    if isinstance(value, Iterable) and not isinstance(value, str):
        values = list(value)
        if len(values) != length:
            raise CheckpointError(f"{where}: {name} has {len(values)} entries but channel_mult has {length} levels")
        return values
    return [value] * length
