"""A FLUX.1 transformer file stored in bf16 or fp16, computed in fp32 (issue 24; a CPU without native bf16):
its `Linear` weights stay in their stored dtype and are upcast one layer at a time, which gives exactly the
outputs of the file upcast whole to fp32 first."""
from __future__ import annotations

import pytest
import torch

from ldmtool import load_model
from ldmtool.checkpoints.files import save_safetensors
from ldmtool.nets._layers import Linear
from test_flux import _tiny_transformer, _tokens

torch.set_num_threads(1)


def _call(denoiser, params: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    batch, h, w, text = 2, 2, 3, 5
    img = torch.randn(batch, h * w, params["in_channels"], generator=g)
    txt = torch.randn(batch, text, params["context_in_dim"], generator=g)
    y = torch.randn(batch, params["vec_in_dim"], generator=g)
    img_ids, txt_ids = _tokens(batch, h, w, text)
    with torch.no_grad():
        return denoiser(img, img_ids.expand(batch, -1, -1), txt, txt_ids.expand(batch, -1, -1),
                        torch.tensor([0.8, 0.3]), y, guidance=torch.tensor([3.5, 2.0]))


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_half_stored_flux_file_keeps_its_linear_weights_and_computes_as_the_upcast_file(tmp_path, stored):
    net, params = _tiny_transformer(seed=7)
    state = {k: v.to(stored) for k, v in net.state_dict().items()}
    save_safetensors(state, tmp_path / "half.safetensors")
    save_safetensors({k: v.float() for k, v in state.items()}, tmp_path / "upcast.safetensors")
    half, upcast = load_model(tmp_path / "half.safetensors"), load_model(tmp_path / "upcast.safetensors")
    linears = {m.weight for m in half.denoiser.modules() if isinstance(m, Linear)}
    assert len(linears) > 10 and all(weight.dtype == stored for weight in linears)
    others = [p for p in half.denoiser.parameters() if all(p is not weight for weight in linears)]
    assert others and all(p.dtype == torch.float32 for p in others)  # small ones (norm scales, biases) are cast
    got, want = _call(half.denoiser, params), _call(upcast.denoiser, params)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    assert not torch.equal(got, _call(net, params))  # control: the rounded stored values are what ran
