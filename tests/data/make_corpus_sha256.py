"""Write tests/data/corpus_sha256.txt: the sha256 of every image of the built-in corpus (both splits).

    PYTHONPATH=. python tests/data/make_corpus_sha256.py

tests/test_example_photos.py checks against this stored list that no example photo is a corpus image, so the
check needs no corpus; rerun this after the corpus changes (another scikit-image version, matplotlib or
scikit-learn installed when the defaults are retrained).
"""
from __future__ import annotations

from pathlib import Path

from ldmtool.train.sources import source_images

OUT = Path(__file__).resolve().parent / "corpus_sha256.txt"


def main() -> None:
    rows = [f"{image.sha256} {image.split} {image.key} {image.package} {image.version}"
            for image in source_images("corpus")]
    OUT.write_text("# sha256 split key package version (made by make_corpus_sha256.py)\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
