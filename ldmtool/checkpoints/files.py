"""Reading checkpoint files: `.safetensors`, and `.ckpt/.pt/.pth` through `torch.load(weights_only=True)`.

Nothing here ever unpickles code: a pickle that needs more than tensors and plain containers is refused
with a message that says how to convert it. Tensors are memory-mapped where the format allows, so a large
checkpoint is not held twice in memory while a model is built from it.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Mapping, Optional

import torch

from ldmtool.errors import CheckpointError, UsageError
from ldmtool.io.files import file_kind

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CONVERT_HINT = (
    "convert it once in a trusted environment, e.g. python -c \"import torch, safetensors.torch as s; "
    "sd=torch.load('IN', weights_only=False); s.save_file({k: v.contiguous() for k, v in "
    "sd.get('state_dict', sd).items() if torch.is_tensor(v)}, 'OUT.safetensors')\""
)


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every `*.safetensors` file in a folder merged (a diffusers part: one file or the shards its index
    lists); empty when the folder holds none."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(read_state_dict(file))
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, by key (a Lightning `state_dict` wrapper is unwrapped)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.exists():
        raise UsageError(f"{path}: no such checkpoint file")
    _refuse_special(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        tensors = _read_safetensors(path)
        if not tensors:  # as a pickle checkpoint without tensors (unwrap_state_dict)
            raise CheckpointError(f"{path}: contains no tensors")
        return tensors
    if suffix in PICKLE_SUFFIXES:
        return unwrap_state_dict(_read_pickle(path), path)
    raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r} (use .safetensors, .ckpt, .pt or .pth)")


def read_nested(path: str | Path) -> object:
    """What a weights file holds, unflattened: a safetensors file's tensors, or the object a .pt/.ckpt
    unpickles to (weights only; add-on files such as textual-inversion embeddings hold nested dicts)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    return _read_pickle(path)


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file (empty for other files)."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    _refuse_special(path)
    return dict(_safetensors_header(path).get("__metadata__") or {})


def _refuse_special(path: Path) -> None:
    """A FIFO, device or socket named like a checkpoint (in a diffusers part's folder, say) is refused: reading
    one waits for a writer that never comes."""
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path}: not a regular file ({file_kind(path.stat().st_mode)})")


_HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                  "BOOL": torch.bool}


def header_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as its header describes them, on the meta device: names, shapes and dtypes
    (other dtypes as float32), nothing read or mapped beyond the header. What describing a model needs."""
    header = _safetensors_header(path)
    return {key: torch.empty(info["shape"], dtype=_HEADER_DTYPES.get(info["dtype"], torch.float32), device="meta")
            for key, info in header.items() if key != "__metadata__"}


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
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({err.__class__.__name__}); download it again") from err
    ends = _checked_header(path, header)
    if ends and 8 + n + max(ends) > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, tensors need {8 + n + max(ends)}); download it again"
        )
    return header


def _checked_header(path: Path, header: object) -> list[int]:
    """The data end offsets of a parsed header, after checking its shape: a JSON object whose entries
    are objects with two integer `data_offsets`, and an optional `__metadata__` of strings."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header ({why}); download it again")

    if not isinstance(header, dict):
        raise corrupt(f"a JSON {type(header).__name__}, not an object")
    ends = []
    for key, info in header.items():
        if key == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise corrupt("__metadata__ is not a map of strings")
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise corrupt(f"tensor {key[:80]!r} has no valid data_offsets")
        ends.append(offsets[1])
    return ends


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _safetensors_header(path)  # clear one-line errors for truncation before safetensors' own
    try:
        return load_file(str(path))  # memory-mapped by safetensors
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot read safetensors file: {first}") from err


# Training-framework objects that Lightning .ckpt files carry beside the weights (ModelCheckpoint
# callbacks, numpy scalars for counters, OmegaConf hyper-parameters). They are not needed, so the
# weights-only loader turns them into inert placeholders; any other global makes the file refused.
INERT_NAMESPACES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "numpy.", "omegaconf.", "typing.",
                    "_codecs.encode")


class _Inert:
    """Stands in for a non-tensor object of a known training framework; accepts and keeps nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


# Releases that fixed a way for a crafted file to run code through torch.load(weights_only=True).
WEIGHTS_ONLY_FIXES = (((2, 6), "CVE-2025-32434"), ((2, 10), "CVE-2026-24747"))


def weights_only_vulnerabilities(torch_version: str) -> list[str]:
    """The known weights_only CVEs of this torch version ('2.9.1+cpu' has CVE-2026-24747)."""
    release = _release(torch_version)
    return [cve for fixed, cve in WEIGHTS_ONLY_FIXES if release < fixed]


def _release(version: str) -> tuple[int, ...]:
    """'2.9.1+cpu' -> (2, 9, 1); '2.10.0a0+git1a2b' -> (2, 10, 0); unreadable -> (0,), treated as old."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else (0,)


def refuse_vulnerable_torch(path: Path, torch_version: str) -> None:
    """A pickle checkpoint is only as safe as the torch that unpickles it: refuse one on a torch with a
    known weights_only hole. Safetensors files never unpickle, so they load on any torch."""
    cves = weights_only_vulnerabilities(torch_version)
    if cves:
        raise CheckpointError(
            f"{path}: not loaded: torch {torch_version} can be made to run code hidden in a pickle checkpoint "
            f"({', '.join(cves)}); upgrade torch to 2.10 or later, or use a .safetensors file"
        )


def _read_pickle(path: Path) -> object:
    refuse_vulnerable_torch(path, torch.__version__)
    try:
        mmap = zipfile.is_zipfile(path)  # only the zip format can be memory-mapped
    except zipfile.BadZipFile as err:  # is_zipfile itself raises on some corrupt end records ("span multiple disks")
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or not a PyTorch file?): {err}") from err
    try:
        return _weights_only_load(path, mmap)
    except pickle.UnpicklingError as err:
        names = _unsafe_globals(path) if mmap else []
        refused = [n for n in names if not n.startswith(INERT_NAMESPACES)]
        if names and not refused:
            with torch.serialization.safe_globals([(_Inert, name) for name in names]):
                return _weights_only_load(path, mmap)
        protocol = _pickle_protocol(path, mmap)
        if protocol is not None and protocol > 2 and "Unsupported operand" in str(err):
            raise CheckpointError(
                f"{path}: saved with pickle protocol {protocol}, which torch's weights-only loader (the only one "
                f"ldmtool uses) cannot read; {CONVERT_HINT}"
            ) from err
        needs = f" (it needs {', '.join(refused[:3])})" if refused else ""
        raise CheckpointError(
            f"{path}: this checkpoint needs arbitrary code to unpickle{needs}, which ldmtool never runs; "
            f"{CONVERT_HINT}"
        ) from err


class _BoundedReads(io.BufferedReader):
    """A file whose read(n) never asks for more than is left in it. A legacy (non-zip) pickle is read from
    the file opcode by opcode, and an opcode that declares a 4 GiB string in a 1 kB file would otherwise make
    Python allocate the declared size before finding the end of the file."""

    def __init__(self, raw: io.RawIOBase) -> None:
        super().__init__(raw)
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(0, self._size - self.tell()))
            if size == 0:
                return b""
        return super().read(size)


def _weights_only_load(path: Path, mmap: bool) -> object:
    try:
        with warnings.catch_warnings():  # torch warns on stderr about any protocol but 2, then reads or refuses it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            if mmap:  # the zip format: torch reads each record at its own size, and maps the tensor data
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            with _BoundedReads(io.FileIO(path, "r")) as handle:
                return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise
    except Exception as err:
        # a text, random or cut file named .ckpt makes the loaders fail in arbitrary ways (struct.error from a
        # cut legacy file, an AssertionError inside torch, ...): every one is this file's fault, not a bug here
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not isinstance(err, (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile)):
            first = f"unpickling failed with {type(err).__name__}"
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or not a PyTorch file?): {first}") from err


def _pickle_protocol(path: Path, is_zip: bool) -> Optional[int]:
    """The protocol a checkpoint's pickle stream declares (its PROTO opcode), or None when it declares none."""
    try:
        if is_zip:
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.rpartition("/")[2] == "data.pkl"), None)
                if name is None:
                    return None
                with archive.open(name) as stream:
                    head = stream.read(2)
        else:
            with path.open("rb") as stream:
                head = stream.read(2)
    except (OSError, zipfile.BadZipFile):
        return None
    return head[1] if len(head) == 2 and head[0] == pickle.PROTO[0] else None


def _unsafe_globals(path: Path) -> list[str]:
    """Globals the pickle names that weights_only does not allow (found by scanning; nothing runs)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # an unreadable pickle stream: treat as needing arbitrary code
        return ["(unreadable pickle)"]


def unwrap_state_dict(obj: object, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a loaded object: a plain state dict, Lightning's {'state_dict': ...} (also nested
    twice), or one other entry that alone holds tensors ({'model': ...}, {'ema': ...}, {'module': ...});
    non-tensor entries (epoch counters, optimizer state) are ignored. Two entries that both hold tensors
    ({'model': ..., 'ema': ...}) are an error naming them: which one to use is the user's choice."""
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: not a state dict (found {type(obj).__name__}); expected key -> tensor")
    tensors = _tensors(obj)
    if tensors:
        return tensors
    holders = [str(k) for k, v in obj.items() if isinstance(v, Mapping) and _tensors(v)]
    if len(holders) == 1:
        return _tensors(obj[holders[0]])
    if holders:
        raise CheckpointError(f"{path}: holds several state dicts ({', '.join(map(repr, holders[:5]))}); save the "
                              f"one to use on its own, e.g. torch.save(torch.load(IN)[{holders[0]!r}], OUT)")
    raise CheckpointError(f"{path}: contains no tensors")


def _tensors(obj: Mapping) -> dict[str, torch.Tensor]:
    return {str(k): v for k, v in obj.items() if torch.is_tensor(v)}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors to `path` atomically (temporary name in the same folder, then rename)."""
    from safetensors.torch import save_file

    from ldmtool.io.writer import temp_name

    path = Path(path)
    tmp = temp_name(path)  # this process's own (two writers of one file do not share it), and fits any file name
    tensors, seen = {}, set()
    for key, value in state.items():
        value = value.detach().contiguous()
        if value.data_ptr() in seen and value.numel():  # safetensors refuses shared storage (inpainting_big)
            value = value.clone()
        seen.add(value.data_ptr())
        tensors[key] = value
    try:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
        tmp.chmod(0o666 & ~_umask())  # the writer creates 0600 files; give the usual permissions
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
