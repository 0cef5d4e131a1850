"""Compare the images of two output folders pixel by pixel, for "behaviour must not change" refactors.

Run the same commands with the code before and after a change into two folders, then

    python benchmarks/compare_outputs.py /tmp/before /tmp/after

prints one JSON line per image (relative path, `identical`, and where not, `max_diff` in 8-bit levels and the
share of differing values), and a `summary` line. Images present on one side only are listed as `missing`.
Exit status 0 when every image is present on both sides and identical, else 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from _common import emit

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def images(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}


def compare(before: Path, after: Path) -> dict[str, Any]:
    a, b = np.asarray(Image.open(before)), np.asarray(Image.open(after))
    if a.shape != b.shape:
        return {"identical": False, "shape_before": list(a.shape), "shape_after": list(b.shape)}
    diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
    record: dict[str, Any] = {"identical": bool(not diff.any()), "shape": list(a.shape)}
    if diff.any():
        record.update(max_diff=int(diff.max()), differing=round(float((diff > 0).mean()), 6))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    left, right = images(args.before), images(args.after)
    identical = 0
    for name in sorted(left | right):
        if name not in left or name not in right:
            emit({"file": name, "identical": False, "missing": "before" if name not in left else "after"})
            continue
        record = compare(args.before / name, args.after / name)
        identical += record["identical"]
        emit({"file": name, **record})
    total = len(left | right)
    emit({"summary": True, "images": total, "identical": identical, "different_or_missing": total - identical})
    return 0 if identical == total else 1


if __name__ == "__main__":
    sys.exit(main())
