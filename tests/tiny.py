"""The one place tests get tiny models and tokenizers: built from config, never downloaded.

Tokenizers come from ``../shared/data/tokenizers`` (LLaMA-2 SentencePiece and GPT-2 BPE); models are
random-weight configs small enough to train for a few steps on CPU.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    LlamaTokenizer,
    PreTrainedTokenizerBase,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@functools.lru_cache(maxsize=None)
def _load_tokenizer(kind: str) -> PreTrainedTokenizerBase:
    if kind == "llama":
        tok = LlamaTokenizer.from_pretrained(str(SHARED_DATA / "tokenizers" / "llama2"))
        tok.pad_token = tok.unk_token
    elif kind == "gpt2":
        tok = AutoTokenizer.from_pretrained(str(SHARED_DATA / "tokenizers" / "gpt2"))
        tok.pad_token = tok.eos_token
    else:
        raise ValueError(kind)
    return tok


def tokenizer(kind: str = "llama") -> PreTrainedTokenizerBase:
    """A fresh copy each call (tests may mutate templates / padding side)."""
    import copy

    return copy.deepcopy(_load_tokenizer(kind))


def llama_config(vocab_size: int = 32000, **overrides) -> LlamaConfig:
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def gpt_neox_config(vocab_size: int = 50257, **overrides) -> GPTNeoXConfig:
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.25,
        bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    kw.update(overrides)
    return GPTNeoXConfig(**kw)


def gpt2_config(vocab_size: int = 50257, **overrides) -> GPT2Config:
    kw = dict(
        vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
    )
    kw.update(overrides)
    return GPT2Config(**kw)


FAMILY_BUILDERS = {
    "llama": (llama_config, "llama"),
    "gpt_neox": (gpt_neox_config, "gpt2"),
    "gpt2": (gpt2_config, "gpt2"),
}


def save_tiny_model(family: str, path: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Write a random-weight tiny causal LM plus its tokenizer as a ``save_pretrained`` dir."""
    from transformers import AutoModelForCausalLM

    make_config, tok_kind = FAMILY_BUILDERS[family]
    path = Path(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(**config_overrides))
    model.save_pretrained(path)
    tokenizer(tok_kind).save_pretrained(path)
    return path
