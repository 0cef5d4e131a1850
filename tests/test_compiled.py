"""`--compile` (issue 17): the denoising network and the first stage's decode through torch.compile give an
eager run's pixels, up to rounding.

The compiled run pays inductor's compilation (about 30 s for the shipped superres UNet on a 2-core machine),
so the file holds one compiled run and one compiled decode; the rest are checks that compile nothing, or
compile with dynamo's eager backend (seconds).
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from clirun import run_cli
from ldmtool.nets._layers import _GRAIN, pointwise, silu
from ldmtool.nets.compiled import compile_network, compiled_decode, decoder, is_compiled
from ldmtool.options import ModelChoice, SamplingChoice
from ldmtool.pipelines.engine import Engine

PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "photos"


def _superres(folder, out, *extra):
    result = run_cli("superres", folder, "--scale", "4", "-o", out, "--quiet", *extra)
    assert result.exit_code == 0, result.output
    (png,) = out.glob("*.png")
    with Image.open(png) as image:
        return np.asarray(image.convert("RGB")).astype(int), json.loads(image.info["ldmtool"])


def test_a_compiled_run_gives_the_eager_run_pixels_and_records_it(tmp_path, monkeypatch):
    """The main job's command and shipped model (their UNet compiles in about 30 s here) on one small crop."""
    monkeypatch.setenv("LDMTOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    (tmp_path / "in").mkdir()
    with Image.open(PHOTOS / "leaf.png") as photo:
        photo.convert("RGB").crop((0, 0, 48, 40)).save(tmp_path / "in" / "leaf.png")
    eager, eager_recipe = _superres(tmp_path / "in", tmp_path / "eager")
    compiled, recipe = _superres(tmp_path / "in", tmp_path / "compiled", "--compile")
    # fp32 here (the suite's CPU flags). Other kernels round differently, so a value that lies at a rounding
    # boundary can move by one level: 1 of 92160 values here, 35 of 1.4 M on the main job's photos (README).
    diff = np.abs(compiled - eager)
    assert diff.max() <= 1 and np.count_nonzero(diff) <= diff.size // 1000
    assert recipe["job"]["options"]["compile"] is True and eager_recipe["job"]["options"]["compile"] is None
    assert recipe["run_id"] != eager_recipe["run_id"]  # another job for resume: its pixels may differ
    assert (tmp_path / "cache" / "inductor").is_dir()  # compiled code kept for the next process


def test_a_compiled_model_is_its_own_cache_entry():
    engines = [Engine(ModelChoice(model="default-superres", compile=flag), SamplingChoice()).open()
               for flag in (True, None)]
    compiled, eager = (engine.bundle.denoiser for engine in engines)
    assert compiled is not eager and is_compiled(compiled) and not is_compiled(eager)
    assert compile_network(compiled, torch.float32) is compiled  # once per module


def test_the_first_stage_decodes_through_its_compiled_decode_except_seamless():
    """torch.compile compiles at the first call: nothing compiles here."""
    compiled, eager = (Engine(ModelChoice(model="default-txt2img", compile=flag), SamplingChoice()).open()
                       for flag in (True, None))
    first = compiled.bundle.first_stage
    assert compiled_decode(first) is not None and compiled_decode(eager.bundle.first_stage) is None
    assert decoder(first, seamless=False) is compiled_decode(first)
    assert decoder(first, seamless=True) == first.decode
    assert decoder(eager.bundle.first_stage, seamless=False) == eager.bundle.first_stage.decode
    superres = Engine(ModelChoice(model="default-superres", compile=True), SamplingChoice()).open()
    assert compiled_decode(superres.bundle.first_stage) is None  # a reshape: nothing to compile


def test_a_compiled_decode_gives_the_eager_decode():
    """The shipped KL first stage (its decoder compiles in about 20 s here) on one latent."""
    engine = Engine(ModelChoice(model="default-txt2img", compile=True), SamplingChoice()).open()
    first = engine.bundle.first_stage
    latent = torch.randn(1, engine.info.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    latent = latent.to(next(first.parameters()).dtype)
    with torch.inference_mode():
        eager = first.decode(latent).float()
        compiled = compiled_decode(first)(latent).float()
    assert compiled.shape == eager.shape
    assert (compiled - eager).abs().max() < 1e-3 * eager.abs().max()  # another kernel's rounding, not another result


def _graph_ops(fn, x):
    """The ATen-level call targets of the graph Dynamo captures for `fn(x)` (no inductor: nothing compiles)."""
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, dynamic=False)(x)
    return [node.target for g in graphs for node in g.graph.nodes if node.op == "call_function"]


def test_activations_run_whole_inside_a_compiled_graph_and_in_pieces_outside():
    x = torch.randn(4 * _GRAIN + 5)
    assert _graph_ops(lambda t: pointwise(F.gelu, t), x).count(F.gelu) == 1
    assert [op for op in _graph_ops(lambda t: silu(t.clone()), x) if op is F.silu] == [F.silu]
    calls = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Count(), torch.no_grad():
        pointwise(F.gelu, x)
        silu(x.clone())
    assert calls.count("gelu") == 5 and calls.count("silu_") == 5  # eager: pieces of at most _GRAIN values


def test_a_model_that_casts_its_weights_per_layer_is_refused_before_anything_compiles():
    from ldmtool.errors import UsageError
    from ldmtool.nets._layers import Linear

    network = torch.nn.Sequential(Linear(8, 8), Linear(8, 8))
    network[1].weight.data = network[1].weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(UsageError, match="--compile: this model keeps 1 weights in float8_e4m3fn"):
        compile_network(network, torch.float32)
    assert not is_compiled(network)
    half = torch.nn.Sequential(Linear(8, 8)).to(torch.bfloat16)
    with pytest.raises(UsageError):
        compile_network(half, torch.float32)  # bf16 weights kept under fp32 compute
    assert is_compiled(compile_network(half, torch.bfloat16))  # computing in their own dtype: nothing cast


def test_inductor_code_goes_to_ldmtools_cache_unless_the_user_chose_a_folder(tmp_path, monkeypatch):
    from torch._inductor.runtime.runtime_utils import default_cache_dir

    from ldmtool.nets.compiled import _keep_compiled_code

    monkeypatch.setenv("LDMTOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what inductor writes there itself
    _keep_compiled_code()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    _keep_compiled_code()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_a_compiled_denoiser_follows_seamless_mode():
    """`--seamless` switches the convolutions' padding on the modules (`tiling.seamless`); the compiled graph
    must not keep the padding it was traced with. Dynamo guards the switch and traces again: checked here with
    its eager backend, which shares those guards (seconds, where inductor takes a minute or more on two cores;
    with inductor the same check gave the eager outputs within 4e-6)."""
    from ldmtool.nets.unet import UNetModel
    from ldmtool.tiling.seamless import Seamless, seamless

    torch.manual_seed(0)
    net = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
                    num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                    transformer_depth=1, context_dim=16, legacy=False).eval()
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 5, 16)
    wrap = Seamless(x=True, y=True)
    with torch.inference_mode():
        plain = net(x, t, c)
        with seamless(net, axes=wrap):
            wrapped = net(x, t, c)
        assert (wrapped - plain).abs().max() > 0.1  # the mode changes the output
        net.compile(backend="eager", dynamic=False)
        torch.testing.assert_close(net(x, t, c), plain)
        with seamless(net, axes=wrap):
            torch.testing.assert_close(net(x, t, c), wrapped)
        torch.testing.assert_close(net(x, t, c), plain)  # and back
