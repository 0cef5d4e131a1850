"""`--data debian:PKG` and `train sources` on a fake Debian system: dpkg file lists, a status file and DEP-5
copyright files in a temporary folder, with synthetic JPEGs (a noisy "photo", a flat render, a small
screenshot, a PNG, a KDE preview) standing in for wallpapers."""
from __future__ import annotations

import hashlib
import io
import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmtool.errors import UsageError
from ldmtool.train import data, debian, sources
from tests.clirun import run_cli

COPYRIGHT = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: walls
Source: https://example.org/walls

Files: *
Copyright: 2014 Wall Group
License: GPL-2+

Files: 16.04/sea_by_Ann.jpg
 16.04/hill_by_Bob.jpg
Copyright: Ann Example,
 2018
License: CC-BY-4.0
 Long licence text that is not the licence's name.

Files: debian/*
Copyright: 2020 The Packager
License: CC0-1.0

Files: walls/hill_by_Bob.jpg
Copyright: Bob Example, 2019
License: CC0-1.0

License: GPL-2+
 The full text, a standalone paragraph without Files.
"""
KDE_NAMES = ("Amber", "Birch", "Cedar", "Dune", "Ember", "Fjord")


def _photo(path: Path, seed: int, size=(1000, 1000)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_photo_bytes(seed, size))
    return path


@cache
def _photo_bytes(seed: int, size: tuple[int, int]) -> bytes:
    """A JPEG of noise over a gradient: detail at pixel level, as a photo has (and unlike a render)."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 120, width, dtype=np.float32)[None, :, None]
    noise = rng.integers(40, 160, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _flat(path: Path, size=(1000, 1000)) -> Path:
    ramp = np.linspace(30, 200, size[0], dtype=np.float32)
    pixels = np.repeat(np.broadcast_to(ramp, (size[1], size[0]))[:, :, None], 3, axis=2).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)
    return path


class FakeDebian:
    """A dpkg info folder, status file and /usr/share/doc under one temporary root."""

    def __init__(self, root: Path) -> None:
        self.root, self.info, self.doc = root, root / "var/lib/dpkg/info", root / "usr/share/doc"
        self.info.mkdir(parents=True)
        self.status: list[str] = []

    def install(self, package: str, files: list[Path], copyright: str = "", version: str = "1.0-1") -> None:
        listed = [str(self.root / "usr"), *map(str, files)]  # dpkg lists folders too
        (self.info / f"{package}.list").write_text("\n".join(listed) + "\n")
        self.status.append(f"Package: {package}\nStatus: install ok installed\nVersion: {version}\n")
        (self.info.parent / "status").write_text("\n".join(self.status))
        if copyright:
            (self.doc / package).mkdir(parents=True)
            (self.doc / package / "copyright").write_text(copyright)


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeDebian:
    system = FakeDebian(tmp_path / "root")
    monkeypatch.setattr(debian, "DPKG_INFO", system.info)
    monkeypatch.setattr(debian, "DOC_ROOT", system.doc)
    return system


@pytest.fixture
def walls(fake) -> FakeDebian:
    """Package `walls`: two licensed photos, one under `*`, a render, a small screenshot, a PNG, a symlink."""
    folder = fake.root / "usr/share/backgrounds"
    files = [_photo(folder / "sea_by_Ann.jpg", 1), _photo(folder / "hill_by_Bob.jpg", 2),
             _photo(folder / "other.jpg", 3), _flat(folder / "render.jpg"),
             _photo(folder / "tiny.jpg", 4, size=(640, 400)), _photo(folder / "shot_screenshot.jpg", 5)]
    png = folder / "noise.png"
    Image.open(files[0]).save(png)
    link = folder / "link.jpg"
    link.symlink_to(files[0])
    fake.install("walls", [*files, png, link], COPYRIGHT, version="2:3.4-1")
    return fake


@pytest.fixture
def kde(fake) -> FakeDebian:
    """Package `kde-walls`: KDE layout `Name/contents/images/WxH.jpg` in two sizes, plus a preview."""
    files = []
    for index, name in enumerate(KDE_NAMES):
        base = fake.root / "usr/share/wallpapers" / name / "contents"
        files += [_photo(base / "images/1920x1080.jpg", 10 + index), _photo(base / "images/1000x1000.jpg", 30 + index),
                  _photo(base / "screenshot.jpg", 50 + index)]
    fake.install("kde-walls", files, "Files: *\nCopyright: KDE Group\nLicense: GPL-2+\n")
    return fake


def test_dep5_parsing_continuations_last_match_star_and_packaging_files():
    entries = debian.parse_copyright(COPYRIGHT)
    assert len(entries) == 4  # the standalone License paragraph is no Files entry
    assert entries[1].patterns == ("16.04/sea_by_Ann.jpg", "16.04/hill_by_Bob.jpg")
    assert entries[1].licence == "CC-BY-4.0" and entries[1].holders == "Ann Example, 2018"

    def licence(path: str) -> tuple[str, str]:
        found = debian.licence_of(Path(path), entries)
        assert found is not None
        return found.licence, found.holders

    # a source-tree path (16.04/...) matches the installed path by file name
    assert licence("/usr/share/backgrounds/sea_by_Ann.jpg") == ("CC-BY-4.0", "Ann Example, 2018")
    # the later paragraph wins where two match (the second by its tail, then by file name)
    assert licence("/usr/share/walls/hill_by_Bob.jpg") == ("CC0-1.0", "Bob Example, 2019")
    assert licence("/usr/share/backgrounds/hill_by_Bob.jpg") == ("CC0-1.0", "Bob Example, 2019")
    assert debian.licence_of(Path("/usr/share/backgrounds/hill_by_Bob.jpg"), entries[:2]).holders == "Ann Example, 2018"
    # `*` covers the rest; `debian/*` is the packaging's own files, never the installed images
    assert licence("/usr/share/debian/other.jpg") == ("GPL-2+", "2014 Wall Group")
    assert debian.licence_of(Path("/x/sea.jpg"), entries[1:3]) is None


def test_group_keys_join_the_sizes_of_one_wallpaper():
    assert debian.group_key("p/Elephants_3840x2160.jpg") == debian.group_key("p/Elephants.jpg") == "p/Elephants"
    assert debian.group_key("p/nature/Aqua-1920x1080.jpeg") == "p/nature/Aqua"
    assert debian.group_key("p/Kite/contents/images/2560x1600.jpg") == "p/Kite"
    assert debian.group_key("p/Kite/contents/images_dark/720x1440.jpg") == "p/Kite"
    assert debian.group_key("p/2001x_odyssey.jpg") == "p/2001x_odyssey"


def test_photo_filter_keeps_large_detailed_jpegs_only(walls):
    images = debian.package_images("walls")
    assert [image.key for image in images] == ["walls/hill_by_Bob.jpg", "walls/other.jpg", "walls/sea_by_Ann.jpg"]
    by_key = {image.key: image for image in images}
    assert (by_key["walls/sea_by_Ann.jpg"].licence, by_key["walls/sea_by_Ann.jpg"].copyright) == (
        "CC-BY-4.0", "Ann Example, 2018")
    assert by_key["walls/other.jpg"].licence == "GPL-2+"
    flat = walls.root / "usr/share/backgrounds/render.jpg"
    assert debian.detail_share(flat) < debian.MIN_DETAIL < debian.detail_share(images[0].path)


def test_licences_filter_keeps_only_the_named_licences(walls):
    everything = {image.key for image in debian.debian_images("debian:walls", "all")}
    free = debian.debian_images("debian:walls", "all", ["CC-BY-4.0", "CC0-1.0"])
    assert {image.key for image in free} == everything - {"walls/other.jpg"}
    assert debian.debian_images("debian:walls", "all", ["MIT"]) == []


def test_held_out_split_is_by_whole_wallpaper_and_stable_when_packages_are_added(kde, walls):
    train = debian.debian_images("debian:kde-walls", "train")
    held = debian.debian_images("debian:kde-walls", "eval")
    assert train and held and not {i.path for i in train} & {i.path for i in held}
    assert len(train) + len(held) == 2 * len(KDE_NAMES)  # both sizes of every wallpaper, no preview
    assert not {i.group for i in train} & {i.group for i in held}, "one wallpaper's sizes on both sides"
    assert all(list(map(debian.is_held_out, {i.group for i in held})))
    for split, alone in (("train", train), ("eval", held)):
        joined = debian.debian_images("debian:walls,kde-walls", split)
        assert [i for i in joined if i.package == "kde-walls"] == alone
        assert [i.package for i in joined] == sorted([i.package for i in joined], key=["walls", "kde-walls"].index)


def test_one_kde_wallpaper_in_several_sizes_is_one_group(fake):
    base = fake.root / "usr/share/wallpapers/Solo/contents/images"
    fake.install("solo-walls", [_photo(base / "1920x1080.jpg", 70), _photo(base / "1000x1000.jpg", 71)])
    images = debian.debian_images("debian:solo-walls", "all")
    assert [image.key for image in images] == ["solo-walls/Solo/contents/images/1000x1000.jpg",
                                               "solo-walls/Solo/contents/images/1920x1080.jpg"]
    assert {image.group for image in images} == {"solo-walls/Solo"}


def test_named_held_out_groups_replace_the_hash_fifth(kde, monkeypatch):
    monkeypatch.setattr(debian, "HELD_OUT", frozenset({"kde-walls/Birch"}))
    monkeypatch.setattr(debian, "NAMED_PACKAGES", frozenset({"kde-walls"}))
    held = debian.debian_images("debian:kde-walls", "eval")
    assert {i.group for i in held} == {"kde-walls/Birch"} and len(held) == 2


def test_the_shipped_models_held_out_wallpapers_stay_named():
    assert debian.HELD_OUT == {"lomiri-wallpapers-16.04/life_by_Aitzol_Berasategi",
                               "lomiri-wallpapers-16.04/Picture_1A_by_freespace"}


def test_resolve_data_joins_sources_in_order(walls, tmp_path, monkeypatch):
    monkeypatch.setattr(debian, "HELD_OUT", frozenset({"walls/hill_by_Bob"}))
    monkeypatch.setattr(debian, "NAMED_PACKAGES", frozenset({"walls"}))
    folder = tmp_path / "mine"
    _photo(folder / "a.jpg", 9, size=(40, 30))
    paths = data.resolve_data(f"corpus+debian:walls+{folder}", licences=["CC-BY-4.0"])
    corpus = [image.path for image in data.corpus_images("train")]
    assert paths == corpus + [walls.root / "usr/share/backgrounds/sea_by_Ann.jpg", folder / "a.jpg"]


def test_package_not_installed_is_a_one_line_usage_error(fake, tmp_path):
    with pytest.raises(UsageError, match="debian:absent-walls: package not installed"):
        data.resolve_data("debian:absent-walls")
    result = run_cli("train", "autoencoder", "--data", "debian:absent-walls", "-o", tmp_path / "run", "--steps", 1)
    assert result.exit_code == 2
    assert "debian:absent-walls" in result.stderr and "apt-get install absent-walls" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("command", [["autoencoder"], ["diffusion", "--first-stage", "nowhere"]])
def test_licences_reach_resolve_data(monkeypatch, tmp_path, command):
    seen = []

    def recording(spec, recursive=True, licences=None):
        seen.append((spec, licences))
        raise UsageError("stop here")

    monkeypatch.setattr(data, "resolve_data", recording)
    result = run_cli("train", *command, "--data", "debian:walls", "--licences", "CC-BY-4.0, CC0-1.0",
                     "-o", tmp_path / "run", "--steps", 1)
    assert result.exit_code == 2 and "stop here" in result.stderr
    assert seen == [("debian:walls", ["CC-BY-4.0", "CC0-1.0"])]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sources_manifest_lists_both_splits_with_versions_licences_and_hashes(walls, kde, tmp_path, monkeypatch):
    monkeypatch.setattr(debian, "HELD_OUT", frozenset({"walls/hill_by_Bob"}))
    monkeypatch.setattr(debian, "NAMED_PACKAGES", frozenset({"walls"}))
    folder = tmp_path / "mine"
    _photo(folder / "sub" / "a.jpg", 9, size=(40, 30))
    out, notice = tmp_path / "sources.json", tmp_path / "NOTICE.md"
    result = run_cli("train", "sources", "--data", f"debian:walls+{folder}", "--licences", "CC-BY-4.0,CC0-1.0",
                     "-o", out, "--notice", notice, "--name", "default-x")
    assert result.exit_code == 0, result.output
    manifest = json.loads(out.read_text())
    assert manifest["data"] == f"debian:walls+{folder}" and manifest["licences"] == ["CC-BY-4.0", "CC0-1.0"]
    rows = {(row["key"], row["split"]): row for row in manifest["images"]}
    assert list(rows) == [("walls/sea_by_Ann.jpg", "train"), ("sub/a.jpg", "train"), ("walls/hill_by_Bob.jpg", "eval")]
    sea = rows["walls/sea_by_Ann.jpg", "train"]
    assert (sea["package"], sea["version"], sea["licence"], sea["copyright"], sea["source"]) == (
        "walls", "2:3.4-1", "CC-BY-4.0", "Ann Example, 2018", "https://example.org/walls")
    assert sea["sha256"] == _sha256(Path(sea["path"]))
    mine = rows["sub/a.jpg", "train"]
    assert (mine["licence"], mine["package"], mine["sha256"]) == ("unknown", "", _sha256(folder / "sub" / "a.jpg"))
    text = notice.read_text()
    assert "default-x" in text and "derived" in text and "## CC-BY-4.0 (https://creativecommons.org/licenses/by/4.0/)" in text
    assert "`walls/sea_by_Ann.jpg` by Ann Example, 2018, from walls 2:3.4-1" in text
    assert "hill_by_Bob" not in text, "the notice names the training images only"
    gpl = sources.render_notice(sources.source_images("debian:walls"))
    assert "## GPL-2+" in gpl and "GPL-2+ is share-alike" in gpl and "CC-BY-4.0 is share-alike" not in gpl


def test_sources_of_the_corpus_name_the_python_package(tmp_path):
    images = sources.source_images("corpus")
    train = [image for image in images if image.split == "train"]
    assert [image.key for image in train] == [image.key for image in data.corpus_images("train")]
    assert {image.key for image in images if image.split == "eval"} == {i.key for i in data.corpus_images("eval")}
    assert {(image.package, image.licence) for image in images} >= {("scikit-image", "unknown")}
    assert all(image.sha256 == _sha256(Path(image.path)) for image in images[:3])


def test_sources_without_training_images_is_a_usage_error(walls, tmp_path):
    result = run_cli("train", "sources", "--data", "debian:walls", "--licences", "MIT", "-o", tmp_path / "s.json")
    assert result.exit_code == 2 and "no training images under MIT" in result.stderr
    assert not (tmp_path / "s.json").exists()
    unwritable = run_cli("train", "sources", "--data", "debian:walls", "-o", tmp_path / "no" / "s.json")
    assert unwritable.exit_code == 3 and f"{tmp_path / 'no' / 's.json'}: cannot write" in unwritable.stderr
    assert len(unwritable.stderr.strip().splitlines()) == 1


def test_shipped_notices_are_rendered_from_their_manifests():
    models = Path(sources.__file__).resolve().parents[1] / "assets" / "models"
    manifests = sorted(models.glob("*.sources.json"))
    assert manifests
    for path in manifests:
        name = path.name[: -len(".sources.json")]
        images = [sources.SourceImage(**row) for row in json.loads(path.read_text())["images"]]
        assert (models / f"{name}.NOTICE.md").read_text() == sources.render_notice(images, name), (
            f"regenerate {name}.NOTICE.md with ldmtool train sources")
        assert (models / f"{name}.safetensors").is_file()
