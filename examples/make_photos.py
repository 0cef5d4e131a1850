"""Make examples/photos/ from three KDE wallpapers that no shipped default trains on.

    apt-get install plasma-workspace-wallpapers
    python examples/make_photos.py [--source /usr/share/wallpapers] [--out examples/photos]

Each photo is a fixed crop of the 2560x1600 original, shrunk by an integer factor with an area average (the mean
of each factor x factor block, rounded), so the small input is a clean downscale with no resampling kernel of its
own. The crops are 3:2 and every output is 120x80, the size of the example photos before them. The script checks
each source file's sha256 (recorded in examples/SOURCES.md) first, so a changed package cannot silently change
the examples; the output is then a pure function of the decoded JPEG (Pillow's libjpeg-turbo).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGE = "plasma-workspace-wallpapers"


@dataclass(frozen=True)
class ExamplePhoto:
    name: str  # output file in examples/photos
    wallpaper: str  # KDE wallpaper folder
    box: tuple[int, int, int, int]  # crop of the original: left, top, width, height (3:2)
    factor: int  # area downscale factor: output is width/factor x height/factor
    sha256: str  # of the source file, as installed by plasma-workspace-wallpapers 4:5.27.5-2

    @property
    def source(self) -> str:
        return f"{self.wallpaper}/contents/images/2560x1600.jpg"


PHOTOS = (
    # Whole scene: rows of cups, hard edges and smooth shading.
    ExamplePhoto("cups.png", "ColorfulCups", (80, 0, 2400, 1600), 20,
                 "6e0f3a72feb5a4a9fec191b77e34874c3c69e2d93040deb3f07773e73385023d"),
    # The boats on the shore: fine texture (gravel, planks), water, sky.
    ExamplePhoto("boats.png", "EveningGlow", (380, 380, 1800, 1200), 15,
                 "586682dcb362b9f620068f10138f87d0d3649939aef238adc5807cb951976a7a"),
    # A leaf in focus before bokeh: sharp veins beside defocused blur.
    ExamplePhoto("leaf.png", "FallenLeaf", (1250, 450, 1200, 800), 10,
                 "95603a6560c7e8d50e0e03b3f4adbe39c5258c72528e74e4ecaea1daf4e499de"),
)


def area_downscale(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each factor x factor block of an (H, W, 3) uint8 image whose sides are multiples of factor."""
    height, width = pixels.shape[0] // factor, pixels.shape[1] // factor
    blocks = pixels.reshape(height, factor, width, factor, 3).astype(np.float64)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def make(photo: ExamplePhoto, source_root: Path) -> Image.Image:
    source = source_root / photo.source
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if digest != photo.sha256:
        raise SystemExit(f"{source}: sha256 {digest}, expected {photo.sha256} (another package version?)")
    left, top, width, height = photo.box
    with Image.open(source) as image:
        crop = np.asarray(image.convert("RGB"))[top : top + height, left : left + width]
    return Image.fromarray(area_downscale(crop, photo.factor))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/wallpapers"), help="KDE wallpapers folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "photos")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for photo in PHOTOS:
        make(photo, args.source).save(args.out / photo.name, optimize=True)
        print(f"wrote {args.out / photo.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
