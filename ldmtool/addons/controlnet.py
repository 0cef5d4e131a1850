"""ControlNet files: loading one (`load_controlnet`, any layout of `addons/controlnet_keys.py`) and the
network wrapper that runs a model's ControlNets before its UNet at every call.

Hints travel with the conditioning (`Cond.control`) at latent resolution, as `pixel_unshuffle(hint, f)` with
f the model's first-stage factor (8 for SD; 4 for ldmtool's defaults): (B, C * f^2, h, w) for a
(B, C, fh, fw) hint. The tiled engine then cuts them like any spatial field, and `pixel_shuffle` gives each
tile exactly its fx crop of the hint; several ControlNets' hints are stacked along the channels. A
ControlNet's hint encoder downsamples by the same f (`hint_factor`, read from its keys).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ldmtool.addons.controlnet_keys import CONTROLNET, controlnet_params
from ldmtool.checkpoints.files import read_state_dict
from ldmtool.errors import CheckpointError
from ldmtool.nets.meta import meta_device

if TYPE_CHECKING:
    from ldmtool.nets.controlnet import ControlNet

# A1111's "ControlNet is more important": residual i of 13 scaled by 0.825 ** (12 - i), and the
# unconditional rows of guidance run without control.
SOFT_BASE = 0.825


def read_controlnet(path: Union[str, Path]) -> dict[str, Tensor]:
    """The ControlNet tensors of a file, in the released layout without prefix."""
    from ldmtool.addons.registry import formats

    path = Path(path)
    content = read_state_dict(path)  # a v1.0 file is a Lightning checkpoint (`state_dict` wrapper)
    keys = frozenset(content)
    for entry in formats(CONTROLNET):
        if entry.matches(keys):
            return entry.read(content, str(path))
    raise CheckpointError(f"{path}: not a ControlNet (no input_hint_block.* or controlnet_cond_embedding.* keys)")


def load_controlnet(path: Union[str, Path], *, heads: Optional[Mapping[str, Any]] = None,
                    device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> "ControlNet":
    """A ControlNet from a file (or a shipped one by name, e.g. "default-canny"), its architecture from the keys;
    `heads` ({"num_heads": n} or {"num_head_channels": n}, not recorded in weights) comes from a cldm YAML beside
    the file when there is one (as the shipped ones have), else defaults to the released models'."""
    from ldmtool.checkpoints.presets import controlnet_file

    path = controlnet_file(path) or Path(path)
    state = read_controlnet(path)
    net, params = checked_architecture(path, state, heads)
    net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, assign=True)
    net.config = params
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


def checked_architecture(path: Path, state: Mapping[str, Tensor],
                         heads: Optional[Mapping[str, Any]] = None) -> tuple["ControlNet", dict[str, Any]]:
    """The ControlNet (on the meta device) and its params for a file's tensors, raising CheckpointError
    where a key or shape does not fit the architecture the keys imply."""
    from ldmtool.nets.controlnet import ControlNet

    heads = heads if heads is not None else _recorded_heads(path)
    params = controlnet_params({k: tuple(v.shape) for k, v in state.items()}, heads)
    with meta_device():
        net = ControlNet(**params)
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: ControlNet keys do not match its architecture "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(net.state_dict()[key].shape):
            raise CheckpointError(f"{path}: ControlNet key {key} has shape {tuple(value.shape)}, "
                                  f"expected {tuple(net.state_dict()[key].shape)}")
    return net, params


def _recorded_heads(path: Path) -> Optional[dict[str, Any]]:
    """The attention heads a cldm YAML beside the weights records (`control_stage_config`), if any."""
    from ldmtool.checkpoints.config import load_config, model_block

    config = path.with_suffix(".yaml")
    if not config.is_file():
        return None
    params = (model_block(load_config(config)).get("params") or {}).get("control_stage_config", {}).get("params", {})
    heads = {key: params[key] for key in ("num_heads", "num_head_channels") if key in params}
    return heads or None


def base_unet_params(bundle: Any) -> dict[str, Any]:
    """The UNet config parameters of a bundle (CompVis `unet_config` or sgm `network_config`)."""
    params = (bundle.config.get("model") or {}).get("params") or {}
    return dict((params.get("unet_config") or params.get("network_config") or {}).get("params") or {})


def base_heads(bundle: Any) -> dict[str, Any]:
    """The attention head settings of a bundle's UNet config, which a ControlNet for it shares."""
    unet = base_unet_params(bundle)
    return {k: unet[k] for k in ("num_heads", "num_head_channels") if k in unet and unet[k] != -1}


def hint_factor(net: "ControlNet") -> int:
    """How much the ControlNet's hint encoder downsamples: one halving per stride-2 conv (8 as released)."""
    from ldmtool.nets.controlnet import HINT_CHANNELS

    return int(2 ** (len(net.config.get("hint_block_channels", HINT_CHANNELS)) - 1))


def check_fits(net: "ControlNet", bundle: Any, name: str) -> None:
    """CheckpointError when a ControlNet was made for another model (widths, levels, text width or the
    first stage's factor differ)."""
    down = getattr(getattr(bundle, "info", None), "downsampling", None)
    if down is not None and hint_factor(net) != down:
        raise CheckpointError(f"{name}: a ControlNet for another model (its hint encoder downsamples by "
                              f"{hint_factor(net)}; the model's first stage by {down})")
    unet = base_unet_params(bundle)
    context = unet.get("context_dim")
    context = context[0] if isinstance(context, (list, tuple)) else context
    for key, theirs in (("model_channels", unet.get("model_channels")), ("channel_mult", unet.get("channel_mult")),
                        ("context_dim", context)):
        mine = net.config.get(key)
        if theirs is not None and mine is not None and list(np.atleast_1d(mine)) != list(np.atleast_1d(theirs)):
            raise CheckpointError(f"{name}: a ControlNet for another model ({key} {mine}; the model's is {theirs})")


@dataclass(frozen=True)
class ActiveControl:
    """One ControlNet in a run: the network, its strength, the timesteps it acts at, its hint channels."""

    net: nn.Module
    strength: float
    acts: Callable[[Tensor], bool]  # timestep -> whether it acts (--control-start/--control-end)
    hint_channels: int
    soft: bool = False  # "ControlNet is more important"


def pack_hint(hint: Tensor, down: int = 8) -> Tensor:
    """(B, C, H, W) hint in [0, 1] -> (B, C * down^2, H / down, W / down), a field the tiler cuts."""
    return nn.functional.pixel_unshuffle(hint, down)


class ControlledNetwork:
    """`net(x, t, context=None, y=None, control=None, control_scale=None)`: the model's UNet, its
    ControlNets' residuals added. `control` holds the packed hints, `control_scale` (B, K) each row's
    multiplier per ControlNet (0 for guidance's unconditional rows in the soft mode)."""

    def __init__(self, unet: Callable[..., Tensor], controls: Sequence[ActiveControl], down: int = 8,
                 adapter_widths: Sequence[int] = (), adapter_factors: Sequence[int] = ()):
        self.unet = unet
        self.controls = tuple(controls)
        self.down = down
        self.adapter_widths = tuple(adapter_widths)  # T2I-Adapter feature widths per level (`pack_features`)
        self.adapter_factors = tuple(adapter_factors) or tuple(2**level for level in range(len(adapter_widths)))

    @property
    def tile_align(self) -> int:
        """Tile origins (latent pixels) at which a crop of the packed adapter features unpacks to exactly the
        features of the tile's place: the coarsest feature map's factor (1 without adapters)."""
        return max(self.adapter_factors, default=1)

    def __call__(self, x: Tensor, t: Tensor, context: Optional[Tensor] = None, y: Optional[Tensor] = None,
                 control: Optional[Tensor] = None, control_scale: Optional[Tensor] = None,
                 adapter: Optional[Tensor] = None) -> Tensor:
        residuals = None if control is None or not self.controls else self.residuals(x, t, context, y, control,
                                                                                    control_scale)
        features = None if adapter is None else unpack_features(adapter, self.adapter_widths, self.adapter_factors)
        return self.unet(x, t, context=context, y=y, control=residuals, adapter=features)

    def residuals(self, x: Tensor, t: Tensor, context: Optional[Tensor], y: Optional[Tensor], control: Tensor,
                  control_scale: Optional[Tensor]) -> Optional[list[Tensor]]:
        total: Optional[list[Tensor]] = None
        hints = torch.split(control, [c.hint_channels * self.down ** 2 for c in self.controls], dim=1)
        for index, (entry, packed) in enumerate(zip(self.controls, hints)):
            scale = torch.full((x.shape[0],), entry.strength, dtype=torch.float32, device=x.device)
            if control_scale is not None:
                scale = scale * control_scale[:, index].to(scale)
            if not bool((scale != 0).any()) or not entry.acts(t):
                continue
            hint = nn.functional.pixel_shuffle(packed, self.down)
            # An inpainting UNet's input has the mask and masked-image latent after the latent; a ControlNet
            # takes the latent alone (as diffusers' ControlNet inpaint pipeline gives it).
            channels = getattr(entry.net, "config", {}).get("in_channels", x.shape[1])
            out = entry.net(x[:, :channels], hint, t, context, y)
            weights = [SOFT_BASE ** (len(out) - 1 - i) if entry.soft else 1.0 for i in range(len(out))]
            out = [r * (scale.to(r.dtype).view(-1, 1, 1, 1) * w) for r, w in zip(out, weights)]
            total = out if total is None else [a + b for a, b in zip(total, out)]
        return total


def pack_features(features: Sequence[Tensor], factors: Optional[Sequence[int]] = None) -> Tensor:
    """T2I-Adapter features, map l at 1/factors[l] of the latent (default 2^l), as one
    (B, sum C_l / factors[l]^2, h, w) field at latent resolution that the tiler cuts like a hint."""
    factors = factors or [2**level for level in range(len(features))]
    return torch.cat([nn.functional.pixel_shuffle(f, k) for f, k in zip(features, factors)], dim=1)


def unpack_features(packed: Tensor, widths: Sequence[int], factors: Optional[Sequence[int]] = None) -> list[Tensor]:
    factors = factors or [2**level for level in range(len(widths))]
    parts = torch.split(packed, [w // k**2 for w, k in zip(widths, factors)], dim=1)
    return [nn.functional.pixel_unshuffle(p, k) for p, k in zip(parts, factors)]


def step_window(timesteps: Sequence[float], start: float, end: float) -> Callable[[Tensor], bool]:
    """Whether a network call at timestep t falls in the steps where a ControlNet acts: step i of n acts
    unless i / n < start or (i + 1) / n > end (diffusers' control_guidance_start/end)."""
    n = len(timesteps)
    acting = [float(t) for i, t in enumerate(timesteps) if not (i / n < start or (i + 1) / n > end)]
    if start <= 0 and end >= 1:
        return lambda t: True
    if not acting:
        return lambda t: False
    high, low = max(acting), min(acting)
    # Sampler calls between two steps (Heun, DPM++ 2S) take the step they start from.
    below = max((float(t) for t in timesteps if float(t) < low), default=-1.0)
    return lambda t: bool(below < float(t.reshape(-1)[0]) <= high + 1e-3)
