"""SD3 / SD3.5 and FLUX.1 text conditioning (issue 24) against diffusers 0.42.1's StableDiffusion3Pipeline and
FluxPipeline `encode_prompt` (test-only oracles), on tiny random CLIP-L, bigG and T5 towers built here with
transformers, written in the released layouts; recognition of each encoder file by its keys."""
import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from ldmtool.errors import CheckpointError, UsageError
from ldmtool.nets.clip_text import clip_config, clip_weights, load_clip, text_encoder_kind, text_encoders_in
from ldmtool.nets.t5 import FLUX_SCHNELL_PADDING, T5Padding
from ldmtool.nets.text3 import (
    MissingT5,
    TextEncoders,
    flux_text_conditioning,
    open_text_encoders,
    sd3_text_conditioning,
    text_encoder_sources,
)
from ldmtool.nets.tokenizers import clip_vocab_and_merges
from test_t5 import tokenizer_dir  # noqa: F401  (the tiny T5 tokenizer.json fixture)

PROMPTS = ["a photo of a red cat", "", "the dog on the mat, " * 20]  # the last: cut at 77 CLIP tokens; trailing space
NEGATIVES = ["a dog", "blurry", ""]
T5_WIDTH = 200  # wider than the CLIP tokens (64 + 128), as T5 XXL's 4096 is wider than 768 + 1280
T5_LENGTH = 24  # the pipelines' max_sequence_length, short to keep the test quick


def _clip_config(width: int, act: str, pad: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, projection_dim=width,
                          num_hidden_layers=3, num_attention_heads=width // 64, max_position_embeddings=77,
                          hidden_act=act, bos_token_id=49406, eos_token_id=49407, pad_token_id=pad)


def _rounded(model: torch.nn.Module) -> torch.nn.Module:
    """Weights that fp16 stores exactly, so files of either precision hold the same values."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


@pytest.fixture(scope="module")
def towers():
    """The reference towers: CLIP-L with an identity projection (as diffusers loads it from SD3 files), bigG
    with a random one, and T5."""
    torch.manual_seed(0)
    clip_l = _rounded(CLIPTextModelWithProjection(_clip_config(64, "quick_gelu", 49407)))
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(64))
    clip_g = _rounded(CLIPTextModelWithProjection(_clip_config(128, "gelu", 0)))
    t5 = _rounded(T5EncoderModel(T5Config(vocab_size=48, d_model=T5_WIDTH, d_kv=8, d_ff=48, num_layers=2, num_heads=2,
                                          relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                          dropout_rate=0.0)))
    return {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5}


def _released(kind: str, model: torch.nn.Module, prefix: str = "", storage=torch.float32) -> dict:
    """The state dict as the released files store it: CLIP-L of SD3 files without `text_projection`, T5 without
    the tied `encoder.embed_tokens` copy."""
    state = model.state_dict()
    dropped = {"clip_l": "text_projection.weight", "t5xxl": "encoder.embed_tokens.weight"}.get(kind)
    return {prefix + k: v.to(storage) for k, v in state.items() if k != dropped}


def _sd3_single_file(towers, storage=torch.float16) -> dict:
    state = {"model.diffusion_model.pos_embed": torch.zeros(1, 4, 8), "first_stage_model.decoder.conv_out.bias": torch.zeros(3)}
    for kind, model in towers.items():
        state.update(_released(kind, model, f"text_encoders.{kind}.transformer.", storage))
    return state


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
    """CLIP's vocabulary as a tokenizer folder for transformers' CLIPTokenizer (the diffusers side)."""
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def _clip_tokenizer(folder, pad: str) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(folder), pad_token=pad, model_max_length=77)


@pytest.fixture(scope="module")
def sd3_encoders(towers, tokenizer_dir, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("sd3") / "sd3.5_medium.safetensors"
    save_file(_sd3_single_file(towers), path)
    return open_text_encoders([(path.name, load_file(path))], t5_tokenizer=tokenizer_dir / "tokenizer.json",
                              t5_padding=T5Padding(T5_LENGTH))


def _sd3_pipeline(towers, clip_tokenizer_dir, t5_tokenizer_dir, with_t5: bool = True):
    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=towers["clip_l"], tokenizer=_clip_tokenizer(clip_tokenizer_dir, "<|endoftext|>"),
        text_encoder_2=towers["clip_g"], tokenizer_2=_clip_tokenizer(clip_tokenizer_dir, "!"),
        text_encoder_3=towers["t5xxl"] if with_t5 else None,
        tokenizer_3=T5TokenizerFast.from_pretrained(str(t5_tokenizer_dir)) if with_t5 else None)
    return pipe


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_sd3_conditioning_equals_the_sd3_pipeline(towers, sd3_encoders, clip_tokenizer_dir, tokenizer_dir,  # noqa: F811
                                                 clip_skip):
    pipe = _sd3_pipeline(towers, clip_tokenizer_dir, tokenizer_dir)
    with torch.no_grad():
        context, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPTS, None, None, device=torch.device("cpu"), negative_prompt=NEGATIVES, clip_skip=clip_skip,
            max_sequence_length=T5_LENGTH)
    ours = sd3_text_conditioning(sd3_encoders, PROMPTS, NEGATIVES, clip_skip=clip_skip)
    assert ours.context.shape == (3, 77 + T5_LENGTH, T5_WIDTH) and ours.pooled.shape == (3, 64 + 128)
    for mine, theirs in [(ours.context, context), (ours.pooled, pooled), (ours.negative_context, negative),
                         (ours.negative_pooled, negative_pooled)]:
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


def test_sd3_empty_negative_prompts_and_no_guidance(towers, sd3_encoders, clip_tokenizer_dir, tokenizer_dir):  # noqa: F811
    pipe = _sd3_pipeline(towers, clip_tokenizer_dir, tokenizer_dir)
    with torch.no_grad():
        _, negative, _, negative_pooled = pipe.encode_prompt(PROMPTS[:2], None, None, device=torch.device("cpu"),
                                                             max_sequence_length=T5_LENGTH)
    ours = sd3_text_conditioning(sd3_encoders, PROMPTS[:2])
    torch.testing.assert_close(ours.negative_context, negative, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.negative_pooled, negative_pooled, rtol=0, atol=1e-5)
    unguided = sd3_text_conditioning(sd3_encoders, PROMPTS[:2], guidance=False)
    assert unguided.negative_context is None and unguided.negative_pooled is None
    torch.testing.assert_close(unguided.context, ours.context, rtol=0, atol=0)
    with pytest.raises(UsageError, match="^1 negative prompts for 2 prompts"):
        sd3_text_conditioning(sd3_encoders, PROMPTS[:2], ["x"])


def test_sd3_without_t5_equals_the_pipeline_zeros_or_drops_the_t5_tokens(towers, sd3_encoders, clip_tokenizer_dir,
                                                                       tokenizer_dir):  # noqa: F811
    pipe = _sd3_pipeline(towers, clip_tokenizer_dir, tokenizer_dir, with_t5=False)
    pipe.transformer = type("Transformer", (), {"config": type("Config", (), {"joint_attention_dim": T5_WIDTH})})()
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device=torch.device("cpu"),
                                                   do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH)
    without_t5 = TextEncoders(clip_l=sd3_encoders.clip_l, clip_g=sd3_encoders.clip_g)
    ours = sd3_text_conditioning(without_t5, PROMPTS, guidance=False, t5_length=T5_LENGTH, context_width=T5_WIDTH)
    torch.testing.assert_close(ours.context, context, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=1e-5)
    dropped = sd3_text_conditioning(without_t5, PROMPTS, guidance=False, missing_t5=MissingT5.DROP,
                                    context_width=T5_WIDTH)
    torch.testing.assert_close(dropped.context, context[:, :77], rtol=0, atol=0)


@pytest.mark.parametrize("length", [T5_LENGTH, FLUX_SCHNELL_PADDING.length])
def test_flux_conditioning_equals_the_flux_pipeline(towers, clip_tokenizer_dir, tokenizer_dir, tmp_path, length):  # noqa: F811
    clip_l = CLIPTextModel(towers["clip_l"].config).eval()  # FluxPipeline's CLIP-L has no projection
    clip_l.load_state_dict({k.removeprefix("text_model."): v for k, v in towers["clip_l"].state_dict().items()
                            if k != "text_projection.weight"})
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=clip_l,
                        tokenizer=_clip_tokenizer(clip_tokenizer_dir, "<|endoftext|>"), text_encoder_2=towers["t5xxl"],
                        tokenizer_2=T5TokenizerFast.from_pretrained(str(tokenizer_dir)), transformer=None)
    with torch.no_grad():
        txt, y, txt_ids = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), max_sequence_length=length)
    # ComfyUI's standalone files: clip_l.safetensors with a projection (which the pooled output skips), t5xxl_fp16
    clip_file = {k: v.half() for k, v in towers["clip_l"].state_dict().items()}
    clip_file["text_projection.weight"] = torch.randn(64, 64).half()
    t5_file = _released("t5xxl", towers["t5xxl"], storage=torch.float16)
    encoders = open_text_encoders([("clip_l.safetensors", clip_file), ("t5xxl_fp16.safetensors", t5_file)],
                                  t5_tokenizer=tokenizer_dir / "tokenizer.json", t5_padding=T5Padding(length))
    ours = flux_text_conditioning(encoders, PROMPTS)
    torch.testing.assert_close(ours.y, y, rtol=0, atol=1e-5)
    assert ours.txt.shape == (3, length, T5_WIDTH) and ours.txt_ids.shape == (3, length, 3)
    torch.testing.assert_close(ours.txt, txt, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.txt_ids[0], txt_ids, rtol=0, atol=0)


def test_standalone_files_and_diffusers_folders_give_the_single_files_encoders(towers, sd3_encoders, tokenizer_dir,  # noqa: F811
                                                                               tmp_path):
    save_file(_released("clip_l", towers["clip_l"], storage=torch.float16), tmp_path / "clip_l.safetensors")
    (tmp_path / "text_encoder_2").mkdir()
    save_file(_released("clip_g", towers["clip_g"], storage=torch.float16), tmp_path / "text_encoder_2" / "model.safetensors")
    (tmp_path / "text_encoder_3").mkdir()
    t5 = _released("t5xxl", towers["t5xxl"], storage=torch.float16)
    for shard, keys in enumerate([sorted(t5)[::2], sorted(t5)[1::2]]):
        save_file({k: t5[k] for k in keys}, tmp_path / "text_encoder_3" / f"model-0000{shard + 1}-of-00002.safetensors")
    paths = [tmp_path / "clip_l.safetensors", tmp_path / "text_encoder_2", tmp_path / "text_encoder_3"]
    encoders = open_text_encoders(text_encoder_sources(paths), t5_tokenizer=tokenizer_dir / "tokenizer.json",
                                  t5_padding=T5Padding(T5_LENGTH))
    ours, single_file = sd3_text_conditioning(encoders, PROMPTS[:2]), sd3_text_conditioning(sd3_encoders, PROMPTS[:2])
    torch.testing.assert_close(ours.context, single_file.context, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, single_file.pooled, rtol=0, atol=0)
    with pytest.raises(UsageError, match=r"clip_g.safetensors: no such checkpoint file"):
        text_encoder_sources([tmp_path / "clip_g.safetensors"])


def _full_size_shapes(kind: str) -> dict:
    """Key -> shape of the released towers (openai/clip-vit-large-patch14, OpenCLIP ViT-bigG-14, T5 v1.1 XXL),
    built on the meta device."""
    with torch.device("meta"):
        if kind == "t5xxl":
            model = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                            num_heads=64, feed_forward_proj="gated-gelu"))
        else:
            width, layers = (768, 12) if kind == "clip_l" else (1280, 32)
            model = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=width, num_hidden_layers=layers,
                                                               intermediate_size=4 * width, projection_dim=width,
                                                               num_attention_heads=width // 64))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["clip_l", "clip_g", "t5xxl"])
def test_full_size_encoder_files_are_recognised_by_their_keys(kind):
    shapes = _full_size_shapes(kind)
    assert text_encoder_kind(shapes) == kind
    assert text_encoder_kind({f"text_encoders.{kind}.transformer.{k}": s for k, s in shapes.items()}) == kind
    if kind != "t5xxl":  # the config read from the shapes is the released tower's
        weights = clip_weights({k: torch.empty(s, device="meta") for k, s in shapes.items()})
        config = clip_config(weights, kind)
        expected = {"clip_l": (768, 12, 12, 3072, "quick_gelu"), "clip_g": (1280, 32, 20, 5120, "gelu")}[kind]
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
                config.hidden_act) == expected


def test_a_single_file_splits_into_its_encoders_and_reduced_widths_are_read_from_prefix_or_width(towers):
    parts = text_encoders_in(_sd3_single_file(towers), source="sd3.safetensors")
    assert sorted(parts) == ["clip_g", "clip_l", "t5xxl"]
    # bare reduced-width files: below 1024 wide is CLIP-L, above bigG, unless a prefix says otherwise
    assert text_encoder_kind({k: v.shape for k, v in _released("clip_g", towers["clip_g"]).items()}) == "clip_l"
    assert list(text_encoders_in(_released("t5xxl", towers["t5xxl"]), source="t5.safetensors")) == ["t5xxl"]
    with pytest.raises(CheckpointError, match=r"^vae.safetensors: holds no text encoder"):
        text_encoders_in({"decoder.conv_out.weight": torch.zeros(3, 4, 3, 3)}, source="vae.safetensors")


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_clip_files_in_half_and_fp8_storage_load_upcast_and_match_transformers(towers, storage):
    stored = _released("clip_g", towers["clip_g"], "text_encoders.clip_g.transformer.", storage)
    model = load_clip(stored, source="sd3.safetensors")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    oracle = CLIPTextModelWithProjection(towers["clip_g"].config).eval()
    oracle.load_state_dict({k: v.to(storage).float() for k, v in towers["clip_g"].state_dict().items()})
    ids = torch.tensor([[49406, 320, 1125, 49407, 0, 0]])
    with torch.no_grad():
        ours = model.text_projection(model.text_model(ids).pooler_output)
        torch.testing.assert_close(ours, oracle(input_ids=ids).text_embeds, rtol=0, atol=1e-6)


def test_missing_encoders_tokenizers_and_bad_files_are_one_line_errors(towers, sd3_encoders):
    with pytest.raises(UsageError, match=r"^SD3 needs the OpenCLIP bigG text encoder .* pass --text-encoder FILE"):
        sd3_text_conditioning(TextEncoders(clip_l=sd3_encoders.clip_l, t5=sd3_encoders.t5), ["x"])
    with pytest.raises(UsageError, match=r"^FLUX.1 needs the CLIP-L text encoder"):
        flux_text_conditioning(TextEncoders(), ["x"])
    with pytest.raises(UsageError, match=r"^clip skip 2 \(layers before the penultimate\): the CLIP-L text encoder has 3 layers, so it takes 0 to 1$"):
        sd3_text_conditioning(sd3_encoders, ["x"], clip_skip=2)
    t5_file = ("t5xxl_fp16.safetensors", _released("t5xxl", towers["t5xxl"]))
    with pytest.raises(UsageError, match=r"^t5xxl_fp16.safetensors: its T5 text encoder needs T5's tokenizer: pass "
                                         "--tokenizer DIR"):
        open_text_encoders([t5_file])
    clip_file = ("a.safetensors", _released("clip_l", towers["clip_l"]))
    with pytest.raises(UsageError, match=r"^b.safetensors: a second CLIP-L text encoder \(the first is in a.safetensors"):
        open_text_encoders([clip_file, ("b.safetensors", clip_file[1])])
    broken = dict(clip_file[1])
    broken["text_model.encoder.layers.1.mlp.fc2.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"^clip.safetensors: does not match the CLIP-L text encoder") as err:
        load_clip(broken, source="clip.safetensors")
    assert "\n" not in str(err.value)
    integer = dict(clip_file[1])
    integer["text_model.final_layer_norm.weight"] = torch.ones(64, dtype=torch.int32)
    with pytest.raises(CheckpointError, match=r"^clip.safetensors: does not match .*1 not floating point \(e.g. "
                                              r"text_model.final_layer_norm.weight: int32\)"):
        load_clip(integer, source="clip.safetensors")



def test_sd3_towers_pad_as_the_reference_and_keep_a_prompts_exclamation_marks(sd3_encoders):
    """CLIP-L pads with <|endoftext|>, bigG with id 0 (the SD3 reference's SDXLClipGTokenizer pads with 0 by hand),
    and both read `!` as "!</w>" (256), as open_clip does; diffusers' tokenizer_2 with `!` as its pad token reads it
    as padding (diffusers issue 4153)."""
    clip_l, clip_g = sd3_encoders.clip_l.tokenize(["hello!"])[0], sd3_encoders.clip_g.tokenize(["hello!"])[0]
    assert clip_l[:4].tolist() == clip_g[:4].tolist() == [49406, 3306, 256, 49407]
    assert clip_l[4:].eq(49407).all() and clip_g[4:].eq(0).all() and len(clip_g) == 77
