"""Architectures built on the meta device before their weights load (`ldmtool.nets.meta`, issue 17's start-up).

torch runs a meta `normal_` (an embedding's initialisation) or a meta `linspace` (a noise schedule) through
its Python reference code, whose first call imports its compiler stack: over a second of every eager command's
start-up before this change (the main job took 4.7-5.4 s, now 3.1-4.1 s on a 2-core Xeon).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from torch import nn

from ldmtool.checkpoints.schedule import DDPM_BUFFERS, schedule_buffers
from ldmtool.nets.meta import meta_device


def test_loading_every_shipped_model_leaves_torchs_compiler_unimported():
    """A new interpreter, as a command starts: every shipped default (ControlNets by their own loader) and a
    meta build of presets with embeddings load, and the txt2img default encodes a prompt (its BERT tokenizer),
    without importing torch._dynamo, sympy or transformers. (The CLIP and T5 families: tests/test_clip_model.py and
    tests/test_t5.py check that they leave transformers unimported.)"""
    script = textwrap.dedent("""
        import sys
        import ldmtool
        from ldmtool.addons.controlnet import load_controlnet
        from ldmtool.checkpoints.api import load_model
        from ldmtool.checkpoints.presets import shipped_controlnet, shipped_models

        names = [m.name for m in shipped_models()]
        assert len(names) >= 7, names
        for name in names:
            load_controlnet(name) if shipped_controlnet(name) else load_model(name)
        ldmtool.build_model("controlnet-sd15", device="meta")
        for preset in ("ldm-txt2img-1p4b", "ldm-cin256-v2", "sd2-x4-upscaler"):
            ldmtool.build_model(preset, device="meta")
        assert load_model("default-txt2img").cond_stage_model.encode(["a red circle"]).shape[:2] == (1, 77)
        heavy = ("torch._dynamo", "sympy", "torch.fx.experimental.symbolic_shapes", "transformers")
        print(sorted(m for m in heavy if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_meta_device_skips_initialisation_on_meta_only():
    with meta_device():
        embedding, linear = nn.Embedding(10, 4), nn.Linear(4, 3)
        real = torch.empty(5, device="cpu").normal_(generator=torch.Generator().manual_seed(0))
        by_keyword = torch.nn.init.normal_(tensor=torch.zeros(5, device="cpu"))
    assert embedding.weight.is_meta and linear.weight.is_meta and linear.bias.is_meta
    assert torch.equal(real, torch.empty(5).normal_(generator=torch.Generator().manual_seed(0)))
    assert by_keyword.abs().sum() > 0  # a CPU tensor is still initialised, whichever way it is passed
    torch.manual_seed(3)
    after = nn.Linear(4, 3).weight  # the mode is gone once the block ends
    torch.manual_seed(3)
    assert torch.equal(after, nn.Linear(4, 3).weight) and after.abs().sum() > 0


def test_schedule_buffers_follow_the_device_context_with_the_same_values():
    plain = schedule_buffers(beta_schedule="linear", linear_start=0.00085, linear_end=0.012)
    with meta_device():
        meta = schedule_buffers(beta_schedule="linear", linear_start=0.00085, linear_end=0.012)
    assert list(plain) == list(meta) == list(DDPM_BUFFERS)
    assert all(v.is_meta and v.shape == plain[k].shape and v.dtype == torch.float32 for k, v in meta.items())
    assert all(v.device.type == "cpu" for v in plain.values())
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.equal(plain["betas"], betas.float())
