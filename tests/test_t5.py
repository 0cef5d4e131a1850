"""The T5 text encoder and tokenizer against transformers and the diffusers pipelines' T5 prompt helpers, on a
tiny random T5 and a tiny SentencePiece-style tokenizer.json written by the tests."""
import string
from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

from ldmtool.errors import CheckpointError, UsageError
from ldmtool.nets.t5 import (
    SD3_PREFIX,
    SD3_REFERENCE_PADDING,
    T5Padding,
    T5TextEncoder,
    find_t5_tokenizer,
    load_t5,
    load_t5_tokenizer,
    open_t5_encoder,
    t5_config,
    t5_folder_state,
    t5_prefix,
    t5_weights,
)

WORDS = ["▁a", "▁cat", "▁on", "▁the", "▁mat", "▁red", "▁dog", "▁photo", "▁of"]
PROMPTS = ["a photo of a red cat", "", "the dog on the mat, a cat on the dog"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A T5-shaped tokenizer.json: Unigram pieces after <pad> = 0, </s> = 1, <unk> = 2; Metaspace; </s> appended."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(w, -1.0) for w in WORDS]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + ",."]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    folder = tmp_path_factory.mktemp("flux") / "tokenizer_2"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def reference_model():
    torch.manual_seed(0)
    config = T5Config(vocab_size=48, d_model=16, d_kv=6, d_ff=40, num_layers=3, num_heads=2, relative_attention_num_buckets=8,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return T5EncoderModel(config).eval()


def released_layout(model: T5EncoderModel) -> dict:
    """The state dict as t5xxl_fp16.safetensors stores it: no tied `encoder.embed_tokens` copy."""
    return {k: v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def _ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.encode(prompt).ids if isinstance(tokenizer, Tokenizer) else tokenizer(prompt).input_ids


def test_config_from_shapes_is_the_model_config(reference_model):
    ours, ref = t5_config(t5_weights(released_layout(reference_model))), reference_model.config
    fields = ["vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
              "relative_attention_max_distance", "layer_norm_epsilon"]
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(ref, f) for f in fields}
    assert ours.gated and ref.is_gated_act and ref.dense_act_fn == "gelu_new"


def test_the_encoder_has_transformers_parameter_names_and_equals_it_in_every_mode(reference_model):
    """The oracle: transformers' T5EncoderModel with the same weights, v1.1 (gated GELU, tanh form) and v1.0
    (ReLU), with and without a padding mask, in float32 and bfloat16; float16 clamps as transformers does."""
    v10 = T5EncoderModel(T5Config(vocab_size=48, d_model=16, d_kv=6, d_ff=40, num_layers=2, num_heads=2,
                                  relative_attention_num_buckets=8, feed_forward_proj="relu", dropout_rate=0.0)).eval()
    ids = torch.tensor([[5, 9, 3, 40, 41, 42, 43, 44, 45, 46, 47, 1], [7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    mask = (torch.arange(12) < torch.tensor([[12], [2]])).long()
    for reference in (reference_model, v10):
        ours = load_t5(released_layout(reference))
        assert sorted(ours.state_dict()) == sorted(reference.state_dict())
        for dtype, atol in ((torch.float32, 1e-6), (torch.bfloat16, 0.05)):
            mine, theirs = load_t5(released_layout(reference), dtype=dtype), T5EncoderModel(reference.config).eval()
            theirs.load_state_dict(reference.state_dict())
            theirs.to(dtype)
            with torch.no_grad():
                for given in (None, mask):
                    torch.testing.assert_close(mine(ids, attention_mask=given).last_hidden_state.float(),
                                               theirs(input_ids=ids, attention_mask=given).last_hidden_state.float(),
                                               rtol=0, atol=atol)


@pytest.mark.parametrize("storage", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("prefix", ["", SD3_PREFIX])
def test_released_files_load_upcast_and_match_transformers(tmp_path, reference_model, storage, prefix):
    stored = {prefix + k: v.to(storage) for k, v in released_layout(reference_model).items()}
    if prefix:  # an SD3 single file holds other parts too
        stored["model.diffusion_model.pos_embed"] = torch.zeros(1, 4, 8)
    save_file(stored, tmp_path / "t5.safetensors")
    model = load_t5(load_file(tmp_path / "t5.safetensors"), source="t5.safetensors")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # transformers' own model on the same values (rounded through the storage dtype)
    oracle = T5EncoderModel(reference_model.config).eval()
    oracle.load_state_dict({k: v.to(storage).float() for k, v in reference_model.state_dict().items()})
    ids = torch.tensor([[5, 9, 3, 1, 0, 0], [7, 1, 0, 0, 0, 0]])
    with torch.no_grad():  # both on the inference kernels (with autograd on, attention may take another path)
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, oracle(input_ids=ids).last_hidden_state,
                                   rtol=0, atol=1e-6)


def test_a_state_dict_without_t5_or_with_wrong_shapes_is_one_line_error(reference_model):
    with pytest.raises(CheckpointError, match=r"^clip.safetensors: holds no T5 encoder"):
        load_t5({"text_model.final_layer_norm.weight": torch.zeros(4)}, source="clip.safetensors")
    broken = released_layout(reference_model)
    broken["encoder.block.1.layer.0.SelfAttention.k.weight"] = torch.zeros(3, 16)
    with pytest.raises(CheckpointError, match="does not match the T5 encoder architecture.*1 with other shapes") as err:
        load_t5(broken, source="t5.safetensors")
    assert "\n" not in str(err.value)
    incomplete = {k: v for k, v in released_layout(reference_model).items() if "relative_attention_bias" not in k}
    with pytest.raises(CheckpointError, match="incomplete T5 encoder .*relative_attention_bias.weight is missing"):
        load_t5(incomplete, source="t5.safetensors")
    scaled = {**released_layout(reference_model), "encoder.block.0.layer.0.SelfAttention.q.scale_weight": torch.ones(())}
    with pytest.raises(CheckpointError, match="scaled fp8"):
        load_t5(scaled)
    assert t5_prefix(list(released_layout(reference_model))) == "" and t5_prefix(["x"]) is None


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_an_integer_weight_in_a_t5_file_is_refused_not_cast(reference_model, dtype):
    state = released_layout(reference_model)
    key = "encoder.block.0.layer.0.layer_norm.weight"
    state[key] = torch.ones_like(state[key], dtype=dtype)
    with pytest.raises(CheckpointError, match=rf"^t5.safetensors: does not match .*1 not floating point \(e.g. {key}"):
        load_t5(state, source="t5.safetensors")


def fake_pipeline(model, tokenizer, max_length):
    """The attributes the pipelines' `_get_t5_prompt_embeds` reads, without building a whole pipeline."""
    return SimpleNamespace(tokenizer_2=tokenizer, text_encoder_2=model, tokenizer_3=tokenizer, text_encoder_3=model,
                           text_encoder=model, tokenizer_max_length=max_length, _execution_device=torch.device("cpu"))


@pytest.mark.parametrize("length", [512, 256])
def test_flux_prompt_embeddings_equal_flux_pipeline_helper(tokenizer_dir, reference_model, length):
    reference_tokenizer = T5TokenizerFast.from_pretrained(str(tokenizer_dir))
    with torch.no_grad():  # as FluxPipeline.__call__ runs it
        expected = FluxPipeline._get_t5_prompt_embeds(fake_pipeline(reference_model, reference_tokenizer, 77), PROMPTS,
                                                      max_sequence_length=length)
    path = find_t5_tokenizer(None, tokenizer_dir.parent, "tokenizer_2")
    encoder = T5TextEncoder(load_t5(released_layout(reference_model)), load_t5_tokenizer(path), T5Padding(length))
    ours = encoder(PROMPTS)
    assert ours.shape == (3, length, 16)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_sd3_prompt_embeddings_equal_the_sd3_pipeline_helper(tokenizer_dir, reference_model):
    reference_tokenizer = T5TokenizerFast.from_pretrained(str(tokenizer_dir))
    with torch.no_grad():  # as StableDiffusion3Pipeline.__call__ runs it
        expected = StableDiffusion3Pipeline._get_t5_prompt_embeds(fake_pipeline(reference_model, reference_tokenizer, 77),
                                                                  PROMPTS, max_sequence_length=256)
    encoder = T5TextEncoder(load_t5(released_layout(reference_model)), load_t5_tokenizer(tokenizer_dir / "tokenizer.json"),
                            T5Padding(256))
    torch.testing.assert_close(encoder(PROMPTS), expected, rtol=0, atol=1e-6)


def test_tokens_match_transformers_t5_tokenizer_and_truncate_as_it_does(tokenizer_dir):
    ours = load_t5_tokenizer(tokenizer_dir / "tokenizer.json")
    reference = T5TokenizerFast.from_pretrained(str(tokenizer_dir))
    long_prompt = " ".join(["a red cat"] * 40)
    for prompt in PROMPTS + [long_prompt, "zebra!"]:
        assert _ids(ours, prompt) == _ids(reference, prompt)
    ids, _ = T5TextEncoder(None, ours, T5Padding(16)).tokenize([long_prompt])
    assert ids.shape == (1, 16) and ids[0, -1] == 1  # cut, and still ends in </s> as the references' rows do
    assert ids[0].tolist() == reference(long_prompt, truncation=True, max_length=16).input_ids


def test_reference_padding_of_77_keeps_long_prompts_whole(tokenizer_dir, reference_model):
    tokenizer = load_t5_tokenizer(tokenizer_dir / "tokenizer.json")
    encoder = T5TextEncoder(load_t5(released_layout(reference_model)), tokenizer, SD3_REFERENCE_PADDING)
    short, long_prompt = "a cat", " ".join(["the red dog"] * 40)
    ids, _ = encoder.tokenize([short])
    assert ids.shape == (1, 77) and ids[0].tolist() == _ids(tokenizer, short) + [0] * (77 - len(_ids(tokenizer, short)))
    long_ids = _ids(tokenizer, long_prompt)
    ids, _ = encoder.tokenize([short, long_prompt])
    assert ids.shape == (2, len(long_ids)) > (2, 77) and ids[1].tolist() == long_ids
    with torch.no_grad():
        expected = reference_model(input_ids=torch.tensor([long_ids])).last_hidden_state
    torch.testing.assert_close(encoder([long_prompt]), expected, rtol=0, atol=1e-6)


def test_masked_padding_equals_transformers_with_the_attention_mask(tokenizer_dir, reference_model):
    tokenizer = load_t5_tokenizer(tokenizer_dir / "tokenizer.json")
    encoder = T5TextEncoder(load_t5(released_layout(reference_model)), tokenizer, T5Padding(24, mask=True))
    ids, mask = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        expected = reference_model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(encoder(PROMPTS), expected, rtol=0, atol=1e-6)
    unmasked = T5TextEncoder(encoder.model, tokenizer, T5Padding(24))(PROMPTS)
    assert not torch.allclose(unmasked, expected)


def test_missing_tokenizer_is_one_line_usage_error_naming_what_is_missing(tmp_path, tokenizer_dir):
    with pytest.raises(UsageError, match=r"--tokenizer .*: no tokenizer.json there"):
        find_t5_tokenizer(tmp_path)
    with pytest.raises(UsageError, match=r"tokenizer_3 has no tokenizer.json: pass --tokenizer DIR"):
        find_t5_tokenizer(None, tmp_path, "tokenizer_3")
    with pytest.raises(UsageError, match="none was given"):
        find_t5_tokenizer(None)
    assert find_t5_tokenizer(tokenizer_dir) == tokenizer_dir / "tokenizer.json"
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable tokenizer.json"):
        load_t5_tokenizer(tmp_path / "tokenizer.json")


def test_a_diffusers_text_encoder_folder_in_shards_loads(tmp_path, tokenizer_dir, reference_model):
    """FLUX.1's text_encoder_2/ as transformers writes it: shards, no tied embed_tokens copy."""
    folder = tmp_path / "text_encoder_2"
    reference_model.save_pretrained(folder, max_shard_size="20KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    encoder = open_t5_encoder(t5_folder_state(folder), tokenizer_dir / "tokenizer.json", T5Padding(32), source=str(folder))
    ids, _ = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        expected = reference_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(encoder(PROMPTS), expected, rtol=0, atol=1e-6)
    with pytest.raises(UsageError, match="no .safetensors files"):
        t5_folder_state(tmp_path)


def test_full_size_t5_xxl_shapes_give_its_released_config():
    """T5 v1.1 XXL as FLUX.1 and SD3 ship it (google/t5-v1_1-xxl's config), built on the meta device."""
    xxl = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**xxl))
    weights = t5_weights({SD3_PREFIX + k: v for k, v in released_layout(model).items()})
    config = t5_config(weights)
    assert {k: getattr(config, k) for k in xxl if k != "feed_forward_proj"} == {k: v for k, v in xxl.items()
                                                                              if k != "feed_forward_proj"}
    assert config.gated
    assert sum(v.numel() for k, v in weights.items() if k != "encoder.embed_tokens.weight") == 4_762_310_656


def test_t5_tokens_drop_extra_whitespace_as_sentencepiece_and_the_pipelines_tokenizer(tokenizer_dir):
    ours, theirs = load_t5_tokenizer(tokenizer_dir / "tokenizer.json"), T5TokenizerFast.from_pretrained(str(tokenizer_dir))
    for prompt in ["a cat ", "  the dog\ton the  mat \n", "a red cat"]:
        assert _ids(ours, prompt) == _ids(theirs, prompt)


def test_t5_loads_and_encodes_without_importing_transformers(tmp_path, tokenizer_dir, reference_model):
    """A new interpreter, as a FLUX.1 or SD3 command starts: the T5 file and its tokenizer.json load and encode,
    and transformers stays unimported (it cost 2-4 s of start-up)."""
    import subprocess
    import sys
    import textwrap

    save_file(released_layout(reference_model), tmp_path / "t5.safetensors")
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from safetensors.torch import load_file
        from ldmtool.nets.t5 import T5Padding, open_t5_encoder

        encoder = open_t5_encoder(load_file({str(tmp_path / "t5.safetensors")!r}),
                                  Path({str(tokenizer_dir / "tokenizer.json")!r}), T5Padding(32))
        assert encoder(["a red cat"]).shape == (1, 32, 16)
        print("transformers" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
