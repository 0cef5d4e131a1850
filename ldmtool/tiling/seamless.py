"""Seamless mode (`--seamless x|y|xy`): circular padding per axis in every convolution of a model.

The project's networks route all their spatial padding through `ldmtool.nets._layers` (`Conv2d`, and the
autoencoder's asymmetric downsample pad), whose modules carry a `seamless = (x, y)` switch. Any plain
`torch.nn.Conv2d` with padding (a foreign or test network) is given the same switch for the duration by
temporarily changing its class to that padding-aware subclass; its parameters and state-dict keys stay
the same. On leaving the context every module is back as it was.

The tiled engine follows: `TileConfig(wrap_x=..., wrap_y=...)` makes the latent planner wrap around, and
the tiled autoencoder reads the switch from the convolutions and wraps its halos.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

from ldmtool.errors import UsageError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Seamless:
    """Which axes wrap around."""

    x: bool = False
    y: bool = False

    def __bool__(self) -> bool:
        return self.x or self.y


def parse_seamless(text: Optional[str]) -> Seamless:
    """'x', 'y', 'xy' (or 'yx'); None or '' means off."""
    if not text:
        return Seamless()
    value = text.strip().lower()
    if value not in ("x", "y", "xy", "yx"):
        raise UsageError(f"--seamless {text!r} is not an axis choice; use x, y or xy")
    return Seamless(x="x" in value, y="y" in value)


@contextmanager
def seamless(*modules: Optional["nn.Module"], axes: Seamless) -> Iterator[None]:
    """Within the block, every convolution of `modules` pads circularly along `axes` (None modules skipped)."""
    from torch import nn

    from ldmtool.nets._layers import Conv2d

    saved_flags, saved_classes = [], []
    try:
        for module in (m for root in modules if root is not None for m in root.modules()):
            if isinstance(module, nn.Conv2d) and not hasattr(module, "seamless") and _pads(module):
                if module.padding_mode != "zeros":
                    raise ValueError(f"{type(module).__name__} pads with {module.padding_mode!r}; seamless needs zeros")
                saved_classes.append((module, module.__class__))
                module.__class__ = Conv2d
            if hasattr(module, "seamless"):
                saved_flags.append((module, module.__dict__.get("seamless")))
                module.seamless = (axes.x, axes.y)
        yield
    finally:
        for module, flag in saved_flags:
            if flag is None:
                module.__dict__.pop("seamless", None)  # back to the class default
            else:
                module.seamless = flag
        for module, cls in saved_classes:
            module.__class__ = cls


def _pads(conv) -> bool:
    padding = conv.padding
    return padding == "same" or (not isinstance(padding, str) and any(padding))
