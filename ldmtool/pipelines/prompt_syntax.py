"""A1111's prompt syntax, parsed without torch: attention weights and extra networks.

- `(text)` multiplies the attention of `text` by 1.1, `[text]` divides it by 1.1, `(text:1.3)` sets the
  factor; they nest and multiply. An unclosed bracket applies to the rest of the prompt (as A1111 does).
  `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the characters themselves.
- `BREAK` (a word, capitals) ends the current 77-token chunk (`pipelines/prompt_encoding.py`).
- `<lora:NAME:WEIGHT>` (also `<lyco:...>`; `<lora:NAME:TE:UNET>` or `te=`/`unet=` weigh the text encoder
  and the UNet apart, as A1111 does) names an extra network; it is taken out of the text that is
  encoded, and the LoRA is applied to the model that samples the item (`ldmtool/addons/`).

Prompt editing (`[a:b:0.5]`) and alternation (`[a|b]`) are not supported: they are read as plain text
inside `[...]`, as A1111's attention parser reads them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK_WEIGHT = -1.0  # the weight of the ("BREAK", -1) marker, as A1111 writes it

_TOKEN = re.compile(r"""
    \\[()\[\]\\]                                     # an escaped bracket or backslash
  | \(                                               # open round
  | \[                                               # open square
  | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)    # ':1.3)' closes a round bracket with a weight
  | \)
  | \]
  | [^\\()\[\]:]+                                    # plain text
  | \\                                               # a lone backslash
  | :                                                # a colon that closes nothing is text
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_EXTRA_NETWORK = re.compile(r"<(?P<kind>lora|lyco):(?P<args>[^>]+)>")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) pieces of a prompt, neighbours of equal weight merged; BREAK is ("BREAK", -1)."""
    pieces: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):  # an escape; a lone backslash is dropped, as A1111 drops it
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:
            _append_text(pieces, token)
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    return _merged(pieces)


def _append_text(pieces: list[list[Any]], text: str) -> None:
    parts = _BREAK.split(text)
    for index, part in enumerate(parts):
        if index:
            pieces.append(["BREAK", BREAK_WEIGHT])
        pieces.append([part, 1.0])


def _merged(pieces: list[list[Any]]) -> list[tuple[str, float]]:
    out: list[list[Any]] = []
    for text, weight in pieces:
        if out and out[-1][1] == weight and weight != BREAK_WEIGHT:
            out[-1][0] += text
        elif text or weight == BREAK_WEIGHT:
            out.append([text, weight])
    return [(text, weight) for text, weight in out] or [("", 1.0)]


def is_plain(text: str) -> bool:
    """No syntax at all: the text is encoded exactly as it is written."""
    return parse_attention(text) == [(text, 1.0)] if text else True


# ---------------------------------------------------------------- extra networks


@dataclass(frozen=True)
class NetworkTag:
    """One `<lora:NAME:TE:UNET>` of a prompt, read as A1111 reads it: the first weight is the text encoder's,
    the second the UNet's (the first when absent); `te=`, `unet=` name them."""

    name: str
    weight: float = 1.0  # the text encoder's
    unet_weight: Optional[float] = None  # None: the same as `weight`


def extra_networks(text: str) -> tuple[str, tuple[NetworkTag, ...]]:
    """The prompt without its `<lora:...>` tags, and the tags in order. ValueError for a bad weight or an
    argument ldmtool does not apply (DyLoRA's `dyn`: it would be silently ignored)."""
    tags = []
    for match in _EXTRA_NETWORK.finditer(text):
        name, *arguments = match.group("args").split(":")
        weights = _tag_weights(match.group(0), [argument.strip() for argument in arguments])
        te = weights.get("te", 1.0)
        tags.append(NetworkTag(name.strip(), te, weights.get("unet")))
    return _EXTRA_NETWORK.sub("", text), tuple(tags)


def _tag_weights(tag: str, arguments: list[str]) -> dict[str, float]:
    """{"te": w, "unet": w} from a tag's arguments: positional te, unet; or named te=, unet=."""
    weights: dict[str, float] = {}
    positional = ("te", "unet")
    for index, argument in enumerate(arguments):
        key, equals, value = argument.partition("=")
        if not equals:
            key, value = (positional[index] if index < 2 else "dyn"), argument
        key, value = key.strip(), value.strip()
        if key == "dyn":
            raise ValueError(f"{tag}: DyLoRA's dyn (a rank limit) is not supported; give at most two weights "
                             "(text encoder, UNet)")
        if key not in positional:
            raise ValueError(f"{tag}: unknown argument {key!r} (te=WEIGHT, unet=WEIGHT)")
        if not value and not equals:
            continue  # `<lora:x:>`: the default weight
        weights[key] = _weight(tag, value)
    return weights


def _weight(tag: str, text: str) -> float:
    try:
        return finite_number(text)
    except ValueError as err:
        raise ValueError(f"{tag}: the weight {err}") from None


def finite_number(text: str) -> float:
    """A weight or strength written by the user; ValueError 'must be a number' / 'must be a finite number'."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a number") from None
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def without_extra_networks(text: str) -> str:
    """The prompt that is encoded: the text less its `<lora:...>` tags."""
    return _EXTRA_NETWORK.sub("", text) if "<" in text else text
