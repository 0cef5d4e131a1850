"""Small random RGB PNGs for tests that need a folder of images (training data, inputs)."""
from pathlib import Path

import numpy as np
from PIL import Image


def random_pngs(folder: Path, count: int, side: int, seed: int = 0) -> list[Path]:
    """`count` random `side` x `side` RGB PNGs img0.png ... in `folder` (same pixels for the same seed)."""
    rng = np.random.default_rng(seed)
    paths = [folder / f"img{i}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return paths
