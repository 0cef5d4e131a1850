"""The T5 v1.1 text encoder of FLUX.1 and SD3 (`nets.t5_model`, transformers' `T5EncoderModel` layout), and its
tokenizer.

Weights carry `transformers`' T5 key names, as the released `t5xxl_fp16.safetensors` (and its bf16 and fp8
`float8_e4m3fn` copies) holds them, or under `text_encoders.t5xxl.transformer.` in SD3 / SD3.5 single files.
The config comes from the shapes: width and vocabulary from `shared.weight`, depth from the block count,
heads and relative-position buckets from block 0's `relative_attention_bias`, head width from `q`, MLP width
and gating from `wi_0`/`wi_1` (v1.1, gated GELU) or `wi` (v1.0, ReLU). What no shape records is fixed as T5
fixes it (relative distance 128, norm epsilon 1e-6). Half and fp8 storage is upcast to the compute dtype on
load (fp8 has no CPU matmul, and T5 overflows in fp16).

The tokenizer is T5's SentencePiece vocabulary as a `tokenizer.json`, read by `tokenizers` (no sentencepiece
package, no transformers, no network), framed as transformers' fast T5 tokenizer frames it. It is not bundled:
the vocabulary is Apache-2.0 (google-research/text-to-text-transfer-transformer), but no package on the
registries this project installs from ships it as a data file, so it comes from the model's diffusers folder
(`tokenizer_2/` for FLUX.1, `tokenizer_3/` for SD3) or `--tokenizer DIR`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import torch

from ldmtool.errors import CheckpointError, UsageError
from ldmtool.nets.meta import meta_device
from ldmtool.nets.t5_model import T5Config, T5EncoderModel

if TYPE_CHECKING:
    from tokenizers import Tokenizer

SD3_PREFIX = "text_encoders.t5xxl.transformer."
TOKENIZER_FILE = "tokenizer.json"
PAD, EOS = "<pad>", "</s>"
_EMBED, _TIED = "shared.weight", "encoder.embed_tokens.weight"
_FINAL_NORM = "encoder.final_layer_norm.weight"
_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.")
_BIAS, _QUERY = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"
_MLP_IN = "encoder.block.0.layer.1.DenseReluDense.{}.weight"


@dataclass(frozen=True)
class T5Padding:
    """How prompts become token rows: padded to exactly `length` tokens, longer prompts cut (diffusers'
    pipelines and BFL's code: FLUX.1 dev 512, schnell 256, SD3 256), or with `truncate=False` padded to at
    least `length`, longer prompts kept whole (Stability's SD3 reference code, 77; that code also reads
    "(word:1.2)" weights, which this tokenizer leaves as text). `mask` hands the padding mask to attention;
    none of the references do, so padding tokens take part."""

    length: int
    truncate: bool = True
    mask: bool = False


FLUX_DEV_PADDING = T5Padding(512)
FLUX_SCHNELL_PADDING = T5Padding(256)
SD3_PADDING = T5Padding(256)  # StableDiffusion3Pipeline's max_sequence_length
SD3_REFERENCE_PADDING = T5Padding(77, truncate=False)  # sd3_infer.py's T5XXLTokenizer (min_length 77)


def t5_prefix(keys: Sequence[str]) -> Optional[str]:
    """The prefix under which a state dict holds a T5 encoder ('' for a bare file), or None if it holds none."""
    for prefix in ("", SD3_PREFIX):
        if prefix + _FINAL_NORM in keys and prefix + _EMBED in keys:
            return prefix
    return None


def t5_weights(state: Mapping[str, torch.Tensor], *, source: str = "text encoder") -> dict[str, torch.Tensor]:
    """The T5 encoder's tensors of a state dict, under transformers' names (prefix removed, the tied input
    embedding filled in); CheckpointError if the file holds no plain T5 encoder."""
    prefix = t5_prefix(list(state))
    if prefix is None:
        raise CheckpointError(f"{source}: holds no T5 encoder (no {_EMBED} and {_FINAL_NORM} keys)")
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if any(k.endswith(".scale_weight") for k in weights) or "scaled_fp8" in weights:
        raise CheckpointError(f"{source}: scaled fp8 T5 weights (scale_weight keys) are not supported; "
                              "use the plain fp16, bf16 or float8_e4m3fn file")
    missing = [k for k in (_BIAS, _QUERY) if k not in weights]
    if missing or not ({_MLP_IN.format("wi_0"), _MLP_IN.format("wi")} & set(weights)):
        raise CheckpointError(f"{source}: an incomplete T5 encoder ({(missing or [_MLP_IN.format('wi_0')])[0]} is missing)")
    weights.setdefault(_TIED, weights[_EMBED])
    return weights


def t5_config(weights: Mapping[str, torch.Tensor]) -> T5Config:
    """The config these weights (transformers' names, as `t5_weights` gives) were made with."""
    vocab, width = weights[_EMBED].shape
    buckets, heads = weights[_BIAS].shape
    gated = _MLP_IN.format("wi_0") in weights
    mlp = weights[_MLP_IN.format("wi_0" if gated else "wi")].shape[0]
    depth = 1 + max(int(m.group(1)) for m in map(_BLOCK.match, weights) if m)
    return T5Config(
        vocab_size=vocab, d_model=width, d_kv=weights[_QUERY].shape[0] // heads,
        d_ff=mlp, num_layers=depth, num_heads=heads, relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128, gated=gated, layer_norm_epsilon=1e-6,
    )


def load_t5(state: Mapping[str, torch.Tensor], *, source: str = "text encoder", dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> T5EncoderModel:
    """A T5EncoderModel built from the shapes of `state` (bare or SD3-prefixed keys) and loaded strictly,
    every tensor in `dtype` (fp16 / bf16 / fp8 storage upcast), in eval mode without gradients."""
    from ldmtool.checkpoints.weights import check_state_dict  # the layer above nets: imported when loading

    weights = t5_weights(state, source=source)
    with meta_device():
        model = T5EncoderModel(t5_config(weights))
    model_state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in model_state.items()}
    check_state_dict(expected, weights, source=source, family="T5 encoder",
                     floating=[k for k, v in model_state.items() if v.is_floating_point()])
    converted = {k: v.to(device=device, dtype=dtype) for k, v in weights.items() if k != _TIED}
    converted[_TIED] = converted[_EMBED]  # one table, as transformers ties them
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def t5_folder_state(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a diffusers model's T5 folder (`text_encoder_2/` for FLUX.1, `text_encoder_3/` for SD3):
    `model.safetensors` or its shards, merged."""
    from ldmtool.checkpoints.files import read_safetensors_folder  # the layer above nets: imported when reading

    state = read_safetensors_folder(folder)
    if not state:
        raise UsageError(f"{folder}: no .safetensors files (a diffusers T5 folder holds model.safetensors or its shards)")
    return state


# --- tokenizer ---------------------------------------------------------------------------------------------


def find_t5_tokenizer(tokenizer: Optional[Path], model_folder: Optional[Path] = None,
                      subfolder: str = "tokenizer_2") -> Path:
    """The `tokenizer.json` to use: in `--tokenizer DIR` (or that file itself) when given, else in the
    diffusers model folder's `subfolder`; UsageError naming what is missing."""
    if tokenizer is not None:
        found = tokenizer if tokenizer.is_file() else tokenizer / TOKENIZER_FILE
        if not found.is_file():
            raise UsageError(f"--tokenizer {tokenizer}: no {TOKENIZER_FILE} there (T5's tokenizer as diffusers "
                             f"folders ship it, e.g. a FLUX.1 folder's tokenizer_2/{TOKENIZER_FILE})")
        return found
    if model_folder is not None and (model_folder / subfolder / TOKENIZER_FILE).is_file():
        return model_folder / subfolder / TOKENIZER_FILE
    where = f"{model_folder / subfolder} has no {TOKENIZER_FILE}" if model_folder is not None else "none was given"
    raise UsageError(f"the T5 text encoder needs its tokenizer and {where}: pass --tokenizer DIR "
                     f"(a folder with T5's {TOKENIZER_FILE}, such as a diffusers FLUX.1 folder's tokenizer_2/)")


def load_t5_tokenizer(path: Path) -> "Tokenizer":
    """T5's tokenizer from a `tokenizer.json` (its own post-processor appends </s>)."""
    from tokenizers import Tokenizer, pre_tokenizers

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises its own exception types for a malformed file
        raise CheckpointError(f"{path}: not a readable {TOKENIZER_FILE} ({err})") from None
    if tokenizer.token_to_id(PAD) != 0 or tokenizer.token_to_id(EOS) != 1:
        raise CheckpointError(f"{path}: not T5's tokenizer (T5 has {PAD} = 0 and {EOS} = 1)")
    # SentencePiece drops extra whitespace, trailing spaces included (BFL's slow T5Tokenizer, and transformers 5's
    # T5TokenizerFast, which diffusers uses, splits on whitespace first); the file's own Metaspace alone would
    # turn a trailing space into a "▁" token.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    return tokenizer


# --- the encoder ---------------------------------------------------------------------------------------------


class T5TextEncoder:
    """Prompts -> T5 hidden states (B, L, width), padded as `padding` says (the references' lengths)."""

    def __init__(self, model: T5EncoderModel, tokenizer: "Tokenizer", padding: T5Padding):
        self.model, self.tokenizer, self.padding = model, tokenizer, padding

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (B, L), the prompt's tokens and </s>, then padding (<pad>, id 0)."""
        if self.padding.truncate:  # the prompt's tokens cut so that they and </s> fit, as transformers cuts them
            self.tokenizer.enable_truncation(self.padding.length)
        else:
            self.tokenizer.no_truncation()
        rows = [encoding.ids for encoding in self.tokenizer.encode_batch(list(prompts))]
        width = self.padding.length if self.padding.truncate else max([self.padding.length, *map(len, rows)])
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        return ids, mask

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        ids, mask = self.tokenize(prompts)
        device = self.model.shared.weight.device
        mask_in = mask.to(device) if self.padding.mask else None
        return self.model(ids.to(device), attention_mask=mask_in).last_hidden_state

    __call__ = encode


def open_t5_encoder(weights: Mapping[str, torch.Tensor], tokenizer_file: Path, padding: T5Padding, *,
                    source: str = "text encoder", dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> T5TextEncoder:
    """A ready `T5TextEncoder` from a state dict (a `--text-encoder` file's, an SD3 file's, or
    `t5_folder_state`'s) and the `tokenizer.json` that `find_t5_tokenizer` found."""
    return T5TextEncoder(load_t5(weights, source=source, dtype=dtype, device=device), load_t5_tokenizer(tokenizer_file),
                         padding)
