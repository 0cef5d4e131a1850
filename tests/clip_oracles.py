"""transformers' CLIP tokenizer on ldmtool's bundled vocabulary: the test-only oracle for `nets.tokenizers`
and the tokenizer that diffusers pipelines in the tests are given (ldmtool itself no longer uses it)."""
from __future__ import annotations

from typing import Any

from ldmtool.nets.tokenizers import CLIP_EOS, CLIP_MAX_LENGTH, clip_vocab_and_merges


def transformers_clip_tokenizer(pad_with_zero: bool = False) -> Any:
    """A fresh `transformers.CLIPTokenizer` (diffusers adds tokens to the ones it is given). With `pad_with_zero`
    its pad token is `!` (id 0), as SD 2.x / SDXL diffusers folders set it, which also makes it read every `!`
    in a text as padding (diffusers issue 4153); open_clip and ldmtool do not."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token="!" if pad_with_zero else CLIP_EOS)
    tok.model_max_length = CLIP_MAX_LENGTH
    return tok
