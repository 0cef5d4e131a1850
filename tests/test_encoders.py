"""Conditioning encoders and bundled tokenizers: reference layouts, defining behaviour, and agreement
with independent implementations (diffusers' converters into transformers' CLIPTextModel; closed forms)."""
import gzip
import hashlib
import math
from importlib import resources

import pytest
import torch
import torch.nn.functional as F

from clip_oracles import transformers_clip_tokenizer
from ldmtool.nets.encoders import (
    BERTEmbedder,
    ClassEmbedder,
    FrozenCLIPEmbedder,
    FrozenOpenCLIPEmbedder,
    ImageConcatWithNoiseAugmentation,
    SpatialRescaler,
)
from ldmtool.nets.tokenizers import (
    BERT_VOCAB_FILE,
    _read_gz_lines,
    bert_ids,
    bert_tokenizer,
    clip_bpe,
    clip_ids,
    clip_text_ids,
    clip_token_id,
)

torch.set_num_threads(1)
CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with OpenAI CLIP's tokenizer


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


# --- tokenizers -------------------------------------------------------------------------------------

def test_clip_ids_are_clips_and_sd1_pads_with_eos():
    (ids,) = clip_ids(["a photo of a cat"])
    assert ids[:7] == CAT and ids[7:] == [49407] * 70 and clip_bpe().get_vocab_size() == 49408
    assert clip_token_id(",</w>") == 267 and clip_text_ids("a photo of a cat") == CAT[1:-1]


# Text that exercises every stage of CLIP's pipeline: NFC (composed and decomposed accents), whitespace runs,
# case, contractions, digits (one token each), symbol runs, CJK and other scripts (byte-level pieces), emoji,
# control characters, the special tokens written in the text, long words, prompt syntax and `!`.
CLIP_CASES = [
    "", " ", "a photo of a cat", "A Photo OF a CAT", "Crème Brûlée", "Cre\u0300me Bru\u0302le\u0301e", "tab\tnew\nline  x",
    "it's they're we've I'm you'll he'd IT'S", "1234 5.67 ①②", "hello,world!(x) [y] {z} <w> ...!!!", "東京タワー と 北京",
    "emoji 🦊🔥 ★", "nul\x00char \x07bell \ufffd", "<|startoftext|>a<|endoftext|> b <|ENDOFTEXT|>", "x" * 120,
    "(masterpiece:1.2), [bad hands], BREAK {a|b}", "Ελληνικά Русский עברית العربية हिन्दी", "a\u3000b\u00a0c\u200bd",
    "ﬁnancial ℌ", "! !! !!!", "cat " * 100,
]


@pytest.mark.parametrize("length", [77, 8, 2])
def test_clip_ids_equal_transformers_clip_tokenizer(length):
    """The oracle: transformers' CLIPTokenizer on the same vocabulary, as SD 1.x's code calls it."""
    theirs = transformers_clip_tokenizer()
    expected = theirs(CLIP_CASES, truncation=True, max_length=length, padding="max_length").input_ids
    assert clip_ids(CLIP_CASES, length=length) == expected
    assert [clip_text_ids(text) for text in CLIP_CASES] == [theirs.convert_tokens_to_ids(theirs.tokenize(text))
                                                          for text in CLIP_CASES]


def test_clip_ids_equal_transformers_on_generated_text():
    from hypothesis import HealthCheck, given, settings, strategies as st

    theirs = transformers_clip_tokenizer()

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.text(max_size=60) | st.sampled_from(CLIP_CASES), min_size=1, max_size=4).map(" ".join))
    def agree(text):
        assert clip_ids([text]) == theirs([text], truncation=True, max_length=77, padding="max_length").input_ids
        assert clip_text_ids(text) == theirs.convert_tokens_to_ids(theirs.tokenize(text))

    agree()


def test_clip_ids_padded_with_zero_are_open_clips_and_keep_exclamation_marks():
    """open_clip (SD 2.x, SDXL's bigG) pads with 0, the id of `!`, but reads a `!` in the text as `!</w>`: its
    output for this prompt, as diffusers issue 4153 quotes it. transformers' tokenizer with `!` as pad token
    reads every `!` as padding; elsewhere the two agree."""
    (ids,) = clip_ids(["! !! !!!"], pad_with_zero=True)
    assert ids == [49406, 256, 748, 995, 49407] + [0] * 72
    theirs = transformers_clip_tokenizer(pad_with_zero=True)
    assert theirs(["! !! !!!"], padding="max_length", max_length=77).input_ids[0][1] == 0  # the bug avoided
    plain = [text for text in CLIP_CASES if "!" not in text]
    assert clip_ids(plain, pad_with_zero=True) == theirs(plain, truncation=True, max_length=77,
                                                         padding="max_length").input_ids


def test_openclip_pads_with_zero_and_truncates_to_77_ending_in_eos():
    enc = FrozenOpenCLIPEmbedder(width=32, layers=1, heads=2)
    tokens = enc.tokenize(["a photo of a cat", "cat " * 200])
    assert tokens.shape == (2, 77)
    assert tokens[0, :7].tolist() == CAT and tokens[0, 7:].eq(0).all()
    assert tokens[1, 0] == 49406 and tokens[1, -1] == 49407 and tokens[1, 1:-1].eq(2368).all()
    assert enc.tokenize(["hello!"])[0, :4].tolist() == [49406, 3306, 256, 49407]  # "!</w>", as open_clip reads it


def test_bert_tokenizer_is_bert_base_uncased():
    raw = gzip.decompress(resources.files("ldmtool.assets").joinpath("tokenizers", "bert_uncased_vocab.txt.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() == "64800d5d8528ce344256daf115d4965e"  # bert-base-uncased vocab.txt
    (ids,) = bert_ids(["A Photo of a CAT"], 77)
    assert ids[:7] == [101, 1037, 6302, 1997, 1037, 4937, 102] and set(ids[7:]) == {0} and len(ids) == 77
    assert bert_tokenizer().get_vocab_size() == 30522


# Text that exercises every stage of BERT's pipeline: case, accents, CJK, punctuation (ASCII and Unicode),
# control and zero-width characters, whitespace of all kinds, words past 100 characters, pieces, unknown
# characters, and the special tokens written in the text (matched only as written, upper case).
BERT_CASES = [
    "", " ", "a red circle above a blue square", "A Photo of a CAT", "Crème Brûlée à la carte", "naïve façade ÅNGSTRÖM",
    "東京タワー and 北京", "hello,world!(x) [y] {z} <w>", "tab\tnew\nline\r\n  spaces", "zero\u200bwidth soft\u00adhyphen",
    "nul\x00char \x07bell \ufffdreplacement", "emoji 🦊🔥 and ★ symbols", "—em–dash “quotes” «guillemets» ¿que?",
    "x" * 120, "supercalifragilisticexpialidocious unaffordable", "[SEP] [sep] [CLS]x y[MASK] [PAD][UNK]", "(((masterpiece)))",
    "ﬁnancial ligature ℌ fraktur ① circled", "Ελληνικά Русский עברית العربية हिन्दी", "a  b\u3000c\u00a0d",
]


def _transformers_bert():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={tok: i for i, tok in enumerate(_read_gz_lines(BERT_VOCAB_FILE))}, do_lower_case=True)


@pytest.mark.parametrize("length", [77, 8, 2])
def test_bert_ids_equal_transformers_bert_tokenizer(length):
    """The oracle: transformers' BertTokenizer on the same vocabulary, as the LDM code calls it."""
    theirs = _transformers_bert()(BERT_CASES, truncation=True, max_length=length, padding="max_length").input_ids
    assert bert_ids(BERT_CASES, length) == theirs


def test_bert_ids_equal_transformers_on_generated_text():
    from hypothesis import HealthCheck, given, settings, strategies as st

    theirs = _transformers_bert()

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.text(max_size=60) | st.sampled_from(BERT_CASES), min_size=1, max_size=4).map(" ".join))
    def agree(text):
        assert bert_ids([text], 77) == theirs([text], truncation=True, max_length=77, padding="max_length").input_ids

    agree()


def test_tokenizers_never_touch_the_network(monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    clip_bpe.cache_clear()
    bert_tokenizer.cache_clear()
    assert clip_ids(["cat"], length=3) == [[49406, 2368, 49407]]
    assert bert_ids(["cat"], 3) == [[101, 4937, 102]]


# --- OpenCLIP (SD 2.x) and CLIP (SD 1.x) against diffusers' converters ------------------------------

def _clip_text_model(**overrides):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**overrides)).eval()


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_openclip_equals_diffusers_conversion_into_clip_text_model(layer):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    width, layers = 32, 3
    ours = _randomise(FrozenOpenCLIPEmbedder(width=width, layers=layers, heads=2, layer=layer))
    ckpt = {f"cond_stage_model.{k}": v for k, v in ours.state_dict().items()}
    used = layers - (1 if layer == "penultimate" else 0)  # diffusers keeps the layers SD 2 uses
    ckpt = {k: v for k, v in ckpt.items() if f"resblocks.{used}." not in k}
    ref = _clip_text_model(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=used,
                           num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", projection_dim=width)
    converted = convert_open_clip_checkpoint(ref, ckpt)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items() if k != "text_projection.weight"}
    missing, unexpected = ref.load_state_dict(converted, strict=False)
    assert not unexpected and set(missing) <= {"embeddings.position_ids"}
    prompts = ["a photo of a cat", "an astronaut riding a horse on the moon"]
    tokens = ours.tokenize(prompts)
    with torch.no_grad():
        expected = ref(input_ids=tokens).last_hidden_state
        got = ours.encode(prompts)
    assert got.shape == (2, 77, width)
    assert torch.allclose(got, expected, atol=1e-4)


def test_clip_embedder_keys_convert_with_diffusers_and_give_the_same_context():
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    ours = _randomise(FrozenCLIPEmbedder(text_config=tiny))
    ckpt = {f"cond_stage_model.{k}": v for k, v in ours.state_dict().items()}
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in ckpt
    converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()}
    ref = _clip_text_model(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", **tiny)
    ref.load_state_dict(converted, strict=True)
    prompts = ["a photo of a cat"]
    with torch.no_grad():
        assert torch.allclose(ours.encode(prompts), ref(input_ids=ours.tokenize(prompts)).last_hidden_state, atol=1e-5)


def test_full_size_text_encoders_have_the_published_parameter_counts():
    with torch.device("meta"):
        clip = FrozenCLIPEmbedder()
        openclip = FrozenOpenCLIPEmbedder(layer="penultimate")
    assert sum(p.numel() for p in clip.parameters()) == 123_060_480  # CLIP ViT-L/14 text tower
    text_tower = sum(p.numel() for n, p in openclip.named_parameters() if n != "model.logit_scale")
    assert text_tower == 354_032_640  # OpenCLIP ViT-H-14 text tower incl. text_projection


# --- LDM BERT-like transformer: against a plain re-derivation of the x-transformers forward ----------

def _reference_bert_forward(sd, tokens, heads=8, dim_head=64):
    """Pre-norm encoder written out with explicit softmax attention, from the checkpoint tensors."""
    x = sd["transformer.token_emb.weight"][tokens] + sd["transformer.pos_emb.emb.weight"][: tokens.shape[1]]
    i = 0
    while f"transformer.attn_layers.layers.{i}.0.weight" in sd:
        p = f"transformer.attn_layers.layers.{i}."
        h = F.layer_norm(x, x.shape[-1:], sd[p + "0.weight"], sd[p + "0.bias"])
        if i % 2 == 0:
            q, k, v = (h @ sd[p + f"1.to_{n}.weight"].T for n in "qkv")
            split = lambda t: t.view(*t.shape[:2], heads, dim_head).transpose(1, 2)  # noqa: E731
            att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim_head), dim=-1)
            out = (att @ split(v)).transpose(1, 2).reshape(*x.shape[:2], -1)
            x = x + out @ sd[p + "1.to_out.weight"].T + sd[p + "1.to_out.bias"]
        else:
            h = F.gelu(h @ sd[p + "1.net.0.0.weight"].T + sd[p + "1.net.0.0.bias"])
            x = x + h @ sd[p + "1.net.2.weight"].T + sd[p + "1.net.2.bias"]
        i += 1
    return F.layer_norm(x, x.shape[-1:], sd["transformer.norm.weight"], sd["transformer.norm.bias"])


def test_bert_embedder_matches_reference_forward_with_and_without_tokenizer():
    enc = _randomise(BERTEmbedder(n_embed=48, n_layer=2))
    with torch.no_grad():
        got = enc.encode(["a photo of a cat", "a red bus"])
        tokens = enc.tokenize(["a photo of a cat", "a red bus"])
        expected = _reference_bert_forward(enc.state_dict(), tokens)
    assert got.shape == (2, 77, 48) and torch.allclose(got, expected, atol=1e-5)
    layout = _randomise(BERTEmbedder(n_embed=32, n_layer=1, vocab_size=8192, max_seq_len=92, use_tokenizer=False))
    ids = torch.randint(0, 8192, (3, 92), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(layout.encode(ids), _reference_bert_forward(layout.state_dict(), ids), atol=1e-5)


def test_bert_embedder_keys_are_the_x_transformers_layout():
    keys = set(BERTEmbedder(n_embed=32, n_layer=2).state_dict())
    assert {"transformer.token_emb.weight", "transformer.pos_emb.emb.weight", "transformer.norm.weight",
            "transformer.to_logits.weight", "transformer.attn_layers.layers.0.1.to_q.weight",
            "transformer.attn_layers.layers.3.1.net.2.bias"} <= keys
    assert not any("layers.0.1.to_q.bias" in k for k in keys)


# --- class embedder, spatial rescaler, x4 low-resolution noise augmentation ------------------------

def test_class_embedder_gives_one_token_per_label():
    enc = _randomise(ClassEmbedder(embed_dim=16, n_classes=1001, key="class_label"))
    labels = torch.tensor([0, 999, 1000])
    out = enc.encode(labels)
    assert out.shape == (3, 1, 16) and torch.equal(out[:, 0], enc.embedding.weight[labels])
    assert torch.equal(enc.encode({"class_label": labels}), out)


def test_spatial_rescaler_size_and_channel_map():
    enc = _randomise(SpatialRescaler(n_stages=2, in_channels=182, out_channels=3))
    x = torch.randn(2, 182, 64, 48)
    out = enc.encode(x)
    resized = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear"), scale_factor=0.5, mode="bilinear")
    expected = torch.einsum("oc,bchw->bohw", enc.channel_mapper.weight[:, :, 0, 0], resized)
    assert out.shape == (2, 3, 16, 12) and torch.allclose(out, expected, atol=1e-5)
    assert list(SpatialRescaler(n_stages=1).state_dict()) == []


def test_low_scale_noise_augmentation_is_q_sample_on_its_own_schedule():
    aug = ImageConcatWithNoiseAugmentation({"linear_start": 1e-4, "linear_end": 0.02}, max_noise_level=350)
    betas = torch.linspace(1e-4**0.5, 0.02**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    assert torch.allclose(aug.alphas_cumprod, ac.float()) and aug.max_noise_level == 350
    assert sorted(aug.state_dict()) == sorted([
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"])
    x, noise = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    z, level = aug.encode(x, 20, noise=noise)
    assert level.tolist() == [20, 20]
    assert torch.allclose(z, (ac[20].sqrt() * x + (1 - ac[20]).sqrt() * noise).float(), atol=1e-6)
    assert torch.equal(aug.encode(x, 0, noise=torch.zeros_like(x))[0], aug.sqrt_alphas_cumprod[0] * x)
    with pytest.raises(ValueError):
        aug.encode(x, 1000)
