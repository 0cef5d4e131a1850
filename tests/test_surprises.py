"""Surprises of issue 16 (item 4): each behaviour a user would not expect, pinned down."""
from pathlib import Path

import pytest
from PIL import Image

from ldmtool.errors import UsageError
from ldmtool.io.discover import Item, discover
from ldmtool.io.outputs import OutputSpec, plan_outputs


def _png(path: Path, size=(8, 8), colour=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, colour).save(path)
    return path


# ---------------------------------------------------------------- 1. the named mask wins


def test_explicit_mask_wins_over_the_mask_beside_the_image(tmp_path):
    image = _png(tmp_path / "img.png")
    _png(tmp_path / "img_mask.png", colour=255)
    left = _png(tmp_path / "left.png", colour=255)
    (item,) = discover([str(image), str(left)], pair_masks=True).items
    assert item.path == image and item.mask == left


def test_two_images_with_their_own_masks_stay_two_items(tmp_path):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    _png(tmp_path / "a_mask.png"), _png(tmp_path / "b_mask.png")
    items = discover([str(a), str(b)], pair_masks=True).items
    assert [(i.path, i.mask) for i in items] == [(a, tmp_path / "a_mask.png"), (b, tmp_path / "b_mask.png")]


# ---------------------------------------------------------------- 2. collisions recommend a stable field


def test_name_collision_recommends_a_stable_field(tmp_path):
    a, b = _png(tmp_path / "photo.png"), _png(tmp_path / "sub" / "photo.png")
    items = [Item(key="photo.png", stem="photo", path=a), Item(key="sub/photo.png", stem="photo", path=b)]
    with pytest.raises(UsageError) as caught:
        plan_outputs(items, [1, 2], OutputSpec(tmp_path / "out", template="x.{ext}"))
    message = str(caught.value)
    assert "add {seed} to --name" in message and "add {index}" not in message
    assert "{index} is the position in the run and renumbers" in message
    assert plan_outputs(items, [1, 2], OutputSpec(tmp_path / "out", template="{stem}-{seed}"))[0].name == "photo-1.png"
