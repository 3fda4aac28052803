"""The one place tests get tiny models and tokenizers: built in-process, never downloaded.

Tokenizers are trained here, once per machine (cached in the temp dir, keyed by this file and the library
versions), so a fresh clone needs nothing beside it:

* ``"llama"``: a SentencePiece BPE model with byte fallback, laid out like LLaMA-2's (``<unk>`` 0, ``<s>`` 1,
  ``</s>`` 2, byte pieces ``<0x00>``..``<0xFF>`` at 3..258, 32000 pieces, digits split, a ``▁`` word
  prefix, newline only as a byte), loaded the way LLaMA checkpoints are (``LlamaTokenizer`` on the folder);
  pad = unk.
* ``"gpt2"``: a byte-level BPE laid out like GPT-2's (50257 tokens, ``<|endoftext|>`` = 50256 is BOS, EOS
  and unk); pad = EOS.

Models are random-weight configs small enough to train for a few steps on CPU. ``SHARED_DATA`` is the
real data beside the repository (see ``tests/conftest.py`` for the tier of tests that need it).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    T5Config,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

LLAMA_VOCAB = 32000
GPT2_VOCAB = 50257

# Text the tokenizers learn their common pieces from (repeated so its merges come first), in the registers
# the tests use: instructions and answers, chat roles, arithmetic, prose.
_TEXT = """\
Below is an instruction that describes a task. Write a response that appropriately completes the request.
Below is an instruction that describes a task, paired with an input that provides further context.
### Instruction:
### Input:
### Response:
<|im_start|>system You are a helpful assistant.<|im_end|>
<|im_start|>user What is the capital of France?<|im_end|>
<|im_start|>assistant Paris is the capital of France.<|im_end|>
Human: Hi! Assistant: Hello, how can I help you today?
Name the capital of France. Paris is the capital. And of Italy? Rome is the capital of Italy.
Translate to French: cat. The answer is chat. Tell me a fact about the moon. The Moon is made of rock.
What is 12+7? The answer is 19. What is 2+3? 5. Times 4? 20. Add 2 and 3. Subtract 8 from 15.
The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat.
Largest planet? Jupiter. Name a color. Blue. Another one? Green. I am not sure.
Write a short story about a robot who learns to paint. Give three tips for staying healthy.
Explain why the sky is blue. Summarize the following paragraph in one sentence.
Rewrite this sentence in the passive voice. List five fruits that are red. Describe a sunny day.
The model reads the prompt and writes a response, one token at a time, until it emits the end token.
Training lowers the loss on held-out data; the reward model scores chosen answers above rejected ones.
apple river stone cloud maple orbit velvet harbor candle meadow piano lantern quartz tiger ember willow
Once upon a time there was a little town by the sea, where people fished, sang and told stories.
Hello world! Good morning. Thank you very much. Yes, of course. No, I do not think so.
"""
_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
_LETTER_WEIGHTS = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1.5, 1, 0.8, 0.2, 0.2, 0.1, 0.1]


def _corpus() -> list[str]:
    """Deterministic training lines: the text above, then seeded pseudo-words that fill the vocabulary's
    tail (a real 32k / 50k vocabulary, so random-weight models emit decodable tokens)."""
    rng = random.Random(0)
    words = ["".join(rng.choices(_LETTERS, _LETTER_WEIGHTS, k=rng.randint(2, 9))) for _ in range(120_000)]
    filler = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    return _TEXT.splitlines() * 20 + filler


_LLAMA_RECIPE = dict(  # SentencePiece settings of LLaMA-2's tokenizer.model
    model_type="bpe", vocab_size=LLAMA_VOCAB, byte_fallback=True, split_digits=True,
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
    allow_whitespace_only_pieces=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    max_sentence_length=100_000, num_threads=1,
)


def _train_llama(folder: Path) -> PreTrainedTokenizerBase:
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_writer=model, minloglevel=2,
                                   **_LLAMA_RECIPE)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    # the folder, not LlamaTokenizer(vocab_file=...): transformers 5 silently builds a 3-token vocab from that
    tok = LlamaTokenizer.from_pretrained(str(folder))
    tok.pad_token = tok.unk_token
    return tok


def _train_gpt2(folder: Path) -> PreTrainedTokenizerBase:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=GPT2_VOCAB - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer)
    bpe.model.save(str(folder))  # vocab.json + merges.txt, as GPT-2 ships them
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    tok.pad_token = tok.eos_token
    return tok


_BUILDERS: dict[str, Callable[[Path], PreTrainedTokenizerBase]] = {"llama": _train_llama, "gpt2": _train_gpt2}
_CHECKS = {  # the layout tests rely on; a library change that breaks it fails here, not in a distant test
    "llama": lambda t: (len(t), t.unk_token_id, t.bos_token_id, t.eos_token_id, t.pad_token_id,
                        t.convert_ids_to_tokens(58)) == (LLAMA_VOCAB, 0, 1, 2, 0, "<0x37>"),
    "gpt2": lambda t: (len(t), t.eos_token_id, t.bos_token_id, t.pad_token_id) == (GPT2_VOCAB, 50256, 50256, 50256),
}


def _cache_dir(kind: str) -> Path:
    import sentencepiece
    import tokenizers
    import transformers

    recipe = hashlib.sha256(Path(__file__).read_bytes())  # any edit to this file retrains
    recipe.update(f"{sentencepiece.__version__} {tokenizers.__version__} {transformers.__version__}".encode())
    return Path(tempfile.gettempdir()) / "coati-test-tokenizers" / f"{kind}-{recipe.hexdigest()[:16]}"


@functools.lru_cache(maxsize=None)
def _load_tokenizer(kind: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer, LlamaTokenizer

    if kind not in _BUILDERS:
        raise ValueError(kind)
    cached = _cache_dir(kind)
    if not cached.is_dir():  # train once, publish with a rename (parallel test processes may race here)
        cached.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=cached.parent))
        (work / "src").mkdir()
        _BUILDERS[kind](work / "src").save_pretrained(work / "tok")
        try:
            os.rename(work / "tok", cached)
        except OSError:
            pass  # another process published it first
        shutil.rmtree(work, ignore_errors=True)
    # the classes LLaMA and GPT-2 checkpoints load with (transformers 4.x: LLaMA's SentencePiece one)
    tok = (LlamaTokenizer if kind == "llama" else AutoTokenizer).from_pretrained(str(cached))
    if not _CHECKS[kind](tok):
        raise RuntimeError(f"the {kind} tokenizer trained in {cached} lacks the layout tests rely on "
                           "(changed sentencepiece / tokenizers / transformers behaviour?)")
    return tok


def tokenizer(kind: str = "llama") -> PreTrainedTokenizerBase:
    """A fresh copy each call (tests may mutate templates / padding side)."""
    return copy.deepcopy(_load_tokenizer(kind))


def llama_config(vocab_size: int = LLAMA_VOCAB, **overrides) -> LlamaConfig:
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def gpt_neox_config(vocab_size: int = GPT2_VOCAB, **overrides) -> GPTNeoXConfig:
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.25,
        bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    kw.update(overrides)
    return GPTNeoXConfig(**kw)


def gpt2_config(vocab_size: int = GPT2_VOCAB, **overrides) -> GPT2Config:
    kw = dict(
        vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
    )
    kw.update(overrides)
    return GPT2Config(**kw)


def t5_config(vocab_size: int = LLAMA_VOCAB, **overrides) -> T5Config:
    """A Flan-T5-shaped encoder-decoder over the llama tokenizer's ids (pad 0 = decoder start, EOS 2): gated-GELU
    MLP, dropout 0.1 and bf16 in config, as the published checkpoints have them."""
    kw = dict(
        vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", dropout_rate=0.1, pad_token_id=0, eos_token_id=2,
        decoder_start_token_id=0, tie_word_embeddings=False, dtype="bfloat16",
    )
    kw.update(overrides)
    return T5Config(**kw)


def save_tiny_t5(path: str | Path, seed: int = 0, **config_overrides) -> Path:
    """A random-weight tiny T5 (:func:`t5_config`) plus the llama tokenizer as a ``save_pretrained`` dir, its
    weights in the config's dtype."""
    from transformers import AutoModelForSeq2SeqLM

    config = t5_config(**config_overrides)
    torch.manual_seed(seed)
    AutoModelForSeq2SeqLM.from_config(config).to(config.dtype).save_pretrained(path)
    tokenizer("llama").save_pretrained(path)
    return Path(path)


FAMILY_BUILDERS = {
    "llama": (llama_config, "llama"),
    "gpt_neox": (gpt_neox_config, "gpt2"),
    "gpt2": (gpt2_config, "gpt2"),
}


def _save(config: PretrainedConfig, tok: PreTrainedTokenizerBase, path: Path, seed: int,
          dtype: torch.dtype = torch.float32) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_model(family: str, path: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Write a random-weight tiny causal LM plus its tokenizer as a ``save_pretrained`` dir (fp32, no
    dropout: fast and deterministic on CPU)."""
    make_config, tok_kind = FAMILY_BUILDERS[family]
    return _save(make_config(**config_overrides), tokenizer(tok_kind), Path(path), seed)


# Zephyr's template (TinyLlama-Chat and others): EOS closes every turn, so pad == EOS is a real hazard
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token "
                 "+ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")

PUBLISHED_OVERRIDES = {  # what published chat checkpoints have and the default fixtures do not
    "llama": dict(tie_word_embeddings=True, pad_token_id=2),  # llama_config's 4 heads / 2 KV heads: GQA already
    "gpt2": dict(tie_word_embeddings=True, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
}


def save_published_like_model(family: str, path: str | Path, seed: int = 0, **config_overrides) -> Path:
    """A tiny checkpoint shaped like the ones users download: bf16 in config and weights, tied embeddings,
    pad token == EOS, a chat template, grouped-query attention (LLaMA) or dropout 0.1 (GPT-2's defaults).

    bf16 makes CPU training ~20x slower, so only tests about these properties should use it."""
    make_config, tok_kind = FAMILY_BUILDERS[family]
    config = make_config(**{**PUBLISHED_OVERRIDES[family], **config_overrides})
    tok = tokenizer(tok_kind)
    tok.pad_token = tok.eos_token
    tok.chat_template = CHAT_TEMPLATE
    return _save(config, tok, Path(path), seed, dtype=torch.bfloat16)
