"""What a model was trained on: a sources manifest (JSON) and a licence notice (Markdown) for `--data SPEC`.

`ldmtool train sources --data SPEC -o FILE.json --notice FILE.md` lists, for the train and the eval split, every
image the spec names with its package, the package's version, licence, copyright holders and the sha256 of the
file, so shipped weights can name what they are derived from, and tests can check that no example photo was
trained on without having the images themselves. The notice covers the TRAIN images only: those are what the
weights are derived from (CC-BY asks for author, licence, source and a note of the change; CC0 asks for nothing,
but naming it costs nothing either).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional, Sequence

from ldmtool.train import debian
from ldmtool.train.data import CORPUS, corpus_images, data_sources, folder_images

SPLITS = ("train", "eval")
UNKNOWN = "unknown"
LICENCE_URLS = {
    "CC-BY-4.0": "https://creativecommons.org/licenses/by/4.0/",
    "CC-BY-SA-4.0": "https://creativecommons.org/licenses/by-sa/4.0/",
    "CC-BY-SA-3.0": "https://creativecommons.org/licenses/by-sa/3.0/",
    "CC0-1.0": "https://creativecommons.org/publicdomain/zero/1.0/",
    "GPL-2+": "https://www.gnu.org/licenses/old-licenses/gpl-2.0.html",
    "GPL-3+": "https://www.gnu.org/licenses/gpl-3.0.html",
}
SHARE_ALIKE = ("CC-BY-SA", "GPL", "LGPL")  # licences whose derived works must carry the same licence
# Corpus prefix -> the PyPI distribution that ships those files (for its version).
CORPUS_DISTRIBUTIONS = {"skimage": "scikit-image", "matplotlib": "matplotlib", "sklearn": "scikit-learn"}


@dataclass(frozen=True)
class SourceImage:
    key: str  # "package/path", as the data source names the image
    split: str  # "train" or "eval"
    package: str  # Debian or PyPI package that installed the file; "" for a folder
    version: str
    licence: str
    copyright: str  # the holders, as the copyright file states them
    source: str  # where the package's images come from (upstream), if stated
    path: str
    sha256: str


def file_sha256(path: Path) -> str:
    from ldmtool.runtime.cache import hash_file

    return hash_file(path)


def source_images(data: str, licences: Optional[Sequence[str]] = None, recursive: bool = True) -> list[SourceImage]:
    """Every image of `data` in the train split (in training order), then the eval split."""
    return [image for split in SPLITS for source in data_sources(data)
            for image in _split_images(source, split, licences, recursive)]


def _split_images(source: str, split: str, licences: Optional[Sequence[str]], recursive: bool) -> list[SourceImage]:
    if source == CORPUS:
        return [_corpus_entry(image.key, image.path, split) for image in corpus_images(split)]
    if source.startswith(debian.PREFIX):
        return [_debian_entry(image, split) for image in debian.debian_images(source, split, licences)]
    if split != "train":  # a folder has no held-out split: all of it trains
        return []
    root = Path(source)
    return [_entry(path.relative_to(root).as_posix(), split, path) for path in folder_images(root, recursive)]


def _entry(key: str, split: str, path: Path, package: str = "", version: str = "", licence: str = UNKNOWN,
           holders: str = "", upstream: str = "") -> SourceImage:
    return SourceImage(key, split, package, version, licence, holders, upstream, str(path), file_sha256(path))


def _debian_entry(image: debian.DebianImage, split: str) -> SourceImage:
    return _entry(image.key, split, image.path, image.package, debian.package_version(image.package), image.licence,
                  image.copyright, debian.upstream_source(image.package))


def _corpus_entry(key: str, path: Path, split: str) -> SourceImage:
    prefix = key.split("/", 1)[0]
    distribution = CORPUS_DISTRIBUTIONS.get(prefix, prefix)
    try:
        version = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        version = ""
    return _entry(key, split, path, distribution, version)


def write_manifest(path: Path, data: str, licences: Optional[Sequence[str]], images: Sequence[SourceImage]) -> None:
    manifest = {"data": data, "licences": list(licences) if licences else None,
                "images": [asdict(image) for image in images]}
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def render_notice(images: Sequence[SourceImage], name: str = "") -> str:
    """Markdown naming the licence, holders and source of every TRAIN image, grouped by licence."""
    train = [image for image in images if image.split == "train"]
    subject = f"The weights of `{name}`" if name else "These model weights"
    lines = [f"# Training data notice{f' for {name}' if name else ''}", "",
             f"{subject} are derived from (trained on random crops of) the images below; the images themselves "
             "are not included. Each keeps its own licence.", ""]
    for licence in sorted({image.licence for image in train}):
        url = LICENCE_URLS.get(licence)
        lines += [f"## {licence}" + (f" ({url})" if url else ""), ""]
        if licence.startswith(SHARE_ALIKE):
            lines += [f"{licence} is share-alike: weights derived from these images are distributed under "
                      f"{licence} too, apart from the MIT-licensed code.", ""]
        for image in (image for image in train if image.licence == licence):
            lines.append(f"- {_attribution(image)}")
        lines.append("")
    if not train:
        lines += ["(no training images)", ""]
    return "\n".join(lines)


def _attribution(image: SourceImage) -> str:
    holder = f" by {image.copyright}" if image.copyright else ""
    package = f"{image.package} {image.version}".strip()
    origin = f"from {package}" if package else "from a local folder"
    upstream = f" ({image.source})" if image.source else ""
    return f"`{image.key}`{holder}, {origin}{upstream}, sha256 {image.sha256[:16]}"
