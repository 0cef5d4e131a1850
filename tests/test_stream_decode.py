"""One deterministic step decoded band by band (pipelines/stream_decode.py): the superres command gives the same
pixels as sampling the whole latent and decoding it, and streams only where that equality holds."""
from pathlib import Path

import pytest
import torch

from ldmtool.pipelines import superres
from ldmtool.pipelines.engine import Engine, ModelChoice, SamplingChoice
from ldmtool.pipelines.stream_decode import one_step_streamed
from ldmtool.tiling.fusion import TiledDenoiser
from residual_models import residual_model as make_residual_model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A residual patch-latent superres model with random UNet weights (no zero layers), shipped to run one
    trailing DDIM step at temperature 0, as default-superres does."""
    generator = torch.Generator().manual_seed(2)
    return make_residual_model(tmp_path_factory.mktemp("stream"), "streamed",
                          lambda v: v + 0.05 * torch.randn(v.shape, generator=generator).to(v.dtype), seed=1)


def _upscale(model: Path, monkeypatch, *, stream: bool, **sampling) -> torch.Tensor:
    engine = Engine(ModelChoice(model=str(model), device="cpu", precision="fp32"),
                    SamplingChoice(tile=8, tile_overlap=4, **sampling)).open()
    task = superres.SuperresTask(engine, scale=4)
    task.check_model(engine)
    if not stream:
        monkeypatch.setattr(superres, "one_step_streamed", lambda *args, **kwargs: None)
    low = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(3)) * 2 - 1
    pixels = task._sample_and_decode(engine, low=low, latent_hw=(24, 20), seed=7)
    monkeypatch.undo()
    return pixels


def test_streamed_one_step_gives_the_pixels_of_sampling_then_decoding_whole(model, monkeypatch):
    streams = []
    original = TiledDenoiser.stream
    monkeypatch.setattr(TiledDenoiser, "stream", lambda self, *a: streams.append(1) or original(self, *a))
    streamed = _upscale(model, monkeypatch, stream=True)
    assert streams  # the band-by-band path ran (monkeypatch.undo() in _upscale restored stream afterwards)
    whole = _upscale(model, monkeypatch, stream=False)
    assert streamed.shape == (1, 96, 80, 3)
    assert torch.equal(streamed, whole)
    assert streamed.float().std() > 5  # random weights: a real picture, not a constant


@pytest.mark.parametrize("sampling", [dict(steps=2), dict(temperature=1.0), dict(sampler="euler"), dict(tile=0)])
def test_runs_that_are_not_one_deterministic_tiled_step_from_zero_are_not_streamed(model, sampling):
    engine = Engine(ModelChoice(model=str(model), device="cpu", precision="fp32"),
                    SamplingChoice(**{"tile": 8, "tile_overlap": 4, **sampling})).open()
    task = superres.SuperresTask(engine, scale=4)
    task.check_model(engine)
    cond, uncond = task._conditioning(engine, torch.zeros(1, 3, 24, 20), (24, 20), 7)
    assert one_step_streamed(engine, (24, 20), cond, uncond) is None


@pytest.mark.parametrize("sampling, streamed", [(dict(), True), (dict(steps=2), False)])
def test_the_run_plan_counts_no_latent_copies_when_the_step_is_streamed(model, sampling, streamed):
    """The plan's peak memory follows the path the run takes: the general count of latent copies (10 of a
    48-channel latent: 2 GB at 16 MP) only where the latent is held whole."""
    from ldmtool.pipelines.planning import LATENT_COPIES, model_demand

    engine = Engine(ModelChoice(model=str(model), device="cpu", precision="fp32"),
                    SamplingChoice(tile=8, tile_overlap=4, **sampling)).open()
    task = superres.SuperresTask(engine, scale=4)
    task.check_model(engine)
    demand = model_demand(task, {(80, 96): 1}, 1)
    assert demand.parts["latents"] == (0 if streamed else 24 * 20 * 48 * 4 * LATENT_COPIES)
