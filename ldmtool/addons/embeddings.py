"""Textual-inversion embeddings: A1111 `.pt` files (`string_to_param`), `.safetensors` files (`emb_params`,
or SDXL's `clip_l`/`clip_g`), and diffusers' one-entry `{token: vectors}` files. An embedding is used in
a prompt by its file name (without the suffix), as A1111 and ComfyUI use it; a multi-vector embedding
takes as many token positions as it has vectors (`pipelines/prompt_encoding.py`).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional

import torch

from ldmtool.addons.base import ADDON_SUFFIXES, EMBEDDING, AddonFormat, TextualInversion, read_addon_file
from ldmtool.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    from ldmtool.runtime.cache import FileIdentity

SDXL_ENCODERS = ("clip_l", "clip_g")
MAX_VECTORS = 75  # one CLIP chunk: A1111 keeps an embedding whole within a chunk


def _single(vectors: Any, where: str) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2):
        raise CheckpointError(f"{where}: the embedding's vectors are not a (n, width) tensor")
    return vectors.detach().float().reshape(-1, vectors.shape[-1])


def _a1111(content: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    params = content["string_to_param"]
    params = getattr(params, "_parameters", params)  # files saved by old torch versions hold a ParameterDict
    if not isinstance(params, Mapping) or len(params) != 1:
        raise CheckpointError(f"{where}: an A1111 embedding holds exactly one term in string_to_param")
    return {"": _single(next(iter(params.values())), where)}


def _emb_params(content: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    return {"": _single(content["emb_params"], where)}


def _sdxl(content: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    return {name: _single(content[name], where) for name in SDXL_ENCODERS}


def _diffusers(content: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    return {"": _single(next(iter(content.values())), where)}


EMBEDDING_FORMATS = (
    AddonFormat("A1111 textual inversion (string_to_param)", EMBEDDING,
                lambda keys: "string_to_param" in keys, _a1111),
    AddonFormat("textual inversion (emb_params)", EMBEDDING, lambda keys: "emb_params" in keys, _emb_params),
    AddonFormat("SDXL textual inversion (clip_l, clip_g)", EMBEDDING,
                lambda keys: set(SDXL_ENCODERS) <= keys, _sdxl),
    AddonFormat("diffusers textual inversion ({token: vectors})", EMBEDDING, lambda keys: len(keys) == 1,
                _diffusers),
)


def read_embedding(path: Path) -> TextualInversion:
    """The embedding in a file, named by the file's stem; CheckpointError naming the file otherwise."""
    from ldmtool.addons.registry import formats
    from ldmtool.runtime.cache import file_sha256

    content = read_addon_file(path)
    keys = frozenset(str(key) for key in content)
    for entry in formats(EMBEDDING):
        if entry.matches(keys):
            return _fits_a_chunk(TextualInversion(path.stem, entry.read(content, str(path)), file_sha256(path)),
                                 path)
    raise CheckpointError(f"{path}: not a textual-inversion embedding (keys: {', '.join(sorted(keys)[:5])}; "
                          "expected string_to_param, emb_params, clip_l/clip_g or one token)")


def _fits_a_chunk(embedding: TextualInversion, path: Path) -> TextualInversion:
    count = max(len(vectors) for vectors in embedding.vectors.values())
    if count > MAX_VECTORS:
        raise CheckpointError(f"{path}: {count} vectors, more than the {MAX_VECTORS} tokens of one CLIP chunk")
    return embedding


def embedding_files(folder: Path) -> list[Path]:
    """The add-on files directly in `folder` (UsageError when it is not a folder)."""
    if not folder.is_dir():
        raise UsageError(f"--embeddings-dir {folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in ADDON_SUFFIXES and p.is_file())


def load_embeddings(folder: Path) -> list[TextualInversion]:
    """Every embedding in `folder` that reads; a file that does not is left out (`check_embeddings` refuses
    it up front where a prompt names it)."""
    read = [_read_once(path) for path in embedding_files(folder)]
    return [entry for entry in read if isinstance(entry, TextualInversion)]


def files_named(texts: Iterable[Optional[str]], folder: Optional[Path]) -> list[Path]:
    """The files of `folder` whose names `texts` use, tokenized as prompts are (pipelines/prompt_encoding.py)."""
    if folder is None or not folder.is_dir():
        return []
    from ldmtool.nets.tokenizers import clip_text_ids
    from ldmtool.pipelines.prompt_syntax import parse_attention, without_extra_networks

    pieces = [clip_text_ids(piece) for text in texts if text
              for piece, _ in parse_attention(without_extra_networks(text))]
    return [path for path in embedding_files(folder) if _within(clip_text_ids(path.stem), pieces)]


def _within(name: list[int], pieces: list[list[int]]) -> bool:
    return bool(name) and any(ids[i : i + len(name)] == name for ids in pieces for i in range(len(ids)))


def check_embeddings(texts: Iterable[Optional[str]], folder: Optional[Path]) -> dict[str, str]:
    """`{file name: sha256}` of the embeddings `texts` use; UsageError naming one that cannot be used."""
    used = {}
    for path in files_named(texts, folder):
        entry = _read_once(path)
        if not isinstance(entry, TextualInversion):
            raise UsageError(entry)
        used[path.name] = entry.sha256
    return used


def _read_once(path: Path) -> TextualInversion | str:
    """The embedding in `path`, read again only when the file changed (another inode, size, mtime or ctime).
    One that reads is noted as a file the run computes from: its vectors may be the file's mapping, so a run
    it changes under stops (runtime/watch.py)."""
    from ldmtool.runtime.cache import FileIdentity
    from ldmtool.runtime.watch import note_loaded

    identity = FileIdentity.of(path)
    entry = _read_cached(path, identity)
    if isinstance(entry, TextualInversion):
        note_loaded(identity)
    return entry


@functools.lru_cache(maxsize=256)
def _read_cached(path: Path, identity: "FileIdentity") -> TextualInversion | str:
    """An embedding, or the one-line reason it cannot be read (each item's prompt is checked; read once)."""
    try:
        return read_embedding(path)
    except (CheckpointError, UsageError) as err:
        return str(err)
