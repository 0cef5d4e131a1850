"""A tiny residual superres model on the patch first stage, trained for one step by the real CLI and exported to
run as default-superres does (one trailing DDIM step at temperature 0), its UNet weights then changed by the
test (zeroed, or made random), for the tests of the residual and streamed superres paths."""
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."


def residual_model(folder: Path, name: str, unet: Callable[[torch.Tensor], torch.Tensor], *, seed: int) -> Path:
    """`folder/name.safetensors`, each UNet tensor replaced by `unet(tensor)`."""
    from ldmtool.cli.app import main

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)).save(folder / "a.png")
    for args in (["train", "diffusion", "--task", "superres", "--first-stage", "patch:4", "--data", str(folder),
                  "--channels", "32", "--channel-mult", "1,2", "--attention-at", "2", "--crop", "32", "--batch-size", "1",
                  "--prediction", "v", "--x0-loss", "--residual", "--degradation", "clean", "--steps", "1",
                  "--device", "cpu", "--quiet", "-o", str(folder / "run")],
                 ["train", "export", str(folder / "run"), "--name", name, "--dest", str(folder),
                  "--default-spacing", "trailing", "--default-steps", "1", "--default-temperature", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code in (0, None)
    path = folder / f"{name}.safetensors"
    tensors = {k: (unet(v) if k.startswith(UNET_PREFIX) else v) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path))
    return path
