"""examples/: the inputs parse, and every script runs against the shipped default model it needs."""
import os
import subprocess
from pathlib import Path

import pytest

from ldmtool.checkpoints.presets import shipped_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = {  # script -> the shipped model it runs with
    "superres.sh": "default-superres",
    "inpaint.sh": "default-inpaint",
    "img2img.sh": "default-txt2img",
    "txt2img.sh": "default-txt2img",
    "sample.sh": "default-sample",
    "semantic2img.sh": "default-semantic2img",
    "layout2img.sh": "default-layout2img",
    "tile-synth.sh": "default-semantic2img",  # its label map picks the semantic default
}


def test_every_command_has_a_script():
    assert sorted(p.name for p in (EXAMPLES / "scripts").glob("*.sh")) == sorted(SCRIPTS)


def test_example_inputs_parse():
    from ldmtool.io.images import read_image, read_mask
    from ldmtool.pipelines.layout2img import read_layout
    from ldmtool.pipelines.semantic2img import load_palette, read_label_map
    from ldmtool.pipelines.text import read_prompts

    for photo in (EXAMPLES / "photos").glob("*.png"):
        assert read_image(photo).rgb.shape[2] == 3
    image = read_image(EXAMPLES / "inpaint" / "coffee.png")
    mask = read_mask(EXAMPLES / "inpaint" / "coffee_mask.png", size=image.size)
    assert 0 < mask.mean() < 0.5
    assert len(read_layout(EXAMPLES / "layouts" / "park.json", 256, 256)) == 3
    labels = read_label_map(EXAMPLES / "labelmaps" / "landscape.png", 6)
    palette = load_palette(EXAMPLES / "labelmaps" / "palette.yaml")
    from_rgb = read_label_map(EXAMPLES / "labelmaps" / "landscape_rgb.png", 6, palette=palette)
    assert (labels == from_rgb).all()
    assert len(read_prompts(None, EXAMPLES / "prompts" / "prompts.txt")) == 3
    assert len(read_prompts(None, EXAMPLES / "prompts" / "prompts.jsonl")) == 2


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_runs_with_its_shipped_model(script, tmp_path):
    model = SCRIPTS[script]
    if shipped_model(model) is None:
        pytest.skip(f"{model} is not shipped yet")
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(EXAMPLES / "scripts" / script), "--steps", "4", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.rglob("*.png")), "the script wrote no image"
