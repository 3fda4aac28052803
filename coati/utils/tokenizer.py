"""Tokenizer loading with the padding rule every stage shares."""
from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..errors import missing_path


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` plus a pad token when the model has none (unk if it exists, else eos).

    Padding is always masked by the attention mask, so the pad id only has to exist; prompts are
    left-padded for generation by the prompt collator, never by changing ``padding_side`` globally.
    """
    with missing_path(path, "tokenizer / model"):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok
