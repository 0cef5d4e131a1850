"""Add-ons and workflows on the flow-matching families (issue 24) through the command line, on the tiny random
files of test_flow_txt2img.py: `--lora FILE:WEIGHT` is the run of a file whose weights had the LoRA merged by
hand on the released fused layers."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from clirun import run_cli
from ldmtool.addons.networks import network_hash
from ldmtool.checkpoints.files import save_safetensors
from test_flow_txt2img import PROMPT, SEED, STEPS, _flux_args, _sd3_args, flux_files, run_ours, sd3_file  # noqa: F401
from test_t5 import tokenizer_dir  # noqa: F401
from test_text3 import clip_tokenizer_dir, towers  # noqa: F401

torch.set_num_threads(1)

RANK, ALPHA, WEIGHT = 2, 1.0, 0.5  # alpha / rank and the weight are powers of two: the merge by hand is exact
# The released fused layers each family's LoRA touches (BFL's / SD3's names, under the file's prefix).
LAYERS = {"flux": ("", ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "double_blocks.0.txt_mlp.0"]),
          "sd3": ("model.diffusion_model.", ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.mlp.fc1"])}


def _lora_and_merged(family: str, model: Path, folder: Path) -> tuple[Path, Path]:
    """A kohya LoRA (`lora_unet_<layer>`, with alphas) on the family's fused layers, and the model file with
    W + weight * alpha / rank * up @ down merged into those layers by hand."""
    prefix, layers = LAYERS[family]
    state = load_file(str(model))
    g = torch.Generator().manual_seed(31)
    lora = {}
    for name in layers:
        key = f"{prefix}{name}.weight"
        out, inner = state[key].shape
        down, up = torch.randn(RANK, inner, generator=g), torch.randn(out, RANK, generator=g)
        address = "lora_unet_" + name.replace(".", "_")
        lora.update({f"{address}.lora_down.weight": down, f"{address}.lora_up.weight": up,
                     f"{address}.alpha": torch.tensor(ALPHA)})
        state[key] = state[key] + WEIGHT * ALPHA / RANK * (up @ down)
    save_file(lora, str(folder / f"{family}-style.safetensors"))
    save_safetensors(state, folder / f"{family}-merged.safetensors")
    return folder / f"{family}-style.safetensors", folder / f"{family}-merged.safetensors"


def _args(family, sd3_file, flux_files, tokenizer_dir, model=None):  # noqa: F811
    args = _sd3_args(sd3_file, tokenizer_dir) if family == "sd3" else _flux_args(flux_files, tokenizer_dir)
    if model is None:
        return args
    at = args.index("--model") + 1
    return (*args[:at], model, *args[at + 1:])


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_lora_option_is_the_run_of_the_file_with_the_lora_merged_by_hand(tmp_path, sd3_file, flux_files,  # noqa: F811
                                                                           tokenizer_dir, family):  # noqa: F811
    model = sd3_file[0] if family == "sd3" else flux_files[0] / "flux1-dev.safetensors"
    lora, merged = _lora_and_merged(family, model, tmp_path)
    with_lora, recipe = run_ours(*_args(family, sd3_file, flux_files, tokenizer_dir), "--lora", f"{lora}:{WEIGHT}",
                                 "-o", tmp_path / "lora.png")
    by_hand, plain_recipe = run_ours(*_args(family, sd3_file, flux_files, tokenizer_dir, merged),
                                     "-o", tmp_path / "merged.png")
    base, _ = run_ours(*_args(family, sd3_file, flux_files, tokenizer_dir), "-o", tmp_path / "base.png")
    assert np.array_equal(with_lora, by_hand)
    assert np.abs(with_lora - base).max() > 3 / 255  # the LoRA changed the image
    assert recipe["parameters"]["lora_hashes"] == f"{family}-style: {network_hash(lora)}"
    assert "lora_hashes" not in plain_recipe["parameters"]


def test_flux_hires_equals_txt2img_then_img2img_scale_with_the_item_seed(tmp_path, flux_files, tokenizer_dir):  # noqa: F811
    args = (*_flux_args(flux_files, tokenizer_dir), "--guidance", 3.0, "-W", 32, "-H", 32)
    hires, _ = run_ours(*args, "--hires", 2, "--hires-strength", 0.6, "-o", tmp_path / "h.png")
    first, _ = run_ours(*args, "-o", tmp_path / "first.png")
    second = run_cli("img2img", tmp_path / "first.png", "--prompt", PROMPT, *args[:-4], "--steps", STEPS,
                     "--scale", 2, "--strength", 0.6, "--item-seed", SEED, "--quiet", "-o", tmp_path / "second.png")
    assert second.exit_code == 0, second.stderr
    with Image.open(tmp_path / "second.png") as image:
        chained = np.asarray(image).astype(np.float64) / 255
    assert hires.shape == chained.shape == (64, 64, 3)
    assert np.array_equal(hires, chained)
    upscaled = cv2.resize((first * 255).round().astype(np.uint8), (64, 64), interpolation=cv2.INTER_LANCZOS4)
    assert not np.array_equal((hires * 255).round().astype(np.uint8), upscaled)  # the model did change it
