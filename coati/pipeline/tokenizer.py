"""The pipeline's own tokenizer: one token per character, built with ``tokenizers``, nothing downloaded.

Saved with ``save_pretrained`` it loads offline through ``AutoTokenizer``. Special tokens: ``<pad>`` (0),
``<s>`` (1, BOS), ``</s>`` (2, EOS), ``<unk>`` (3); characters outside the alphabet become ``<unk>``.
``tokenizer(text)`` prepends BOS (as coati's datasets do), so plain ``transformers`` code that calls the
tokenizer and ``generate`` sees the same prompt tokens the model was trained on. The chat template renders
message contents back to back, so coati tools with the default ``prompt_template="auto"`` prompt the model
exactly as the pipeline's ``"none"`` template does.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
ALPHABET = "0123456789+-*/=() ?"
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def build_tokenizer(alphabet: str = ALPHABET, model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast`` over ``alphabet`` plus the four special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=model_max_length, padding_side="right")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
