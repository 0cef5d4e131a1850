"""ControlNet hint preprocessors that need no model weights (OpenCV), and `ldmtool preprocess`'s task.

Each preprocessor maps an (H, W, 3) uint8 image to an (H, W, 3) uint8 hint of the same size:
  canny      edges (cv2.Canny with `low`/`high` thresholds), white on black
  tile       the image downsampled by `down` (area) and resampled back (cubic): ControlNet tile's input
  scribble   white where the grey image is brighter than `threshold`, black elsewhere (also `threshold`)
  shuffle    the image's content moved by a smooth random displacement field drawn from the item's seed
Depth, pose, segmentation or line-art hints come from the user's own files. ControlNet inpaint's hint sets
masked pixels to -1, outside what an image file holds; it is made in memory, not written.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from ldmtool.errors import UsageError
from ldmtool.io.images import read_image
from ldmtool.runtime.jobs import BaseTask, Job, Output


@dataclass(frozen=True)
class PreprocessSettings:
    low: int = 100  # canny: lower hysteresis threshold
    high: int = 200  # canny: upper threshold
    threshold: int = 127  # scribble/threshold: grey level (0-255) above which a pixel is white
    down: float = 4.0  # tile: downsampling factor before resampling back
    cells: int = 256  # shuffle: size in pixels of the displacement field's random cells


def canny(rgb: np.ndarray, s: PreprocessSettings, seed: int) -> np.ndarray:
    import cv2

    edges = cv2.Canny(rgb, s.low, s.high)
    return np.repeat(edges[:, :, None], 3, axis=2)


def tile(rgb: np.ndarray, s: PreprocessSettings, seed: int) -> np.ndarray:
    import cv2

    height, width = rgb.shape[:2]
    if s.down <= 1:
        return np.array(rgb)
    small = cv2.resize(rgb, (max(1, round(width / s.down)), max(1, round(height / s.down))), interpolation=cv2.INTER_AREA)
    return np.asarray(cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC))


def scribble(rgb: np.ndarray, s: PreprocessSettings, seed: int) -> np.ndarray:
    import cv2

    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    white = np.where(grey > s.threshold, 255, 0).astype(np.uint8)
    return np.repeat(white[:, :, None], 3, axis=2)


def shuffle(rgb: np.ndarray, s: PreprocessSettings, seed: int) -> np.ndarray:
    """Each output pixel reads the input at a smoothly varying random place (coarse uniform noise, upsampled
    with cubic interpolation and stretched to the image's extent)."""
    import cv2

    height, width = rgb.shape[:2]
    rng = np.random.default_rng(seed)
    cell = max(1, s.cells)

    def field(extent: int) -> np.ndarray:
        coarse = rng.uniform(0, 1, (height // cell + 2, width // cell + 2)).astype(np.float32)
        smooth = cv2.resize(coarse, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC)
        part = np.asarray(smooth)[cell : cell + height, cell : cell + width]
        part = part - part.min()
        stretched: np.ndarray = part / max(float(part.max()), 1e-6) * (extent - 1)
        return stretched

    map_x, map_y = field(width), field(height)
    return np.asarray(cv2.remap(rgb, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))


PREPROCESSORS: dict[str, Callable[[np.ndarray, PreprocessSettings, int], np.ndarray]] = {
    "canny": canny, "tile": tile, "scribble": scribble, "threshold": scribble, "shuffle": shuffle,
}
# The settings each preprocessor reads (what its outputs record).
USES = {"canny": ("low", "high"), "tile": ("down",), "scribble": ("threshold",), "threshold": ("threshold",),
        "shuffle": ("cells",)}


def inpaint_hint(rgb: np.ndarray, repaint: np.ndarray) -> np.ndarray:
    """ControlNet inpaint's hint: the image in [0, 1] with the pixels to repaint (mask >= 0.5) set to -1."""
    hint = np.array(rgb, dtype=np.float32)
    hint[repaint >= 0.5] = -1.0
    return hint


class PreprocessTask(BaseTask):
    """Each input image → its hint, of the same size (no model)."""

    command = "preprocess"
    reads_images = True

    def __init__(self, kind: str, settings: PreprocessSettings, *, max_pixels: int | None = None):
        if kind not in PREPROCESSORS:
            raise UsageError(f"preprocess {kind!r}: choose one of {', '.join(PREPROCESSORS)}")
        used = {name: value for name, value in asdict(settings).items() if name in USES[kind]}
        super().__init__(params={"preprocessor": kind, **used})
        self.kind, self.settings, self.max_pixels = kind, settings, max_pixels

    def validate(self) -> None:
        s = self.settings
        if not 0 <= s.low <= s.high:
            raise UsageError(f"--low {s.low} / --high {s.high}: need 0 <= low <= high")

    def load(self, job: Job) -> Any:
        assert job.item.path is not None, "preprocess items are discovered files"
        return read_image(job.item.path, max_pixels=self.max_pixels)

    def run(self, jobs: list[Job]) -> list[Output]:
        outputs = []
        for job in jobs:
            rgb = (job.payload.rgb * 255 + 0.5).clip(0, 255).astype(np.uint8)
            hint = PREPROCESSORS[self.kind](rgb, self.settings, job.seed)
            outputs.append(Output(image=hint.astype(np.float32) / 255))
        return outputs


def edge_agreement(rgb: np.ndarray, hint_edges: np.ndarray, reach: int = 2) -> float:
    """How well an image follows a canny hint: the IoU of the image's own canny edges (default thresholds) and
    `hint_edges` (bool H x W), each widened by `reach` pixels so that a one-pixel shift still counts as agreement."""
    import cv2

    mine = canny(rgb, PreprocessSettings(), 0)[..., 0] > 0
    kernel = np.ones((2 * reach + 1, 2 * reach + 1), np.uint8)
    a, b = (cv2.dilate(edges.astype(np.uint8), kernel) > 0 for edges in (mine, hint_edges))
    return float((a & b).sum() / max((a | b).sum(), 1))
