"""Networks built on the meta device: the architecture's shapes without storage, before a checkpoint's
weights are assigned to it.

`meta_device()` is `torch.device("meta")` that also skips the layers' random initialisation, which has no
values to fill there. Skipping it is not only tidier: torch has no meta kernel for `normal_` and runs it
through its Python reference implementation, whose first call imports torch's compiler stack (dynamo, sympy):
over a second of an eager command's start-up (1.3 s of the main job's) for an embedding's `N(0, 1)` that is
thrown away.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

_INITIALISERS: frozenset[Callable[..., Any]] = frozenset({
    Tensor.normal_, Tensor.uniform_, Tensor.random_, Tensor.bernoulli_, Tensor.exponential_,
    Tensor.log_normal_, Tensor.cauchy_, Tensor.geometric_,
    torch.nn.init.normal_, torch.nn.init.trunc_normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_,
    torch.nn.init.kaiming_normal_, torch.nn.init.xavier_uniform_, torch.nn.init.xavier_normal_,
    torch.nn.init.orthogonal_, torch.nn.init.sparse_,
})


class _NoInitOnMeta(TorchFunctionMode):
    """In-place random initialisers of meta tensors return the tensor untouched."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by keyword
        if func in _INITIALISERS and isinstance(target, Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


@contextmanager
def meta_device() -> Iterator[None]:
    """Modules made within the block live on the meta device, uninitialised."""
    with torch.device("meta"), _NoInitOnMeta():
        yield
