"""Prompts in A1111's syntax through a CLIP text encoder: weights, 77-token chunks, BREAK, clip skip and
textual-inversion vectors, computed the way A1111 computes them.

A prompt is parsed into weighted pieces (`pipelines/prompt_syntax.py`), each piece tokenized alone, and the
tokens laid into chunks of 75 (each then framed as <start> ... <end> and padded to 77). A chunk that fills up
with a comma among its last 20 tokens is cut after that comma, the rest going on in the next chunk
(A1111's default `comma_padding_backtrack`); `BREAK` starts a new chunk. Each chunk is encoded alone; when
any of its weights is not 1, every token's vector is scaled by its weight and the chunk is then rescaled so
its mean is what it was (A1111's "Original" emphasis). The chunks are concatenated along the sequence,
so a 150-token prompt gives a (154, D) context. A plain prompt of at most 75 tokens is one chunk with the
ids the encoder's own `tokenize` makes, and no weighting: exactly the context the encoder gives it.

Encoders without a token table (LDM-BERT) take the prompt as written.

SDXL's conditioner (`ConditionerPromptEncoder`) reads the prompt through each text tower as A1111 does:
every tower lays out the same chunks with its own start/end/pad ids, weights and restores the mean of its
own hidden states, and takes its own vectors of an SDXL embedding (`clip_l`, `clip_g`); the towers' contexts
join along the width, and the pooled vector is the pooling tower's for the first chunk (unweighted).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, cast

import torch
from torch import nn

from ldmtool.addons.base import TextualInversion
from ldmtool.nets.tokenizers import clip_text_ids, clip_token_id
from ldmtool.pipelines.prompt_syntax import BREAK_WEIGHT, parse_attention, without_extra_networks

COMMA_BACKTRACK = 20  # A1111's default: cut a full chunk after a comma among its last 20 tokens


@dataclass
class Chunk:
    """77 token ids, their weights, and the textual-inversion vectors to put at given positions."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    vectors: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    used: list[TextualInversion] = field(default_factory=list)  # the embeddings those vectors came from


class PromptEncoder:
    """Context (T, D) of one prompt, T a multiple of 77, on the CPU in float32."""

    def __init__(self, encoder: nn.Module, *, clip_skip: Optional[int] = None,
                 embeddings: Sequence[TextualInversion] = (), slot: Optional[str] = None):
        self.encoder = encoder
        self.clip_skip = clip_skip
        self.syntax = hasattr(encoder, "token_embedding") and hasattr(encoder, "encode_tokens")
        if not self.syntax:
            return
        self.table = cast(nn.Embedding, encoder.token_embedding)
        self.encode_tokens = cast(Callable[..., torch.Tensor], encoder.encode_tokens)
        frame = cast(Callable[..., torch.Tensor], encoder.tokenize)([""])[0].tolist()  # <start> <end> pad ...
        self.start, self.end, self.pad = frame[0], frame[1], frame[2]
        self.length = len(frame) - 2
        self.comma = clip_token_id(",</w>")
        width = self.table.weight.shape[-1]
        self.embeddings = [(clip_text_ids(e.name), e, vectors) for e in embeddings
                           if (vectors := _vectors(e, width, slot)) is not None]
        self.embeddings.sort(key=lambda entry: -len(entry[0]))  # the longest name wins where several match

    def __call__(self, text: str) -> torch.Tensor:
        if not self.syntax:
            context = cast(Callable[..., torch.Tensor], self.encoder.encode)([without_extra_networks(text)])[0]
            return context.float().cpu()
        return self.encode(text)[0]

    def encode(self, text: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(context (T, D), the pooled vector of the first chunk, or None for an encoder that does not pool)."""
        encoded = [self._encode(chunk) for chunk in self.chunks(text)]
        return torch.cat([z for z, _ in encoded]), encoded[0][1]

    def empty(self) -> torch.Tensor:
        """The context of the empty prompt: what shorter contexts are padded with, one chunk at a time."""
        return self("")

    # -- tokens

    def chunks(self, text: str) -> list[Chunk]:
        """The prompt laid out in framed chunks of 77 (at least one)."""
        builder = _ChunkBuilder(self)
        for piece, weight in parse_attention(without_extra_networks(text)):
            if weight == BREAK_WEIGHT and piece == "BREAK":
                builder.close()
                continue
            builder.add(clip_text_ids(piece), weight)
        return builder.finish()

    def embedding_at(self, ids: list[int], position: int) -> Optional[tuple[int, torch.Tensor, TextualInversion]]:
        """(tokens the embedding's name takes, its vectors, the embedding) when one starts at `position`."""
        for name_ids, embedding, vectors in self.embeddings:
            if name_ids and ids[position : position + len(name_ids)] == name_ids:
                return len(name_ids), vectors, embedding
        return None

    def embeddings_in(self, text: str) -> dict[str, TextualInversion]:
        """The embeddings a prompt uses by name, in the order they first appear (A1111's `TI hashes`)."""
        if not self.syntax or not self.embeddings:
            return {}
        return {e.name: e for chunk in self.chunks(text) for e in chunk.used}

    # -- encoding

    def _encode(self, chunk: Chunk) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        tokens = torch.tensor([chunk.tokens])
        with torch.inference_mode(), _vectors_at(self.table, chunk.vectors):
            out = self.encode_tokens(tokens, clip_skip=self.clip_skip)
        hidden, pooled = out if isinstance(out, tuple) else (out, None)
        z = hidden[0].float().cpu()  # (77, D)
        pooled = None if pooled is None else pooled[0].float().cpu()
        if all(weight == 1.0 for weight in chunk.weights):
            return z, pooled
        mean = z.mean()
        z = z * torch.tensor(chunk.weights)[:, None]
        restored: torch.Tensor = z * (mean / z.mean())
        return restored, pooled


def _vectors(embedding: TextualInversion, width: int, slot: Optional[str]) -> Optional[torch.Tensor]:
    """An embedding's vectors for one encoder: by its width, or (SDXL) by the tower's key if they fit it."""
    if slot is None:
        return embedding.for_width(width)
    vectors = embedding.vectors.get(slot)
    return vectors if vectors is not None and vectors.shape[-1] == width else None


# The key of each SDXL text tower's vectors in an embedding file, by the tower's class.
TOWER_SLOTS = {"FrozenCLIPEmbedder": "clip_l", "FrozenOpenCLIPEmbedder2": "clip_g"}


def tower_layers(tower: nn.Module) -> int:
    """How many transformer layers a text tower has (the deepest clip skip it can take)."""
    model: Any = tower
    if hasattr(model, "transformer") and hasattr(model.transformer, "text_model"):
        return int(model.transformer.text_model.config.num_hidden_layers)
    return len(model.model.transformer.resblocks)


class ConditionerPromptEncoder:
    """(context (T, D), pooled vector or None) of one prompt through every text tower of an sgm conditioner."""

    def __init__(self, conditioner: nn.Module, *, clip_skip: Optional[int] = None,
                 embeddings: Sequence[TextualInversion] = ()):
        towers: list[Any] = list(cast(Any, conditioner).text_embedders)
        slots = [TOWER_SLOTS.get(type(tower).__name__, "") for tower in towers]
        # an embedding is used only where it has vectors for every tower, so the towers lay out the same chunks
        usable = [e for e in embeddings
                  if all(_vectors(e, tower.token_embedding.weight.shape[-1], slot) is not None
                         for tower, slot in zip(towers, slots))
                  and len({len(e.vectors[slot]) for slot in slots}) == 1]
        self.towers = [PromptEncoder(tower, clip_skip=clip_skip, embeddings=usable, slot=slot)
                       for tower, slot in zip(towers, slots)]

    def encode(self, text: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        encoded = [tower.encode(text) for tower in self.towers]
        pooled = [p for _, p in encoded if p is not None]
        return torch.cat([z for z, _ in encoded], dim=-1), torch.cat(pooled) if pooled else None

    def embeddings_in(self, text: str) -> dict[str, TextualInversion]:
        return self.towers[0].embeddings_in(text)


class _ChunkBuilder:
    """A1111's chunking: 75 tokens a chunk, a full chunk cut after a late comma, BREAK, embeddings kept whole."""

    def __init__(self, owner: PromptEncoder):
        self.owner = owner
        self.done: list[Chunk] = []
        self.chunk = Chunk()
        self.last_comma = -1

    def add(self, ids: list[int], weight: float) -> None:
        length = self.owner.length
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == self.owner.comma:
                self.last_comma = len(self.chunk.tokens)
            elif (len(self.chunk.tokens) == length and self.last_comma != -1
                  and len(self.chunk.tokens) - self.last_comma <= COMMA_BACKTRACK):
                self._cut_after_comma()
            if len(self.chunk.tokens) == length:
                self.close()
            found = self.owner.embedding_at(ids, position)
            if found is None:
                self.chunk.tokens.append(token)
                self.chunk.weights.append(weight)
                position += 1
                continue
            taken, vectors, embedding = found
            self.chunk.used.append(embedding)
            if len(self.chunk.tokens) + len(vectors) > length:
                self.close()
            self.chunk.vectors.append((len(self.chunk.tokens) + 1, vectors))  # +1: after <start>
            self.chunk.tokens += [0] * len(vectors)  # placeholders (as A1111's); the vectors replace their rows
            self.chunk.weights += [weight] * len(vectors)
            position += taken

    def _cut_after_comma(self) -> None:
        cut = self.last_comma + 1
        rest = Chunk(self.chunk.tokens[cut:], self.chunk.weights[cut:],
                     [(p - cut, v) for p, v in self.chunk.vectors if p - 1 >= cut])
        self.chunk = Chunk(self.chunk.tokens[:cut], self.chunk.weights[:cut],
                           [(p, v) for p, v in self.chunk.vectors if p - 1 < cut], self.chunk.used)
        self.close()
        self.chunk = rest

    def close(self) -> None:
        """Frame the current chunk (<start> tokens <end>, padded) and begin a new one."""
        o, chunk = self.owner, self.chunk
        fill = o.length - len(chunk.tokens)
        chunk.tokens = [o.start, *chunk.tokens, o.end] + [o.pad] * fill
        chunk.weights = [1.0, *chunk.weights, 1.0] + [1.0] * fill
        self.done.append(chunk)
        self.chunk = Chunk()
        self.last_comma = -1

    def finish(self) -> list[Chunk]:
        if self.chunk.tokens or not self.done:
            self.close()
        return self.done


@contextlib.contextmanager
def _vectors_at(table: nn.Embedding, vectors: Sequence[tuple[int, torch.Tensor]]) -> Iterator[None]:
    """While encoding one chunk (batch of one), the token table's output rows at the given positions are
    the textual-inversion vectors (before the position embedding is added, as a new token's row would be)."""
    if not vectors:
        yield
        return

    def replace_rows(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for position, rows in vectors:
            output[0, position : position + len(rows)] = rows.to(output)
        return output

    handle = table.register_forward_hook(replace_rows)
    try:
        yield
    finally:
        handle.remove()
