"""A layout as a box raster: one coverage map per class at latent resolution.

ldmtool's own layout models (`train diffusion --task layout --box-raster`) take it concatenated to the UNet
input beside the box tokens (conditioning_key "hybrid"); the released layout2img model takes the tokens
only. Each box is painted over the earlier ones (the order of the layout file, as the training scenes are
drawn), then every latent pixel gets the share of its factor x factor pixel block each class covers. A tile
of the raster is the raster of the tile, so the tiled engine can crop it like any other spatial input.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# One box: (channel, (x0, y0, x1, y1) as fractions of the image).
RasterBox = tuple[int, tuple[float, float, float, float]]


def box_labels(boxes: Sequence[RasterBox], height: int, width: int) -> np.ndarray:
    """(height, width) uint8: 0 where no box is, else 1 + the channel of the last box covering the pixel.
    Box edges round to the nearest pixel, as the procedural training scenes draw them."""
    labels = np.zeros((height, width), np.uint8)
    for channel, (x0, y0, x1, y1) in boxes:
        labels[round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)] = channel + 1
    return labels


def box_raster(boxes: Sequence[RasterBox], channels: int, image_hw: tuple[int, int], latent_hw: tuple[int, int],
               factor: int) -> np.ndarray:
    """(channels, *latent_hw) float32 coverage in [0, 1] of each channel's boxes.

    The boxes are fractions of an `image_hw` image; the latent canvas may be larger (padded right and
    bottom to a multiple of the model's downsampling), and padding is covered by no box.
    """
    height, width = latent_hw[0] * factor, latent_hw[1] * factor
    labels = np.zeros((height, width), np.uint8)
    labels[:image_hw[0], :image_hw[1]] = box_labels(boxes, *image_hw)
    raster = np.empty((channels, *latent_hw), np.float32)
    for channel in range(channels):
        hit = (labels == channel + 1).reshape(latent_hw[0], factor, latent_hw[1], factor)
        raster[channel] = hit.mean(axis=(1, 3), dtype=np.float32)
    return raster
