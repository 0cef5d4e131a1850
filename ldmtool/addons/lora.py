"""LoRA and LyCORIS networks: read per layer, applied to a bundle's weights once per model load.

Each layer of a file becomes a `LayerChange`: the layer's address and how to compute its weight delta
(in float32). Applying a network at weight w adds `w * scale * delta` to the target weight, where scale is
`alpha / rank` when the file stores an alpha (else 1), as kohya-ss, LyCORIS, A1111 and diffusers'
`fuse_lora` do. The formats (one `AddonFormat` entry each):
- kohya-ss LoRA: `<address>.lora_down.weight`, `.lora_up.weight`, `.alpha` (conv LoRA: a k x k down and a
  1 x 1 up);
- LyCORIS LoHa: `hada_w1_a @ hada_w1_b` times (elementwise) `hada_w2_a @ hada_w2_b`;
- LyCORIS LoKr: `kron(w1, w2)`, each factor stored whole (`lokr_w1`) or as a product (`lokr_w1_a @ lokr_w1_b`);
- diffusers/PEFT: `<address>.lora_A.weight` (down) and `.lora_B.weight` (up), optional `.alpha`.
Tucker-decomposed layers (`lora_mid`, `hada_t1`, `lokr_t2`) and DoRA (`dora_scale`) are refused with a
clear message.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ldmtool.addons.base import NETWORK, AddonFormat, read_addon_file
from ldmtool.addons.layer_names import Target, flat
from ldmtool.errors import CheckpointError

TUCKER = ("lora_mid.weight", "hada_t1", "hada_t2", "lokr_t1", "lokr_t2")
UNSUPPORTED = (*TUCKER, "dora_scale")  # DoRA rescales the weight's norm: adding a delta would be wrong
_PARAMETERS = ("lora_down.weight", "lora_up.weight", "alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
               "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lora_A.weight",
               "lora_B.weight", "lora.down.weight", "lora.up.weight", *UNSUPPORTED)


@dataclass(frozen=True)
class LayerChange:
    """One layer of a network: its flat address, the format that read it, and its weight delta."""

    address: str
    format: str
    delta: Callable[[tuple[int, ...]], torch.Tensor]  # target shape -> float32 delta of that shape


def _f(tensor: Any) -> torch.Tensor:
    return tensor.detach().float()


def _scale(layer: Mapping[str, Any], rank: Optional[int]) -> float:
    alpha = layer.get("alpha")
    if alpha is None or rank is None:
        return 1.0
    return float(alpha) / rank


def _product(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up (out, r, ...) @ down (r, in, ...): the (out, in * k * k) matrix of a low-rank pair."""
    return up.flatten(1) @ down.flatten(1)


def _shaped(delta: torch.Tensor, shape: tuple[int, ...], address: str) -> torch.Tensor:
    if delta.numel() != torch.Size(shape).numel():
        raise CheckpointError(f"{address}: the network's layer has {tuple(delta.shape)} values for a weight of shape "
                              f"{shape}; it was made for another model")
    return delta.reshape(shape)


def _lora(down_key: str, up_key: str) -> Callable[[Mapping[str, Any], str], Callable]:
    def read(layer: Mapping[str, Any], address: str) -> Callable[[tuple[int, ...]], torch.Tensor]:
        down, up = _f(layer[down_key]), _f(layer[up_key])
        scale = _scale(layer, down.shape[0])
        return lambda shape: _shaped(_product(up, down), shape, address) * scale
    return read


def _loha(layer: Mapping[str, Any], address: str) -> Callable[[tuple[int, ...]], torch.Tensor]:
    w1 = _product(_f(layer["hada_w1_a"]), _f(layer["hada_w1_b"]))
    w2 = _product(_f(layer["hada_w2_a"]), _f(layer["hada_w2_b"]))
    scale = _scale(layer, layer["hada_w1_b"].shape[0])
    return lambda shape: _shaped(w1 * w2, shape, address) * scale


def _lokr_factor(layer: Mapping[str, Any], name: str) -> tuple[torch.Tensor, Optional[int]]:
    """A LoKr factor and, when it is stored as a product, its rank."""
    if name in layer:
        return _f(layer[name]), None
    a, b = _f(layer[f"{name}_a"]), _f(layer[f"{name}_b"])
    product = a @ b.flatten(1)
    return (product.reshape(a.shape[0], *b.shape[1:]) if b.dim() == 4 else product), b.shape[0]


def _lokr(layer: Mapping[str, Any], address: str) -> Callable[[tuple[int, ...]], torch.Tensor]:
    w1, rank1 = _lokr_factor(layer, "lokr_w1")
    w2, rank2 = _lokr_factor(layer, "lokr_w2")
    scale = _scale(layer, rank1 or rank2)
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return lambda shape: _shaped(torch.kron(w1, w2), shape, address) * scale


def _has(*names: str) -> Callable[[frozenset[str]], bool]:
    return lambda keys: all(name in keys for name in names) and not any(name in keys for name in UNSUPPORTED)


def _lokr_keys(keys: frozenset[str]) -> bool:
    whole_or_product = all(f"lokr_w{i}" in keys or {f"lokr_w{i}_a", f"lokr_w{i}_b"} <= keys for i in (1, 2))
    return whole_or_product and not any(name in keys for name in UNSUPPORTED)


NETWORK_FORMATS = (
    AddonFormat("kohya-ss LoRA", NETWORK, _has("lora_down.weight", "lora_up.weight"),
                _lora("lora_down.weight", "lora_up.weight")),
    AddonFormat("LyCORIS LoHa", NETWORK, _has("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), _loha),
    AddonFormat("LyCORIS LoKr", NETWORK, _lokr_keys, _lokr),
    AddonFormat("diffusers/PEFT LoRA", NETWORK, _has("lora_A.weight", "lora_B.weight"),
                _lora("lora_A.weight", "lora_B.weight")),
    AddonFormat("diffusers LoRA (lora.down/lora.up)", NETWORK, _has("lora.down.weight", "lora.up.weight"),
                _lora("lora.down.weight", "lora.up.weight")),
)


# ---------------------------------------------------------------- reading a file


def _split(key: str) -> tuple[str, str]:
    """(layer address, parameter name) of a key; the whole key and "" when no known parameter ends it."""
    for name in sorted(_PARAMETERS, key=len, reverse=True):
        if key.endswith("." + name):
            return key[: -len(name) - 1], name
    return key, ""


def read_network(path: Path) -> list[LayerChange]:
    """The layers of a LoRA/LyCORIS file; CheckpointError naming the file and a few keys it cannot read."""
    from ldmtool.addons.registry import formats

    content = read_addon_file(path)
    layers: dict[str, dict[str, Any]] = {}
    unknown = []
    for key, value in content.items():
        address, name = _split(str(key))
        if not name or not isinstance(value, torch.Tensor):
            unknown.append(str(key))
            continue
        layers.setdefault(address, {})[name] = value
    changes = []
    for address, layer in layers.items():
        keys = frozenset(layer)
        entry = next((e for e in formats(NETWORK) if e.matches(keys)), None)
        if entry is None:
            unknown.append(f"{address} ({', '.join(sorted(keys))})")
            continue
        changes.append(LayerChange(flat(address), entry.name, entry.read(layer, address)))
    if unknown:
        tucker = any(name in key for key in unknown for name in TUCKER)
        dora = any("dora_scale" in key for key in unknown)
        why = ("Tucker-decomposed layers are not supported" if tucker else "DoRA layers are not supported" if dora
               else "not a LoRA, LoHa, LoKr or PEFT layer")
        raise CheckpointError(f"{path}: {len(unknown)} keys ldmtool cannot read ({why}): {', '.join(unknown[:3])}"
                              f"{' ...' if len(unknown) > 3 else ''}")
    if not changes:
        raise CheckpointError(f"{path}: no LoRA layers in this file")
    return changes


# ---------------------------------------------------------------- applying


TEXT_ENCODER_PREFIXES = ("cond_stage_model.", "conditioner.")


def apply_network(root: torch.nn.Module, targets: Mapping[str, Target], changes: Sequence[LayerChange],
                  weights: tuple[float, float], source: str) -> int:
    """Add every layer's change to `root`'s parameters at `weights` (denoiser, text encoder) (new tensors:
    checkpoint tensors may be memory-mapped); CheckpointError listing a few layers the model has no place for.
    Returns the layers changed."""
    missing = [change.address for change in changes if change.address not in targets]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} layers match nothing in this model (another base model, "
                              f"e.g. SD 2 or SDXL?): {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    with torch.no_grad():
        for change in changes:
            target = targets[change.address]
            param = root.get_parameter(target.key)
            new = param.detach().float().clone()
            rows = slice(*target.rows) if target.rows else slice(None)
            try:
                delta = change.delta(tuple(new[rows].shape))
            except CheckpointError as err:  # a layer of another shape: say which of the run's files it is in
                raise CheckpointError(f"{source}: {err}") from None
            weight = weights[1] if target.key.startswith(TEXT_ENCODER_PREFIXES) else weights[0]
            new[rows] += delta.to(new.device) * weight
            param.data = new.to(param.dtype)
    return len(changes)
