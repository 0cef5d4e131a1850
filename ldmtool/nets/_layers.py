"""Small layers shared by the UNet and the autoencoders.

Every spatial padding of the networks goes through `Conv2d` below (and `pad_2d` for the autoencoder's
asymmetric downsample pad), so seamless mode is one call: `set_seamless(model, x=True, y=False)` makes
every padding circular along the chosen axes and zero along the others. The state-dict keys stay those of
`torch.nn.Conv2d`.

`Conv2d` and `Linear` run the public `F.conv2d` / `F.linear`. Weights packed once for oneDNN come from
`--compile` (`ldmtool.nets.compiled`: torch.compile with frozen weights), not from private ops here.

`pointwise` applies the activations; see it for why they run in fixed pieces.
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


# Storage-only dtypes: a weight kept in one of them is upcast to the input's dtype for each call.
STORAGE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Half dtypes a transformer family's `Linear` weights stay stored in when it computes in fp32
# (`cast_keeping_storage(keep_half=True)`): upcast per layer as fp8 is, since a whole fp32 copy of a bf16
# FLUX.1 would double its memory, and bf16 arithmetic is emulated (several times slower) on a CPU without it.
HALF_STORAGE_DTYPES = (torch.bfloat16, torch.float16)


class Linear(nn.Linear):
    """`nn.Linear` (same keys). A weight stored in fp8 (or kept in bf16/fp16 under fp32 compute) stays so and
    is upcast one layer at a time, when the layer runs (`cast_keeping_storage`)."""

    def forward(self, x: Tensor) -> Tensor:
        stored = self.weight.dtype
        if stored in STORAGE_DTYPES or (stored != x.dtype and stored in HALF_STORAGE_DTYPES):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), bias)
        return F.linear(x, self.weight, self.bias)


def storage_weights(model: nn.Module, dtypes: tuple[torch.dtype, ...] = STORAGE_DTYPES) -> dict[Linear, Tensor]:
    """The weights of the model's `Linear` layers stored in one of `dtypes` (the ones `Linear` upcasts per call)."""
    return {m: m.weight for m in model.modules() if isinstance(m, Linear) and m.weight.dtype in dtypes}


def cast_keeping_storage(model: nn.Module, device: torch.device | str, dtype: Optional[torch.dtype], *,
                         keep_half: bool = False) -> None:
    """`model.to(device, dtype)` except that fp8-stored `Linear` weights keep their dtype (moved only):
    an fp8 file's transformer stays at one byte a weight, and no full-precision copy is ever made. With
    `keep_half` and fp32 compute, bf16/fp16-stored `Linear` weights are kept the same way."""
    half = HALF_STORAGE_DTYPES if keep_half and dtype == torch.float32 else ()
    kept = storage_weights(model, STORAGE_DTYPES + half) if dtype is not None else {}
    for layer in kept:  # out of the cast's way
        del layer._parameters["weight"]
    model.to(device=device, dtype=dtype)
    for layer, weight in kept.items():
        layer._parameters["weight"] = nn.Parameter(weight.to(device), requires_grad=False)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` whose zero padding can be switched to circular per axis (`seamless = (x, y)`)."""

    seamless: tuple[bool, bool] = (False, False)

    def forward(self, x: Tensor) -> Tensor:
        padding = _explicit_padding(self)
        if padding is None:  # 'same' with an even kernel: asymmetric, left to PyTorch (zero padding only)
            return super().forward(x)
        if any(self.seamless) and padding != (0, 0):
            pad_y, pad_x = padding
            x = pad_2d(x, (pad_x, pad_x, pad_y, pad_y), self.seamless)
            padding = (0, 0)
        if self.kernel_size == (1, 1) and self.stride == (1, 1) and self.groups == 1 and padding == (0, 0) and x.dim() == 4:
            return self._one_by_one(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def _one_by_one(self, x: Tensor) -> Tensor:
        """A 1x1 conv as one matrix product. oneDNN's 1x1 convolutions split their sums by the thread count
        (measured: 1, 2 and 3 threads give different roundings on an AVX2 EPYC), a matmul did not."""
        n, c, h, w = x.shape
        out = torch.matmul(self.weight.view(self.out_channels, c), x.reshape(n, c, h * w))
        if self.bias is not None:
            out = out.add_(self.bias.view(-1, 1))
        return out.view(n, self.out_channels, h, w)


class Conv1d(nn.Conv1d):
    """`nn.Conv1d` (same keys) whose 1-wide kernels run as one matrix product, as `Conv2d`'s 1x1 ones do and
    for the same reason: oneDNN's pointwise convolutions round by the thread count."""

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel_size != (1,) or self.stride != (1,) or self.groups != 1 or self.padding != (0,) or x.dim() != 3:
            return super().forward(x)
        out = torch.matmul(self.weight.view(self.out_channels, -1), x)
        return out if self.bias is None else out.add_(self.bias.view(-1, 1))


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


# ATen runs an elementwise kernel on one thread below this many elements (`at::internal::GRAIN_SIZE`).
# Above it the range is cut into one part per thread, and at each part's end the SIMD loop leaves its
# remainder to scalar code whose exp/erf/tanh round differently from the vector ones: where those cuts
# fall, and so the result, would follow the thread count. Transcendental activations therefore run in
# pieces of at most this size, cut at the same places whatever the thread count.
_GRAIN = 32768


def pointwise(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """`fn(x)` for an elementwise `fn`, computed piece by piece so that the result is thread-count independent
    (on the CPU: a GPU kernel's work split does not follow a thread count, and pieces would only add launches)."""
    if x.numel() <= _GRAIN or x.device.type != "cpu" or torch.compiler.is_compiling():
        return fn(x)  # a compiled graph runs its own fused kernels (see ldmtool.nets.compiled)
    width = x.shape[-1]
    rows = x.reshape(-1, width) if width <= _GRAIN else x.reshape(-1, 1)  # a view for the layouts used here
    return torch.cat([fn(part) for part in rows.split(max(1, _GRAIN // rows.shape[-1]))]).view(x.shape)


def silu(x: Tensor) -> Tensor:
    """SiLU, in place when no gradient is recorded (saves one activation-sized allocation per call), in
    pieces as `pointwise`."""
    if torch.is_grad_enabled() and x.requires_grad:
        return F.silu(x)
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.silu(x, inplace=True)
    if not x.is_contiguous():
        return pointwise(F.silu, x)
    for piece in x.view(-1).split(_GRAIN):
        F.silu(piece, inplace=True)
    return x


class SiLU(nn.Module):
    """`nn.SiLU` through `silu` (no parameters, so no keys)."""

    def forward(self, x: Tensor) -> Tensor:
        return silu(x)


class GELU(nn.Module):
    """`nn.GELU` through `pointwise` (no parameters, so no keys)."""

    def forward(self, x: Tensor) -> Tensor:
        return pointwise(F.gelu, x)


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


def as_list(value: int | Iterable[int], length: int, name: str, where: str) -> list[int]:
    """An int repeated per level, or a per-level list checked for length."""
    if isinstance(value, Iterable) and not isinstance(value, str):
        values = list(value)
        if len(values) != length:
            raise CheckpointError(f"{where}: {name} has {len(values)} entries but channel_mult has {length} levels")
        return values
    return [value] * length
