"""1-wide convolutions give the same numbers on any thread count (README, "Reproducibility").

oneDNN's pointwise convolutions split their sums by the thread count for some shapes (on a 2-core AMD EPYC
a 128-channel Conv1d over 192 positions rounded differently on 1 and 2 threads, which moved the shipped
superres default's pixels by 1/255), so ldmtool's `Conv1d`/`Conv2d` run them as one matrix product. Every
1-wide convolution of every kind of network must be one of those, and must compute the same on 1, 2 and 3
threads (on shapes where oneDNN's own split showed)."""
import pytest
import torch

from ldmtool.checkpoints.tiny import tiny_model
from ldmtool.nets import _layers
from ldmtool.nets.t2i_adapter import FullAdapter, LightAdapter

# Together these hold every network kind with 1-wide convolutions: the LDM UNet's legacy attention (Conv1d
# qkv, proj_out) and skip connections, the SpatialRescaler cond stage, the KL and VQ autoencoders.
PRESETS = ["ldm-bsr-sr", "ldm-celebahq256", "ldm-semantic-synthesis256", "kl-f8", "vq-f4"]


def _one_wide(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) and all(k == 1 for k in m.kernel_size)]


def _on_threads(layer: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                outputs.append(layer(x))
        return outputs
    finally:
        torch.set_num_threads(before)


def _check(module: torch.nn.Module) -> int:
    convs = _one_wide(module)
    generator = torch.Generator().manual_seed(0)
    for name, conv in convs:
        assert isinstance(conv, (_layers.Conv1d, _layers.Conv2d)), f"{name} is a {type(conv).__module__} conv"
        shape = (1, conv.in_channels, 1024) if isinstance(conv, torch.nn.Conv1d) else (1, conv.in_channels, 32, 32)
        with torch.no_grad():
            conv.weight.normal_(generator=generator)  # output layers start at zero
        first, *others = _on_threads(conv, torch.randn(shape, generator=generator))
        assert all(torch.equal(first, other) for other in others), name
    return len(convs)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_one_wide_convolution_computes_the_same_on_any_thread_count(preset):
    assert _check(tiny_model(preset)) > 0


@pytest.mark.parametrize("adapter", [FullAdapter, LightAdapter])
def test_the_t2i_adapters_one_wide_convolutions_too(adapter):
    assert _check(adapter(channels=(32, 64), num_res_blocks=1)) > 0


def test_the_main_job_at_its_default_tiling_gives_the_same_pixels_on_1_and_2_threads(tmp_path):
    """End to end, at the default tile plan (the reproducibility suite fixes --tile 24, whose small shapes
    stay below where oneDNN splits its sums): one example photo through the shipped superres default."""
    import shutil
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from clirun import run_cli

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(Path(__file__).parents[1] / "examples" / "photos" / "leaf.png", photos)
    pixels = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            result = run_cli("superres", photos, "--scale", 4, "--steps", 1, "--seed", 5, "-o", tmp_path / str(threads))
        finally:
            torch.set_num_threads(before)
        assert result.exit_code == 0, result.err
        pixels.append(np.asarray(Image.open(tmp_path / str(threads) / "leaf.png")))
    assert np.array_equal(*pixels)
