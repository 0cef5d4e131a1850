"""The wheel must carry every package and the presets (they live outside ldmtool/ in the repo)."""
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "ldmtool").rglob("__init__.py")
        if "assets" not in p.parent.relative_to(ROOT / "ldmtool").parts[1:]
    }
    missing = found - listed
    assert not missing, f"add these packages to pyproject.toml [tool.setuptools] packages: {sorted(missing)}"


def test_presets_package_maps_to_top_level_folder():
    assert _pyproject()["tool"]["setuptools"]["package-dir"]["ldmtool.presets"] == "presets"
