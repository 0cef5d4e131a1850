"""The family registry (ldmtool/families/): detection of every preset's family from its keys, the typed
ModelInfo each bundle carries, and that only the families folder (with nets/ and checkpoints/) names a
family in code."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from ldmtool.checkpoints.api import build_model, load_model
from ldmtool.checkpoints.presets import RELEASED_FAMILIES, preset_names
from ldmtool.checkpoints.tiny import save_tiny_checkpoint, tiny_config
from ldmtool.families.info import Conditioning, InpaintKind, Parameterization
from ldmtool.families.registry import FAMILIES, detect_family, family_named, family_names

PACKAGE = Path(__file__).resolve().parents[1] / "ldmtool"
# Folders whose code must never name a family (help texts and docstrings may).
FAMILY_FREE = ("pipelines", "tiling", "diffusion", "runtime", "cli")
# Families the registry will list next: named nowhere else either, so that no pipeline anticipates them.
PLANNED = ("sdxl", "flux", "sd3")
# Presets detected as an alternative owned by another entry: the SD3 VAE has FLUX.1's autoencoder's keys.
OTHER_ENTRY_ALTERNATIVES = ("sd3-vae",)


def _meta_bundle(preset: str):
    return build_model(tiny_config(preset), device="meta")


@pytest.mark.parametrize("preset", RELEASED_FAMILIES)
def test_every_preset_is_detected_as_its_own_family(preset):
    bundle = _meta_bundle(preset)
    found = detect_family({k: tuple(v.shape) for k, v in bundle.state_dict().items()})
    assert found is not None and preset in (found.family, *found.alternatives)
    owner = family_named(preset)
    assert owner is not None and (family_named(found.family) is owner or preset in OTHER_ENTRY_ALTERNATIVES)
    assert bundle.info.entry == family_named(preset).name


def test_every_released_preset_has_one_owner_and_a_file():
    owners = {preset: [f.name for f in FAMILIES if preset in f.presets] for preset in RELEASED_FAMILIES}
    assert all(len(names) == 1 for names in owners.values()), owners
    assert set(RELEASED_FAMILIES) <= set(preset_names())


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("sd1", dict(latent_channels=4, downsampling=8, pixel_multiple=64, conditioning=Conditioning.CROSSATTN,
                     parameterization=Parameterization.EPS, inpaint_kind=InpaintKind.MASKED, takes_text=True)),
        ("sd1-inpainting", dict(conditioning=Conditioning.HYBRID, inpaint_kind=InpaintKind.SD_HYBRID,
                                concat_channels=5)),
        ("sd2-v", dict(latent_channels=4, downsampling=8, parameterization=Parameterization.V, takes_text=True)),
        ("sd2-x4-upscaler", dict(conditioning=Conditioning.HYBRID_ADM, parameterization=Parameterization.V,
                                 downsampling=4, inpaint_kind=None)),
        ("ldm-bsr-sr", dict(latent_channels=3, downsampling=4, pixel_multiple=32, conditioning=Conditioning.CONCAT,
                            parameterization=Parameterization.EPS, inpaint_kind=None, takes_text=False)),
        ("ldm-inpainting-big", dict(conditioning=Conditioning.CONCAT, inpaint_kind=InpaintKind.LDM_CONCAT)),
        ("ldm-semantic-synthesis256", dict(conditioning=Conditioning.CONCAT, label_classes=182)),
        ("ldm-cin256-v2", dict(conditioning=Conditioning.CROSSATTN, class_count=1001, takes_text=False)),
        ("ldm-celebahq256", dict(conditioning=Conditioning.NONE, inpaint_kind=InpaintKind.MASKED)),
        ("kl-f8", dict(latent_channels=4, downsampling=8, conditioning=Conditioning.NONE, parameterization=None)),
    ],
)
def test_model_info_of_known_families(preset, expected):
    info = _meta_bundle(preset).info
    assert {name: getattr(info, name) for name in expected} == expected
    assert info.family == preset


def test_layout_model_info_names_its_box_tokens():
    info = _meta_bundle("ldm-layout2img-openimages256").info
    assert (info.box_tokens.vocab_size, info.box_tokens.max_seq_len) == (8192, 92)
    assert not info.box_raster and info.raster_classes == ()
    assert _meta_bundle("ldm-txt2img-1p4b").info.box_tokens is None  # BERT with its text tokenizer


def test_run_defaults_come_from_the_ldmtool_block():
    doc = tiny_config("sd2-v")
    doc["ldmtool"].update(default_sampler="euler", default_steps=12, default_cfg=5, default_size=[96, 64],
                          default_tile=48, colour_fix=True)
    defaults = build_model(doc, device="meta").info.defaults
    assert (defaults.sampler, defaults.steps, defaults.cfg, defaults.size, defaults.tile, defaults.colour_fix) == (
        "euler", 12, 5.0, (96, 64), 48, True)
    plain = _meta_bundle("sd1").info.defaults
    assert (plain.size, plain.tile, plain.temperature, plain.noise_level) == ((512, 512), 64, 1.0, 20)


def test_model_info_is_frozen_and_follows_prediction_override(tmp_path):
    path = tmp_path / "sd2.safetensors"
    save_tiny_checkpoint(path, "sd2", with_config=True)
    bundle = load_model(path, prediction="v")
    assert bundle.info.parameterization is Parameterization.V and bundle.info.family == "sd2"
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle.info.latent_channels = 3


def test_shipped_and_custom_names_are_described_by_the_family_their_keys_show():
    doc = tiny_config("ldm-bsr-sr")
    doc["ldmtool"]["family"] = "my-upscaler"
    info = build_model(doc, device="meta").info
    assert (info.family, info.entry, info.conditioning) == ("my-upscaler", "ldm", Conditioning.CONCAT)


def test_the_denoiser_is_the_network_and_unet_its_alias():
    bundle = _meta_bundle("sd1")
    assert bundle.denoiser is bundle.unet is bundle.model.diffusion_model
    first_stage = _meta_bundle("kl-f4")
    assert first_stage.denoiser is None and first_stage.unet is None


def _names_a_family(value: str, names: set[str]) -> bool:
    return any(value == name or value.startswith((name + "-", name + "_")) for name in names)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (modules, classes, functions)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def family_literals(folders=FAMILY_FREE) -> list[str]:
    """`path:line 'value'` for every string constant in those folders that names a family."""
    names = set(family_names()) | set(PLANNED)
    hits = []
    for folder in folders:
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            docstrings = _docstrings(tree)
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                        and _names_a_family(node.value, names)):
                    hits.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    return hits


def test_the_scan_finds_family_names_and_only_them():
    names = set(family_names()) | set(PLANNED)
    assert {"sd1", "sd2", "ldm"} <= names
    assert all(_names_a_family(v, names) for v in ("sd1", "sd2-v", "ldm-bsr-sr", "ldm_concat", "flux", "sdxl-refiner"))
    assert not any(_names_a_family(v, names) for v in ("ldmtool", "sd-hybrid", "masked", "SD 1.x", "use sd1"))


def test_only_the_families_folder_names_a_family():
    hits = family_literals()
    assert not hits, "family names in code outside ldmtool/families/: " + "; ".join(hits)
