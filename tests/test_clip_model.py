"""`nets.clip_model`, ldmtool's CLIP text tower, against transformers' `CLIPTextModel` and
`CLIPTextModelWithProjection` (the test-only oracle) with the same random weights: the same parameter names,
hidden states, final layer norm, pooled output (at the first end token, or at the highest id for SD 1.x's
legacy `eos_token_id` 2) and projection, for OpenAI's quick-GELU towers and OpenCLIP's GELU ones."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from ldmtool.nets.clip_model import ClipTextConfig, ClipTextModelWithProjection, ClipTextTransformer

SMALL = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, projection_dim=48, num_hidden_layers=3,
             num_attention_heads=4, max_position_embeddings=77)
# rows: a short prompt padded to 77, a full row, a row with an end token written early (pooled at the first one)
IDS = {49407: [[49406, 320, 1125, 539, 49407] + [49407] * 72, [49406] + list(range(300, 375)) + [49407],
               [49406, 320, 49407, 4000, 49407] + [0] * 72],
       2: [[49406, 320, 1125, 539, 49407] + [49407] * 72, [49406] + list(range(300, 375)) + [49407],
           [49406, 320, 49407] + [0] * 74]}


def _random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * (0.02 if "embedding" in k else 0.2)
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("act,eos", [("quick_gelu", 2), ("quick_gelu", 49407), ("gelu", 49407)])
def test_clip_text_tower_equals_transformers(act, eos):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    settings = dict(SMALL, hidden_act=act, eos_token_id=eos)
    theirs = CLIPTextModelWithProjection(CLIPTextConfig(**settings)).eval()
    theirs.load_state_dict(_random_state(theirs, seed=len(act) + eos))
    ours = ClipTextModelWithProjection(ClipTextConfig(**settings)).eval()
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ids = torch.tensor(IDS[eos])
    with torch.inference_mode():
        expected = theirs(input_ids=ids, output_hidden_states=True)
        got = ours.text_model(ids)
        assert len(got.hidden_states) == len(expected.hidden_states) == SMALL["num_hidden_layers"] + 1
        for mine, reference in zip(got.hidden_states, expected.hidden_states):
            torch.testing.assert_close(mine, reference, rtol=0, atol=2e-5)
        torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=0, atol=2e-5)
        torch.testing.assert_close(ours.text_projection(got.pooler_output), expected.text_embeds, rtol=0, atol=2e-5)
        pooled_at = [4, 76, 2]  # the first end token, also for the legacy id: it is the highest id there
        assert torch.equal(got.pooler_output, got.last_hidden_state[torch.arange(3), pooled_at])


def test_the_tower_is_causal_and_refuses_rows_longer_than_its_positions():
    model = ClipTextTransformer(ClipTextConfig(**SMALL)).eval()
    ids = torch.tensor([IDS[49407][1]])
    changed = ids.clone()
    changed[0, 40] = 999
    with torch.inference_mode():
        before, after = model(ids).last_hidden_state, model(changed).last_hidden_state
        assert torch.equal(before[:, :40], after[:, :40]) and not torch.allclose(before[:, 40:], after[:, 40:])
        with pytest.raises(ValueError, match="78 tokens: this CLIP text encoder takes at most 77"):
            model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="activation 'relu'"):
        ClipTextTransformer(ClipTextConfig(**SMALL, hidden_act="relu"))


def test_clip_families_load_and_encode_without_importing_transformers():
    """A new interpreter, as a command starts: SD 1.x (CLIP-L), SDXL (CLIP-L and bigG) and an SD3 CLIP file
    encode prompts, and transformers (2-4 s of such a command's start-up) and torch's compiler stack stay
    unimported."""
    script = textwrap.dedent("""
        import sys
        import torch
        from ldmtool.checkpoints.tiny import tiny_model
        from ldmtool.nets.clip_model import ClipTextConfig, ClipTextModelWithProjection
        from ldmtool.nets.clip_text import open_clip_encoder

        with torch.inference_mode():
            assert tiny_model("sd1").cond_stage.encode(["a red fox!"]).shape[:2] == (1, 77)
            assert tiny_model("sdxl-base").conditioner.encode_text(["a red fox!"]).pooled.shape[0] == 1
            tower = ClipTextModelWithProjection(ClipTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                               num_attention_heads=2, projection_dim=32))
            state = {"text_encoders.clip_g.transformer." + k: v for k, v in tower.state_dict().items()}
            hidden, pooled = open_clip_encoder(state)(["a red fox!"])
            assert hidden.shape == (1, 77, 32) and pooled.shape == (1, 32)
        heavy = ("transformers", "torch._dynamo", "sympy")  # transformers' model code imported the other two
        print(sorted(m for m in heavy if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
