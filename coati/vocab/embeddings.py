"""New embedding rows initialised from the old vocabulary (Colossal-LLaMA's ``init_model.py``).

Each new token's row of the input embedding and of the LM head is the mean of the source rows of the tokens
the *source* tokenizer splits that token's text into, so a new piece starts where the model already
"understands" the text; old rows are copied unchanged, so logits over the old vocabulary on old-vocabulary
text are the source model's. Tied embeddings stay tied (one matrix, initialised once).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import UsageError


def old_tokenization(token: str, source: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase) -> list[int]:
    """Source ids of a target token's text as it appears inside running text: an added token's content goes
    through the whole source tokenizer; a vocabulary piece (SentencePiece, with ``▁`` for a space) through the
    source's model alone, which splits it without adding a word-start mark."""
    added = {t.content for t in target.added_tokens_decoder.values()}
    if token in added:
        return source(token, add_special_tokens=False)["input_ids"]
    return [t.id for t in source.backend_tokenizer.model.tokenize(token)]


@torch.no_grad()
def init_new_embeddings(model: torch.nn.Module, source: PreTrainedTokenizerBase,
                        target: PreTrainedTokenizerBase) -> list[list[int]]:
    """Resize ``model`` (a HF causal LM for ``source``) to ``len(target)`` tokens and set every new row to the
    mean of its old tokenisation's rows; returns those old tokenisations, one list per new id."""
    old_n, new_n = len(source), len(target)
    if new_n < old_n:
        raise UsageError(f"the target tokenizer has {new_n} tokens, fewer than the source's {old_n}")
    vocab = source.get_vocab()
    for token, i in target.get_vocab().items():
        if i < old_n and vocab.get(token) != i:
            raise UsageError(f"target token {i} is {token!r}, the source's is different: the target tokenizer "
                             "must extend the source one (old ids unchanged)")
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < old_n:
        raise UsageError(f"the model has {rows} embedding rows, fewer than the source tokenizer's {old_n} tokens")
    tied = model.config.get_text_config().tie_word_embeddings
    tokens = target.convert_ids_to_tokens(list(range(old_n, new_n)))
    splits = [old_tokenization(t, source, target) for t in tokens]
    empty = [t for t, s in zip(tokens, splits) if not s]
    if empty:
        raise UsageError(f"the source tokenizer gives no tokens for {empty[:3]}")
    if new_n > rows:
        model.resize_token_embeddings(new_n, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    if not tied:
        matrices.append(model.get_output_embeddings().weight)
    for weight in matrices:
        for i, split in enumerate(splits):
            weight[old_n + i] = weight[split].float().mean(0).to(weight.dtype)
    return splits


def save_extended_model(source_model_dir: str | Path, target_tokenizer_dir: str | Path,
                        target_model_dir: str | Path) -> tuple[int, int]:
    """Load the source model and tokenizer, initialise the new rows in fp32, write the model (in the
    checkpoint's own dtype) and the target tokenizer to ``target_model_dir``; returns (old, new) vocab sizes."""
    from transformers import AutoModelForCausalLM

    from ..models.loading import checkpoint_dtype
    from ..models.dtypes import dtype_kwargs
    from .tokenizer import load_source_tokenizer

    source = load_source_tokenizer(source_model_dir)
    target = load_source_tokenizer(target_tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(str(source_model_dir), **dtype_kwargs(torch.float32))
    init_new_embeddings(model, source, target)
    model.to(checkpoint_dtype(source_model_dir))
    model.save_pretrained(str(target_model_dir))
    target.save_pretrained(str(target_model_dir))
    spm = Path(target_tokenizer_dir) / "tokenizer.model"
    if spm.is_file():
        import shutil

        shutil.copy2(spm, Path(target_model_dir) / spm.name)
    return len(source), len(target)
