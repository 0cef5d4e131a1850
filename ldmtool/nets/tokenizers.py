"""Bundled tokenizers, with no network access (DESIGN.md §3).

- CLIP BPE (SD 1.x / 2.x, SDXL, SD3, FLUX.1): the merges file `bpe_simple_vocab_16e6.txt.gz` as shipped by
  OpenAI CLIP and open_clip; the 49408-entry vocabulary is rebuilt from it the way CLIP does (bytes,
  bytes + '</w>', merges, then the two special tokens), in the `tokenizers` pipeline of transformers'
  `CLIPTokenizer`, made here directly (no transformers import).
- BERT uncased WordPiece (LDM text2img / txt2img-1p4B, the shipped txt2img default): the 30522-entry
  bert-base-uncased vocabulary, in the `tokenizers` pipeline that transformers' `BertTokenizer` builds
  (normaliser, pre-tokeniser, WordPiece, special tokens), made here directly: a command then skips importing
  transformers, 0.9 s of the default txt2img's start-up. `tests/test_encoders.py` compares the two.
Data files and their licences (LICENSES.md) live in ldmtool/assets/tokenizers/.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from tokenizers import Tokenizer

CLIP_MERGES_FILE = "clip_bpe_simple_vocab_16e6.txt.gz"
BERT_VOCAB_FILE = "bert_uncased_vocab.txt.gz"
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def _read_gz_lines(name: str) -> list[str]:
    data = resources.files("ldmtool.assets").joinpath("tokenizers").joinpath(name).read_bytes()  # one name a call before 3.11
    return gzip.decompress(data).decode("utf-8").splitlines()


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable character table (the first 256 vocabulary entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in sorted(printable) + [b for b in range(256) if b not in printable]]


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP vocabulary (token -> id) and its BPE merges, built from the bundled merges file."""
    lines = _read_gz_lines(CLIP_MERGES_FILE)
    n_merges = CLIP_VOCAB_SIZE - 256 - 256 - 2
    merges = [cast("tuple[str, str]", tuple(line.split())) for line in lines[1 : 1 + n_merges]]  # "a b" lines
    base = _bytes_to_unicode()
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


# CLIP's word pattern (its special tokens, English contractions, letter runs, single digits, other symbol runs)
CLIP_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@lru_cache(maxsize=1)
def clip_bpe() -> "Tokenizer":
    """CLIP's byte-level BPE as transformers' `CLIPTokenizer` builds it (NFC, whitespace runs to one space, lower
    case; CLIP's word pattern; byte-level; merges with `</w>` ending each word; the two special tokens matched in
    the text as written), without the start/end frame: `clip_ids` adds that."""
    from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = clip_vocab_and_merges()
    tok = Tokenizer(BPE(dict(vocab), list(merges), dropout=None, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=CLIP_EOS))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in (CLIP_BOS, CLIP_EOS)])
    return tok


def clip_text_ids(text: str) -> list[int]:
    """The token ids of a text, no frame, no length limit."""
    return list(clip_bpe().encode(text, add_special_tokens=False).ids)


def clip_token_id(token: str) -> int:
    """The id of one vocabulary entry (e.g. ",</w>")."""
    found = clip_bpe().token_to_id(token)
    if found is None:
        raise RuntimeError(f"internal: {token!r} is not in the bundled CLIP vocabulary")
    return found


def clip_ids(texts: list[str], *, pad_with_zero: bool = False, length: int = CLIP_MAX_LENGTH) -> list[list[int]]:
    """<|startoftext|> text <|endoftext|> per text, the text cut to fit `length`, then padding up to `length`:
    with <|endoftext|> (SD 1.x, CLIP-L) or, with `pad_with_zero`, with id 0 (`!`: what `open_clip.tokenize`
    writes for SD 2.x and SDXL's bigG, and the SD3 reference for its bigG). A `!` in the text stays `!</w>`."""
    bos, eos = clip_token_id(CLIP_BOS), clip_token_id(CLIP_EOS)
    return _framed(clip_bpe(), texts, (bos, eos, 0 if pad_with_zero else eos), length)


def _framed(tok: "Tokenizer", texts: list[str], frame: tuple[int, int, int], length: int) -> list[list[int]]:
    """Per text: the start id, its ids cut so that the row fits `length`, the end id, then the pad id up to
    `length` (`frame` = (start, end, pad)), as transformers' tokenizers frame, truncate and pad."""
    start, end, pad = frame
    rows = []
    for encoding in tok.encode_batch(texts, add_special_tokens=False):
        ids = [start, *encoding.ids[: max(length - 2, 0)], end]
        rows.append(ids + [pad] * (length - len(ids)))
    return rows


BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@lru_cache(maxsize=1)
def bert_tokenizer() -> "Tokenizer":
    """bert-base-uncased WordPiece, as `BERTTokenizer` of the LDM code uses it: lower-cased, accents stripped,
    CJK characters and punctuation split off, the five special tokens matched in the text as written."""
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    vocab = {tok: i for i, tok in enumerate(_read_gz_lines(BERT_VOCAB_FILE))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in BERT_SPECIALS])
    return tok


def bert_ids(texts: list[str], length: int) -> list[list[int]]:
    """[CLS] text [SEP] per text, the text cut to fit `length`, then [PAD] (id 0) up to `length`: what
    transformers' `BertTokenizer(texts, truncation=True, max_length=length, padding="max_length")` gives."""
    tok = bert_tokenizer()
    cls, sep, pad = (_special_id(tok, name) for name in ("[CLS]", "[SEP]", "[PAD]"))
    return _framed(tok, texts, (cls, sep, pad), length)


def _special_id(tok: "Tokenizer", name: str) -> int:
    found = tok.token_to_id(name)
    if found is None:
        raise RuntimeError(f"internal: {name} is not in the bundled BERT vocabulary")
    return found
