"""SDXL variants of issue 19's prompt features (issue 18): A1111 prompt syntax on both text towers, `--clip-skip`
and `--embeddings-dir` (SDXL `clip_l`/`clip_g` files), against the conditioner's own encoding and against
transformers / diffusers (test-only oracles) on the same tiny random weights."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldmtool.addons.embeddings import read_embedding
from ldmtool.checkpoints.files import save_safetensors
from ldmtool.checkpoints.tiny import randomise_, tiny_model
from ldmtool.pipelines.text import TextConditioner
from test_sdxl import WEIGHT_SCALE, diffusers_text_encoders

WORDS = "cat dog red blue tree house river stone cloud bird".split()  # one CLIP token each


@pytest.fixture(scope="module")
def base():
    return randomise_(tiny_model("sdxl-base"), seed=5, scale=WEIGHT_SCALE).eval()


def _conditioner(bundle, **options):
    return TextConditioner(bundle.conditioner, info=bundle.info, **options)


def _plain(bundle, text):
    """The conditioner's own encoding of a prompt as written (one 77-token chunk through both towers)."""
    with torch.inference_mode():
        out = bundle.conditioner.encode_text([text])
    return out.context[0], out.pooled[0]


def _words(count):
    return " ".join(WORDS[i % len(WORDS)] for i in range(count))


def test_plain_sdxl_prompts_give_exactly_the_conditioners_own_encoding(base):
    texts = _conditioner(base)
    for text in ("a red fox jumping over a fence", "", "x, y"):
        context, pooled = texts._encode(text)
        expected_context, expected_pooled = _plain(base, text)
        assert torch.equal(context, expected_context) and torch.equal(pooled, expected_pooled)
    # except `!`, which bigG's tokenizer (padding with id 0, the id of "!") took as padding: open_clip, which the
    # reference and A1111 use, gives "!</w>" its own id 256, as SD 2.x prompts already get it
    bigg = texts.prompt_encoder.towers[1]
    assert bigg.chunks("hello!")[0].tokens[:4] == [49406, 3306, 256, 49407]


def test_a_150_token_sdxl_prompt_is_two_chunks_through_both_towers_and_break_starts_one(base):
    """As A1111 reads an SDXL prompt: each tower lays out the same 75-token chunks, the contexts join along the
    sequence, and the pooled vector is the first chunk's."""
    texts = _conditioner(base)
    first, second = _words(75), " ".join(reversed(_words(75).split()))
    context, pooled = texts._encode(f"{first} {second}")
    assert context.shape == (154, 64)
    assert torch.equal(context, torch.cat([_plain(base, first)[0], _plain(base, second)[0]]))
    assert torch.equal(pooled, _plain(base, first)[1])
    context, pooled = texts._encode("a red fox BREAK a blue bird")
    assert torch.equal(context, torch.cat([_plain(base, "a red fox")[0], _plain(base, "a blue bird")[0]]))
    assert torch.equal(pooled, _plain(base, "a red fox")[1])


def test_sdxl_weights_scale_each_towers_vectors_and_restore_that_towers_mean(base):
    """`(red:1.5)`: every token vector of the chunk times its weight, then each tower's part (CLIP-L's 32 and
    bigG's 32 columns here) rescaled to its own former mean, as A1111 weights each SDXL embedder; the pooled
    vector is not weighted."""
    context, pooled = _conditioner(base)._encode("a (red:1.5) fox")
    plain, plain_pooled = _plain(base, "a red fox")
    weights = torch.ones(77, 1)
    weights[2] = 1.5  # <start> a red fox <end>
    parts = []
    for part in plain.split(32, dim=-1):
        scaled = part * weights
        parts.append(scaled * (part.mean() / scaled.mean()))
    assert torch.allclose(context, torch.cat(parts, dim=-1), atol=1e-6)
    assert not torch.allclose(context, plain, atol=1e-3)
    assert torch.equal(pooled, plain_pooled)


@pytest.mark.parametrize("skip", [1, 2])
def test_sdxl_clip_skip_takes_the_nth_hidden_state_from_the_end_of_both_towers(base, skip):
    """`--clip-skip N` (ComfyUI's CLIPSetLastLayer(-N) on both towers; A1111's `sdxl_clip_l_skip` on CLIP-L):
    hidden_states[-N] of each tower without the final norm, N=2 being SDXL's own layer; the pooled vector stays
    the last layer's. Oracle: transformers' CLIPTextModel / CLIPTextModelWithProjection on the same weights."""
    clip_l, bigg = diffusers_text_encoders(base)
    text = "a red fox"
    tokens = base.conditioner.text_embedders[0].tokenize([text]), base.conditioner.text_embedders[1].tokenize([text])
    with torch.no_grad():
        out_l, out_g = clip_l(tokens[0], output_hidden_states=True), bigg(tokens[1], output_hidden_states=True)
    context, pooled = _conditioner(base, clip_skip=skip)._encode(text)
    expected = torch.cat([out_l.hidden_states[-skip][0], out_g.hidden_states[-skip][0]], dim=-1)
    assert (context - expected).abs().max() <= 1e-5
    assert (pooled - out_g.text_embeds[0]).abs().max() <= 1e-5
    default, _ = _conditioner(base)._encode(text)
    assert torch.equal(context, default) == (skip == 2)


def test_sdxl_embedding_on_both_towers_equals_diffusers_load_textual_inversion(base, tmp_path):
    """An SDXL embedding file (`clip_l`, `clip_g`, two vectors each) used by name: each tower takes its own
    vectors, as diffusers' `load_textual_inversion` into both text encoders (its documented SDXL recipe) gives."""
    from diffusers import StableDiffusionXLPipeline

    from clip_oracles import transformers_clip_tokenizer

    g = torch.Generator().manual_seed(4)
    vectors = {"clip_l": torch.randn(2, 32, generator=g) * 0.5, "clip_g": torch.randn(2, 32, generator=g) * 0.5}
    save_safetensors(vectors, tmp_path / "fox-style.safetensors")
    clip_l, bigg = diffusers_text_encoders(base)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=clip_l, text_encoder_2=bigg, unet=None, scheduler=None,
                                     tokenizer=transformers_clip_tokenizer(),  # fresh: diffusers adds tokens
                                     tokenizer_2=transformers_clip_tokenizer(pad_with_zero=True))
    pipe.load_textual_inversion(vectors["clip_l"], token="fox-style", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors["clip_g"], token="fox-style", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    text = "a photo of fox-style on a table"
    with torch.no_grad():
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
    texts = _conditioner(base, embeddings=[read_embedding(tmp_path / "fox-style.safetensors")])
    context, pooled = texts._encode(text)
    assert (context - theirs[0]).abs().max() <= 1e-5 and (pooled - theirs_pooled[0]).abs().max() <= 1e-5
    assert not torch.allclose(context, _plain(base, text)[0], atol=1e-3)  # control: the vectors are used
    assert texts.ti_hashes(text).startswith("fox-style: ")


def test_sdxl_prompt_features_reach_the_image(tmp_path, base):
    """On an SDXL file from the command line: weights, `--clip-skip` and `--embeddings-dir` change the image and
    are recorded; a clip skip past the towers' layers is one usage error."""
    import json

    import yaml

    from clirun import run_cli

    model = tmp_path / "sdxl.safetensors"
    save_safetensors(base.state_dict(), model)
    model.with_suffix(".yaml").write_text(yaml.safe_dump(base.config, sort_keys=False))
    folder = tmp_path / "embeddings"
    folder.mkdir()
    g = torch.Generator().manual_seed(4)
    save_safetensors({"clip_l": torch.randn(1, 32, generator=g), "clip_g": torch.randn(1, 32, generator=g)},
                     folder / "fox-style.safetensors")

    def run(name, *args):
        result = run_cli("txt2img", "--model", model, "-W", 64, "-H", 64, "--steps", 2, "--sampler", "euler",
                         "--cfg", 3, "--seed", 1, "--quiet", "-o", tmp_path / f"{name}.png", *args)
        assert result.exit_code == 0, result.output
        with Image.open(tmp_path / f"{name}.png") as image:
            return np.asarray(image).astype(int), image.info

    plain, _ = run("plain", "--prompt", "a red fox")
    weighted, _ = run("weighted", "--prompt", "a (red:3) fox")
    skipped, info = run("skipped", "--prompt", "a red fox", "--clip-skip", 1)
    styled, styled_info = run("styled", "--prompt", "a fox-style fox", "--embeddings-dir", folder)
    unstyled, _ = run("unstyled", "--prompt", "a fox-style fox")
    for other in (weighted, skipped):
        assert np.abs(other - plain).max() > 5
    assert np.abs(styled - unstyled).max() > 5
    assert json.loads(info["ldmtool"])["parameters"]["clip_skip"] == 1
    assert "TI hashes:" in styled_info["parameters"]
    job = json.loads(styled_info["ldmtool"])["job"]["options"]  # a replaced embedding file is another job
    assert list(job["embeddings_sha256"]) == ["fox-style.safetensors"]
    result = run_cli("txt2img", "--model", model, "--prompt", "x", "--clip-skip", 3, "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and "--clip-skip 3" in result.output and "2 layers" in result.output
    assert "Traceback" not in result.output
