"""Bounding-box layouts as the token sequence of the LDM layout2img-openimages256 model.

Facts from the reference data code (taming-transformers `conditional_builder/objects_bbox.py`,
`objects_center_points.py`, `utils.py`, `annotated_objects_dataset.py`, `open_images_helper.py`; the same
builder is in CompVis retrieval-augmented-diffusion-models), with the layout model's cond stage
(BERTEmbedder, vocab_size 8192, max_seq_len 92, no tokenizer):

- a coordinate (x, y) in [0, 1] is one token: with `sections = int(sqrt(no_tokens))` (90 for 8192),
  `round(y * (sections - 1)) * sections + round(x * (sections - 1))`;
- an object is three tokens: its representation `category_no + no_object_classes * modifier` (modifier bits:
  1 group-of, 2 occluded, 4 depiction, 8 inside), the token of its top-left and of its bottom-right corner;
- up to `no_max_objects` objects (30), padded with triples of the "none" token `no_tokens - 1`; then the
  crop box as two more tokens (`encode_crop`); 30 * 3 + 2 = 92 = max_seq_len. For a whole image the crop is
  (0, 0, 1, 1), tokens 0 and `sections**2 - 1`;
- category numbers: the OpenImages ids (MIDs) of the 'top 300 classes plus COCO compatibility' allow list,
  minus those merged by the COCO unification map (Man/Woman/Boy/Girl → Person, ...), sorted by MID with
  Suitcase (/m/01s55n) moved last: 340 classes (bundled as assets/labels/openimages_layout_classes.tsv).
  Merged names are accepted and mapped to their class, as the reference maps their annotations.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Optional, Sequence

from ldmtool.errors import UsageError
from ldmtool.families.info import ModelInfo

# Names the reference merges into another class before numbering (open_images_unify_categories_for_coco),
# plus the older OpenImages display names of six classes.
MERGED_NAMES = {
    "woman": "Person", "man": "Person", "girl": "Person", "boy": "Person", "bull": "Cattle",
    "football": "Ball", "tennis ball": "Ball", "kitchen knife": "Knife", "submarine sandwich": "Sandwich",
    "sofa bed": "Couch", "alarm clock": "Clock", "wall clock": "Clock",
    "lavender": "Lavender (Plant)", "dairy": "Dairy Product", "egg": "Egg (Food)", "sunflower": "Common sunflower",
    "lifejacket": "Personal flotation device", "horn": "French horn",
}


@dataclass(frozen=True)
class OpenImagesClass:
    number: int
    mid: str
    name: str


@lru_cache(maxsize=1)
def openimages_classes() -> tuple[OpenImagesClass, ...]:
    """The layout model's 340 classes in category-number order."""
    table = resources.files("ldmtool.assets").joinpath("labels/openimages_layout_classes.tsv")
    text = table.read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    return tuple(OpenImagesClass(int(number), mid, name) for number, mid, name in rows)


def _normal(text: str) -> str:
    return re.sub(r"[\s_]+", " ", text.strip().lower())


@lru_cache(maxsize=1)
def _by_name() -> dict[str, int]:
    table = {_normal(c.name): c.number for c in openimages_classes()}
    table.update({c.mid.lower(): c.number for c in openimages_classes()})
    table.update({alias: table[_normal(target)] for alias, target in MERGED_NAMES.items()})
    return table


def category_number(label: str) -> int:
    """The category number of an OpenImages class name (or MID); UsageError with suggestions otherwise."""
    table = _by_name()
    number = table.get(_normal(label))
    if number is None:
        names = [k for k in table if not k.startswith("/m/")]
        close = difflib.get_close_matches(_normal(label), names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UsageError(f"label {label!r} is not one of the layout model's OpenImages classes{hint}")
    return number


def category_name(number: int) -> str:
    return openimages_classes()[number].name


@dataclass(frozen=True)
class LayoutObject:
    """One object: category number and box corners (x0, y0, x1, y1) as fractions of the image."""

    category: int
    box: tuple[float, float, float, float]
    group_of: bool = False
    occluded: bool = False
    depiction: bool = False
    inside: bool = False


@dataclass(frozen=True)
class BoxTokenizer:
    """The reference's ObjectsBoundingBoxConditionalBuilder for whole images (crop (0, 0, 1, 1))."""

    no_tokens: int = 8192
    no_object_classes: int = 340
    max_objects: int = 30
    encode_crop: bool = True
    use_group_parameter: bool = True
    use_additional_parameters: bool = True

    @classmethod
    def for_sequence(cls, vocab_size: int, max_seq_len: int) -> "BoxTokenizer":
        """The tokenizer a cond stage of this vocabulary and length was trained with (crop tokens included)."""
        if (max_seq_len - 2) % 3 or max_seq_len < 5:
            raise UsageError(f"a layout sequence of {max_seq_len} tokens is not 3 per object plus 2 crop tokens")
        return cls(no_tokens=vocab_size, no_object_classes=len(openimages_classes()),
                   max_objects=(max_seq_len - 2) // 3)

    @property
    def sections(self) -> int:
        return int(math.sqrt(self.no_tokens))

    @property
    def none(self) -> int:
        return self.no_tokens - 1

    @property
    def length(self) -> int:
        return self.max_objects * 3 + (2 if self.encode_crop else 0)

    def coordinate(self, x: float, y: float) -> int:
        steps = self.sections - 1
        return int(round(y * steps)) * self.sections + int(round(x * steps))

    def representation(self, obj: LayoutObject) -> int:
        modifier = 0
        if self.use_group_parameter:
            modifier |= 1 * obj.group_of
        if self.use_additional_parameters:
            modifier |= 2 * obj.occluded | 4 * obj.depiction | 8 * obj.inside
        return obj.category + self.no_object_classes * modifier

    def tokens(self, objects: Sequence[LayoutObject],
               crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> list[int]:
        """The whole sequence for a layout (objects in the given order). `crop` (x0, y0, x1, y1, fractions of
        the image) is the part the model generates: the whole image, or one tile of it, as the reference
        rewrites the last two tokens per patch of a large image (objects keep their image coordinates)."""
        if len(objects) > self.max_objects:
            raise UsageError(f"{len(objects)} objects: the layout model takes at most {self.max_objects}")
        flat: list[int] = []
        for obj in objects:
            x0, y0, x1, y1 = obj.box
            flat += [self.representation(obj), self.coordinate(x0, y0), self.coordinate(x1, y1)]
        flat += [self.none] * (3 * (self.max_objects - len(objects)))
        if self.encode_crop:
            flat += [self.coordinate(crop[0], crop[1]), self.coordinate(crop[2], crop[3])]
        return flat


def tokenizer_for(info: ModelInfo) -> Optional[BoxTokenizer]:
    """The box tokenizer of a layout model (BERT-style cond stage that takes token ids, by cross-attention or
    beside a concatenated box raster), else None."""
    tokens = info.box_tokens
    return None if tokens is None else BoxTokenizer.for_sequence(tokens.vocab_size, tokens.max_seq_len)
