"""Reading checkpoint files: `.safetensors`, and `.ckpt/.pt/.pth` through `torch.load(weights_only=True)`.

Nothing here ever unpickles code: a pickle that needs more than tensors and plain containers is refused
with a message that says how to convert it. Tensors are memory-mapped where the format allows, so a large
checkpoint is not held twice in memory while a model is built from it.
"""
from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from ldmtool.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CONVERT_HINT = (
    "convert it once in a trusted environment, e.g. python -c \"import torch, safetensors.torch as s; "
    "sd=torch.load('IN', weights_only=False); s.save_file({k: v.contiguous() for k, v in "
    "sd.get('state_dict', sd).items() if torch.is_tensor(v)}, 'OUT.safetensors')\""
)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, by key (a Lightning `state_dict` wrapper is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return unwrap_state_dict(_read_pickle(path), path)
    raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r} (use .safetensors, .ckpt, .pt or .pth)")


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file (empty for other files)."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    return dict(_safetensors_header(path).get("__metadata__") or {})


def _safetensors_header(path: Path) -> dict:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header); download it again")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header runs past the end); download it again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({err.__class__.__name__}); download it again") from err
    ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    if ends and 8 + n + max(ends) > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, tensors need {8 + n + max(ends)}); download it again"
        )
    return header


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _safetensors_header(path)  # clear one-line errors for truncation before safetensors' own
    try:
        return load_file(str(path))  # memory-mapped by safetensors
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot read safetensors file: {str(err).splitlines()[0]}") from err


def _read_pickle(path: Path) -> object:
    mmap = zipfile.is_zipfile(path)  # only the zip format can be memory-mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: this checkpoint needs arbitrary code to unpickle, which ldmtool never runs; "
            f"{CONVERT_HINT}, or use 'ldmtool models convert' on a file that loads"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or not a PyTorch file?): {first}") from err


def unwrap_state_dict(obj: object, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a loaded object: Lightning's {'state_dict': ...} or a plain state dict; non-tensor
    entries (epoch counters, optimizer state in other keys) are ignored."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: not a state dict (found {type(obj).__name__}); expected key -> tensor")
    tensors = {str(k): v for k, v in obj.items() if torch.is_tensor(v)}
    if not tensors:
        raise CheckpointError(f"{path}: contains no tensors")
    return tensors


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors to `path` atomically (temporary name in the same folder, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors, seen = {}, set()
    for key, value in state.items():
        value = value.detach().contiguous()
        if value.data_ptr() in seen and value.numel():  # safetensors refuses shared storage (inpainting_big)
            value = value.clone()
        seen.add(value.data_ptr())
        tensors[key] = value
    try:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
