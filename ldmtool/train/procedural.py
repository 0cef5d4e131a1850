"""Procedural training data written by the project: label maps, box layouts and captioned shape scenes.

Each sample is a pure function of (seed, size). Classes differ in colour *and* texture statistics so
benchmarks can check that generated regions agree with the requested class by simple colour statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TextureClass:
    name: str
    colour: tuple[int, int, int]  # mean RGB
    grain: float  # texture wavelength in pixels (small = fine grain)
    amplitude: float  # texture strength in 0..255 units
    stretch: float = 1.0  # >1 stretches the texture horizontally (water ripples)


CLASSES: tuple[TextureClass, ...] = (
    TextureClass("sky", (120, 175, 235), 48.0, 8.0),
    TextureClass("grass", (70, 150, 50), 2.0, 30.0),
    TextureClass("water", (30, 75, 150), 6.0, 22.0, stretch=6.0),
    TextureClass("sand", (220, 195, 135), 1.5, 18.0),
    TextureClass("rock", (115, 110, 105), 10.0, 40.0),
    TextureClass("tree", (25, 85, 35), 5.0, 35.0),
)
CLASS_NAMES = tuple(c.name for c in CLASSES)


def _smooth_noise(height: int, width: int, wavelength: float, rng: np.random.Generator, stretch: float = 1.0) -> np.ndarray:
    """(H, W) float32 noise with unit-ish std and features about `wavelength` pixels across."""
    import cv2

    cells_y = max(2, math.ceil(height / wavelength) + 1)
    cells_x = max(2, math.ceil(width / (wavelength * stretch)) + 1)
    coarse = rng.standard_normal((cells_y, cells_x)).astype(np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return field / max(float(field.std()), 1e-6)


def texture(cls: TextureClass, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 texture of one class in 0..255 units."""
    field = _smooth_noise(height, width, cls.grain, rng, cls.stretch)
    tint = 1.0 + 0.1 * rng.standard_normal(3)  # slight per-sample colour variation
    base = np.asarray(cls.colour, np.float32) * tint.astype(np.float32)
    return base[None, None, :] + cls.amplitude * field[:, :, None]


def render_labels(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An (H, W, 3) uint8 image whose every pixel shows the texture of its class in `labels` (H, W)."""
    height, width = labels.shape
    image = np.zeros((height, width, 3), np.float32)
    for index in np.unique(labels):
        region = labels == index
        image[region] = texture(CLASSES[int(index)], height, width, rng)[region]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def label_map(size: int, rng: np.random.Generator, n_classes: int = len(CLASSES), blobs: float = 4.0) -> np.ndarray:
    """(size, size) uint8 class ids of blobby regions: argmax over one smooth random field per class."""
    fields = np.stack([_smooth_noise(size, size, size / blobs, rng) for _ in range(n_classes)])
    fields += rng.uniform(-0.5, 0.5, size=(n_classes, 1, 1)).astype(np.float32)  # vary class areas
    return np.argmax(fields, axis=0).astype(np.uint8)


def semantic_sample(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image (size, size, 3) uint8, labels (size, size) uint8) with matching regions."""
    rng = np.random.default_rng(seed)
    labels = label_map(size, rng)
    return render_labels(labels, rng), labels


@dataclass(frozen=True)
class Box:
    """One object of a layout: class id and corners as fractions of the image size."""

    cls: int
    x0: float
    y0: float
    x1: float
    y1: float


def layout_sample(seed: int, size: int, max_boxes: int = 4) -> tuple[np.ndarray, list[Box]]:
    """(image (size, size, 3) uint8, boxes): a sky/ground background with textured objects in boxes.

    Later boxes are drawn over earlier ones, as a layout-to-image model should learn.
    """
    rng = np.random.default_rng(seed)
    horizon = int(rng.integers(size // 3, 2 * size // 3))
    labels = np.zeros((size, size), np.uint8)  # sky above the horizon
    labels[horizon:] = int(rng.choice([1, 3]))  # grass or sand below
    boxes = []
    for _ in range(int(rng.integers(1, max_boxes + 1))):
        cls = int(rng.choice([2, 4, 5]))  # water, rock, tree objects
        w, h = rng.uniform(0.15, 0.5, size=2)
        x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        box = Box(cls, float(x0), float(y0), float(x0 + w), float(y0 + h))
        labels[round(box.y0 * size) : round(box.y1 * size), round(box.x0 * size) : round(box.x1 * size)] = cls
        boxes.append(box)
    return render_labels(labels, rng), boxes


COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "left of", "right of")
# Every word of a shape scene's caption: recorded as an exported txt2img model's `vocabulary`.
CAPTION_WORDS = tuple(sorted({"a", *COLOURS, *SHAPES, *" ".join(RELATIONS).split()}))


def _draw_shape(image: np.ndarray, shape: str, centre: tuple[float, float], radius: float, colour) -> None:
    import cv2

    cx, cy = round(centre[0]), round(centre[1])
    r = max(2, round(radius))
    if shape == "circle":
        cv2.circle(image, (cx, cy), r, colour, thickness=-1, lineType=cv2.LINE_AA)
    elif shape == "square":
        cv2.rectangle(image, (cx - r, cy - r), (cx + r, cy + r), colour, thickness=-1)
    else:
        points = np.array([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], np.int32)
        cv2.fillPoly(image, [points], colour, lineType=cv2.LINE_AA)


def shape_scene(seed: int, size: int) -> tuple[np.ndarray, str]:
    """(image (size, size, 3) uint8, caption) such as "a red circle above a blue square"."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    colour_a, colour_b = (names[i] for i in rng.choice(len(names), size=2, replace=False))
    shape_a, shape_b = (SHAPES[int(i)] for i in rng.integers(0, len(SHAPES), size=2))
    relation = RELATIONS[int(rng.integers(0, len(RELATIONS)))]
    radius = size * rng.uniform(0.1, 0.16)
    offset = size * rng.uniform(0.2, 0.3)
    centre = np.array([size / 2, size / 2]) + rng.uniform(-0.08, 0.08, size=2) * size
    direction = {"above": (0, -1), "below": (0, 1), "left of": (-1, 0), "right of": (1, 0)}[relation]
    pos_a = centre + np.array(direction) * offset
    pos_b = centre - np.array(direction) * offset
    grey = int(rng.integers(200, 240))
    noise = rng.normal(0, 4, size=(size, size, 1))
    image = np.clip(grey + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
    _draw_shape(image, shape_a, tuple(pos_a), radius, COLOURS[colour_a])
    _draw_shape(image, shape_b, tuple(pos_b), radius, COLOURS[colour_b])
    return image, f"a {colour_a} {shape_a} {relation} a {colour_b} {shape_b}"


def procedural_image(seed: int, size: int) -> np.ndarray:
    """A (size, size, 3) uint8 image from one of the three generators above, picked by `seed`.

    Mixed into a first stage's training crops, these teach it the saturated colours and flat regions the
    semantic, layout and txt2img defaults must reproduce (the photo corpus is mostly grey).
    """
    generators = (semantic_sample, layout_sample, shape_scene)
    return generators[seed % len(generators)](seed, size)[0]
