"""A1111 prompt syntax (issue 19): the parse of A1111's documented examples, 77-token chunks, BREAK,
weighting, clip skip, negative padding, and plain prompts giving exactly the context they gave before
(the encoder's own `encode`, which is what every prompt went through until now)."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ldmtool.checkpoints.tiny import randomise_, tiny_model
from ldmtool.cli.app import main
from ldmtool.nets.tokenizers import clip_text_ids, clip_token_id
from ldmtool.pipelines.prompt_encoding import PromptEncoder
from ldmtool.pipelines.prompt_syntax import extra_networks, parse_attention
from ldmtool.pipelines.text import TextConditioner

# A1111's documented examples (the docstring of `parse_prompt_attention` in modules/prompt_parser.py).
DOCUMENTED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]
WORDS = "cat dog red blue tree house river stone cloud bird".split()  # one CLIP token each


@pytest.mark.parametrize("text,expected", DOCUMENTED)
def test_a1111_documented_examples_parse_to_their_token_weight_pairs(text, expected):
    parsed = parse_attention(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_square_brackets_break_and_lora_tags():
    assert parse_attention("[a] b") == [("a", pytest.approx(1 / 1.1)), (" b", 1.0)]
    assert parse_attention("a fox BREAK a (sky)") == [("a fox", 1.0), ("BREAK", -1.0), ("a ", 1.0), ("sky", 1.1)]
    assert parse_attention("BREAKFAST") == [("BREAKFAST", 1.0)]
    text, tags = extra_networks("a fox <lora:style:0.7>, <lora:other>")
    assert text == "a fox , " and [(t.name, t.weight) for t in tags] == [("style", 0.7), ("other", 1.0)]


@pytest.mark.parametrize("tag, weights", [
    ("<lora:x:0.5:0.2>", (0.5, 0.2)), ("<lora:x:0.5>", (0.5, None)), ("<lora:x:unet=0.3>", (1.0, 0.3)),
    ("<lora:x:unet=0.3:te=0.1>", (0.1, 0.3)), ("<lora:x: 0.4 : 0.6 >", (0.4, 0.6)), ("<lora:x:>", (1.0, None)),
])
def test_lora_tags_weigh_text_encoder_then_unet_as_a1111_does(tag, weights):
    (found,) = extra_networks(tag)[1]
    assert (found.name, found.weight, found.unet_weight) == ("x", *weights)


@pytest.mark.parametrize("tag, problem", [
    ("<lora:x:1:0.5:8>", "DyLoRA's dyn (a rank limit) is not supported"), ("<lora:x:dyn=8>", "dyn"),
    ("<lora:x:scale=2>", "unknown argument 'scale'"), ("<lora:x:1:big>", "the weight must be a number"),
    ("<lora:x:unet=inf>", "the weight must be a finite number"),
])
def test_lora_tag_arguments_ldmtool_would_ignore_are_refused(tag, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        extra_networks(tag)


@pytest.fixture(scope="module")
def encoders():
    return {preset: tiny_model(preset).cond_stage for preset in ("sd1", "sd2")}


def _encode(encoder, text):
    with torch.inference_mode():
        return encoder.encode([text])[0].float()


@pytest.mark.parametrize("preset", ["sd1", "sd2"])
def test_plain_prompts_give_exactly_the_encoders_own_context(encoders, preset):
    encoder = encoders[preset]
    prompts = ["a red fox jumping over a fence", "", "  spaces  and, commas; punctuation?", "ÄÖÜ ünïcödé",
               " ".join(WORDS[i % 10] for i in range(75))]  # exactly one full chunk
    for text in prompts:
        assert torch.equal(PromptEncoder(encoder)(text), _encode(encoder, text)), text


def test_an_exclamation_mark_is_a_token_for_sd2_as_open_clip_tokenizes_it(encoders):
    """The bundled tokenizer made with `!` as SD 2.x's pad token read a `!` in a prompt as padding (id 0);
    open_clip's tokenizer gives it `!</w>` (256), and so do the prompt chunks now."""
    chunk = PromptEncoder(encoders["sd2"]).chunks("wow!")[0]
    assert chunk.tokens[:4] == [49406, clip_token_id("wow</w>"), 256, 49407]


def _words(count, start=0):
    text = " ".join(WORDS[(start + i) % len(WORDS)] for i in range(count))
    assert len(clip_text_ids(text)) == count
    return text


@pytest.mark.parametrize("preset", ["sd1", "sd2"])
def test_a_150_token_prompt_is_two_chunks_each_encoded_alone(encoders, preset):
    encoder = encoders[preset]
    first, second = _words(75), _words(75, start=3)
    context = PromptEncoder(encoder)(f"{first} {second}")
    assert context.shape == (154, 32)
    assert torch.equal(context, torch.cat([_encode(encoder, first), _encode(encoder, second)]))


def test_break_starts_a_new_chunk(encoders):
    encoder = encoders["sd1"]
    context = PromptEncoder(encoder)("a red fox BREAK a blue sky")
    assert torch.equal(context, torch.cat([_encode(encoder, "a red fox"), _encode(encoder, "a blue sky")]))


def test_a_full_chunk_is_cut_after_a_late_comma(encoders):
    """A1111's comma backtrack: 70 words, a comma, 10 words: the chunk ends after the comma."""
    encoder = encoders["sd1"]
    head, tail = _words(70) + ",", _words(10, start=1)
    context = PromptEncoder(encoder)(f"{head} {tail}")
    assert torch.equal(context, torch.cat([_encode(encoder, head), _encode(encoder, tail)]))


def test_weights_scale_token_vectors_then_restore_the_chunk_mean(encoders):
    """A1111's formula written out: z * w per token, then z * (mean before / mean after)."""
    encoder = encoders["sd1"]
    z = _encode(encoder, "a red fox")
    ids = encoder.tokenize(["a red fox"])[0].tolist()
    weights = torch.ones(77)
    weights[ids.index(clip_token_id("red</w>"))] = 1.5
    scaled = z * weights[:, None]
    expected = scaled * (z.mean() / scaled.mean())
    assert torch.allclose(PromptEncoder(encoder)("a (red:1.5) fox"), expected, atol=1e-6)
    assert torch.equal(PromptEncoder(encoder)("a (red:1) fox"), z)


def test_clip_skip_2_is_the_penultimate_hidden_state_through_the_final_norm(encoders):
    encoder = encoders["sd1"]
    text_model = encoder.transformer.text_model
    tokens = encoder.tokenize(["a red fox"])
    with torch.inference_mode():
        hidden = text_model(tokens).hidden_states
        expected = text_model.final_layer_norm(hidden[-2])[0]
    got = PromptEncoder(encoder, clip_skip=2)("a red fox")
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, _encode(encoder, "a red fox"), atol=1e-3)
    assert torch.equal(PromptEncoder(encoder, clip_skip=1)("a red fox"), _encode(encoder, "a red fox"))
    sd2 = encoders["sd2"]  # SD 2.x reads its penultimate layer: --clip-skip 2 is its default
    assert torch.equal(PromptEncoder(sd2, clip_skip=2)("a red fox"), _encode(sd2, "a red fox"))


def test_the_shorter_of_prompt_and_negative_is_padded_with_empty_chunks(encoders):
    encoder = encoders["sd1"]
    texts = TextConditioner(encoder)
    long = f"{_words(75)} {_words(10)}"
    cond, uncond = texts.pair([long], ["blurry"])
    assert cond.shape == uncond.shape == (1, 154, 32)
    assert torch.equal(uncond[0], torch.cat([_encode(encoder, "blurry"), _encode(encoder, "")]))


def _txt2img(model, tmp_path, name, *args):
    out = tmp_path / f"{name}.png"
    try:
        main(["txt2img", "--model", str(model), "-W", "64", "-H", "64", "--steps", "3", "--sampler", "ddim",
              "--seed", "5", "--quiet", "-o", str(out), *args])
    except SystemExit as exit:
        assert not exit.code
    with Image.open(out) as image:
        return np.asarray(image).astype(int), image.info


def test_weights_clip_skip_and_long_prompts_reach_the_image(tmp_path):
    import yaml

    from ldmtool.checkpoints.files import save_safetensors

    bundle = randomise_(tiny_model("sd1"), seed=7, scale=0.3)
    model = tmp_path / "sd1.safetensors"
    save_safetensors(bundle.state_dict(), model)
    model.with_suffix(".yaml").write_text(yaml.safe_dump(bundle.config, sort_keys=False))
    plain, _ = _txt2img(model, tmp_path, "plain", "--prompt", "a red fox")
    same, _ = _txt2img(model, tmp_path, "same", "--prompt", "a (red:1.0) fox")
    weighted, _ = _txt2img(model, tmp_path, "weighted", "--prompt", "a (red:3) fox")
    skipped, info = _txt2img(model, tmp_path, "skipped", "--prompt", "a red fox", "--clip-skip", "2")
    long, _ = _txt2img(model, tmp_path, "long", "--prompt", f"a red fox {_words(80)}", "--negative", "blurry")
    assert np.array_equal(plain, same)
    for other in (weighted, skipped, long):
        assert np.abs(other - plain).max() > 5  # agreement within 1/255 is the noise floor elsewhere
    assert json.loads(info["ldmtool"])["parameters"]["clip_skip"] == 2
    assert "Clip skip: 2," in info["parameters"]


def test_any_text_parses_and_lays_out_in_whole_chunks(encoders):
    """Hostile prompts (unbalanced brackets, stray colons and backslashes, huge weights, BREAK anywhere)
    never fail: every piece has a weight, and every chunk is 77 ids framed by <start> and <end>."""
    from hypothesis import given, strategies as st

    encoder = PromptEncoder(encoders["sd1"])
    alphabet = st.sampled_from(list("ab ,()[]:\\.1") + ["BREAK", " BREAK ", ":1e9)", ":-2)", "<lora:x:1>", "é"])

    @given(st.lists(alphabet, max_size=60).map("".join))
    def check(text):
        pieces = parse_attention(text)
        assert pieces and all(isinstance(t, str) and isinstance(w, float) for t, w in pieces)
        for chunk in encoder.chunks(text):
            assert len(chunk.tokens) == len(chunk.weights) == 77
            assert chunk.tokens[0] == 49406 and 49407 in chunk.tokens[1:]

    check()
    plain = "a quiet harbour at dusk"
    assert parse_attention(plain) == [(plain, 1.0)]
