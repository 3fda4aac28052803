"""Vocabulary extension: pieces from a corpus, tokenizer extension (SentencePiece proto and fast BPE), and
mean-initialised embedding rows (coati.vocab, Colossal-LLaMA's init_tokenizer / init_model)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coati.vocab import (
    corpus_texts, extend_tokenizer, init_new_embeddings, load_source_tokenizer, pieces_from_corpus,
    read_pieces, save_extended_model, write_pieces,
)
from tests import tiny


def _zh_texts(shared_data):
    return corpus_texts(json.loads((shared_data / "sft" / "alpaca_zh_demo.json").read_text()))


def _en_texts(shared_data):
    lines = (shared_data / "pretrain" / "c4_demo.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[:100]]


def _n_tokens(tok, texts):
    return sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def llama_extended(shared_data, tmp_path_factory):
    """LLaMA-2 extended with pieces learnt from 800 Chinese records; the last 200 stay held out."""
    zh = _zh_texts(shared_data)
    source = load_source_tokenizer(shared_data / "tokenizers" / "llama2")
    pieces = pieces_from_corpus(zh[:800], source, vocab_size=8000)
    path = tmp_path_factory.mktemp("pieces") / "pieces.jsonl"
    write_pieces(path, pieces)
    target_dir = tmp_path_factory.mktemp("llama_ext")
    target = extend_tokenizer(shared_data / "tokenizers" / "llama2", read_pieces(path), target_dir)
    return source, target, target_dir, zh[800:], pieces


def test_sentencepiece_extension_keeps_old_ids_and_compresses_chinese(llama_extended, shared_data):
    source, target, target_dir, held_out, pieces = llama_extended
    assert len(target) == len(source) + len(pieces) > len(source)
    old_vocab = source.get_vocab()
    assert {t: i for t, i in target.get_vocab().items() if i < len(source)} == old_vocab
    en = _en_texts(shared_data)
    assert target(en)["input_ids"] == source(en)["input_ids"]
    before, after = _n_tokens(source, held_out), _n_tokens(target, held_out)
    rate = after / before
    print(f"\nheld-out alpaca_zh ({len(held_out)} records): LLaMA-2 {before} tokens, extended "
          f"({len(target)} tokens) {after}: compression rate {rate:.3f} ({1 - rate:.1%} fewer)")
    assert rate <= 0.70
    reloaded = AutoTokenizer.from_pretrained(str(target_dir))
    assert len(reloaded) == len(target)
    assert reloaded(held_out[:20] + en[:20])["input_ids"] == target(held_out[:20] + en[:20])["input_ids"]
    assert (target_dir / "tokenizer.model").is_file()


def test_corpus_pieces_never_resplit_ascii(llama_extended):
    _, _, _, _, pieces = llama_extended
    assert pieces and all(any(ord(c) > 127 and c != "▁" for c in p) for p in pieces)
    assert not any(c.isascii() for p in pieces for c in p)


def test_fast_bpe_extension(shared_data, tmp_path):
    source = load_source_tokenizer(shared_data / "tokenizers" / "gpt2")
    target = extend_tokenizer(shared_data / "tokenizers" / "gpt2", ["你好", "▁世界", "企鹅"], tmp_path)
    assert len(target) == len(source) + 3
    en = _en_texts(shared_data)[:30]
    assert target(en)["input_ids"] == source(en)["input_ids"]
    text = "你好世界，企鹅"
    assert len(target(text)["input_ids"]) < len(source(text)["input_ids"])
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded(text)["input_ids"] == target(text)["input_ids"]


def _sentencepiece_split(shared_data, piece: str, source) -> list[int]:
    """The source's split of a piece computed independently, by SentencePiece itself with no dummy prefix."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((shared_data / "tokenizers" / "llama2" / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return sp.encode(piece.replace("▁", " "))


PIECES = ["你好", "▁你好", "企鹅", "▁世界", "鹅鹅鹅"]


@pytest.fixture(scope="module")
def small_extension(shared_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    extend_tokenizer(shared_data / "tokenizers" / "llama2", PIECES, path)
    return path


@pytest.mark.parametrize("tied", [False, True])
def test_new_rows_are_means_of_old_pieces_and_old_logits_unchanged(shared_data, small_extension, tmp_path, tied):
    pieces = PIECES
    src_dir = tiny.save_tiny_model("llama", tmp_path / "src", tie_word_embeddings=tied)
    load_source_tokenizer(shared_data / "tokenizers" / "llama2").save_pretrained(src_dir)  # the one extended
    save_extended_model(src_dir, small_extension, tmp_path / "out")
    source_model = AutoModelForCausalLM.from_pretrained(str(src_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    target = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    source = AutoTokenizer.from_pretrained(str(src_dir))
    assert len(target) == 32000 + len(pieces) == model.get_input_embeddings().weight.shape[0]
    old_in = source_model.get_input_embeddings().weight
    old_out = source_model.get_output_embeddings().weight
    new_in = model.get_input_embeddings().weight
    new_out = model.get_output_embeddings().weight
    assert torch.equal(new_in[:32000], old_in) and torch.equal(new_out[:32000], old_out)
    for piece in pieces:
        split = _sentencepiece_split(shared_data, piece, source)
        i = target.convert_tokens_to_ids(piece)
        assert i >= 32000
        by_hand_in = sum(old_in[j] for j in split) / len(split)
        by_hand_out = sum(old_out[j] for j in split) / len(split)
        torch.testing.assert_close(new_in[i], by_hand_in, rtol=0, atol=1e-6)
        torch.testing.assert_close(new_out[i], by_hand_out, rtol=0, atol=1e-6)
    if tied:
        assert model.config.tie_word_embeddings and new_out.data_ptr() == new_in.data_ptr()
    else:
        assert not torch.equal(new_in[32000:], new_out[32000:])
    ids = source("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[..., :32000], source_model(ids).logits, rtol=0, atol=1e-5)


def test_init_refuses_a_tokenizer_that_renumbers(shared_data, tmp_path):
    from coati.errors import UsageError

    model = AutoModelForCausalLM.from_config(tiny.llama_config())
    gpt2 = load_source_tokenizer(shared_data / "tokenizers" / "gpt2")
    with pytest.raises(UsageError, match="extend the source"):
        init_new_embeddings(model, tiny.tokenizer("llama"), gpt2)
