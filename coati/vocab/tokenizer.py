"""Extend a tokenizer with new pieces without changing any old id.

* SentencePiece tokenizers (a ``tokenizer.model`` in the dir: LLaMA-2, Baichuan, Yi ...): the pieces join the
  SentencePiece model proto after the old ones, with scores below every old score, so their merges run only
  after every old merge; transformers converts the proto to the fast tokenizer it saves (``tokenizer.json``,
  which ``AutoTokenizer`` reloads), and the extended ``tokenizer.model`` is kept beside it.
* Fast BPE tokenizers without a SentencePiece model (LLaMA-3, GPT-2 family): ``add_tokens`` through
  ``tokenizers``; added tokens are matched in the text before the BPE model runs.

Pieces made from a corpus (:func:`pieces_from_corpus`) keep only those the source lacks that consist of
non-ASCII letters and digits (and the word-start mark ``▁``): such a piece can only form in text containing
one of its characters, so ASCII text, and English text using those letters, tokenises exactly as before.
(Pieces such as ``reat`` or ``”)`` learnt from a Chinese corpus would re-split English words.)
"""
from __future__ import annotations

import io
import json
import shutil
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..errors import MissingInputError, UsageError

SPM_FILE = "tokenizer.model"
WORD_START = "▁"


def _parse_proto(data: bytes):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(data)
    return proto


def load_source_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a dir: a bare SentencePiece dir (only ``tokenizer.model``) through ``LlamaTokenizer``
    (``AutoTokenizer`` on such a dir tokenizes differently in transformers 5), anything else ``AutoTokenizer``."""
    path = Path(path)
    if not path.is_dir():
        raise MissingInputError(f"{path}: no such tokenizer directory")
    if (path / SPM_FILE).is_file() and not (path / "tokenizer.json").is_file():
        from transformers import LlamaTokenizer

        return LlamaTokenizer.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def read_pieces(path: str | Path) -> list[str]:
    """Pieces of a JSON lines file ``{"piece": "你好"}`` (Colossal-LLaMA's ``--expand_tokens_file``), in order,
    duplicates dropped."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: no such pieces file")
    pieces: dict[str, None] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            piece = json.loads(line)["piece"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"{path}, line {n}: expected a JSON object with a \"piece\" string") from None
        if not isinstance(piece, str) or not piece:
            raise UsageError(f"{path}, line {n}: \"piece\" must be a non-empty string")
        pieces.setdefault(piece, None)
    return list(pieces)


def write_pieces(path: str | Path, pieces: Iterable[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"piece": p}, ensure_ascii=False) + "\n" for p in pieces), encoding="utf-8")


def is_new_script_piece(piece: str) -> bool:
    """Whether every character but the word-start mark is a non-ASCII letter or digit (see module doc)."""
    chars = piece.replace(WORD_START, "")
    return bool(chars) and all(ord(c) > 127 and unicodedata.category(c)[0] in "LN" for c in chars)


def corpus_texts(records: Iterable[Any]) -> list[str]:
    """Every string value of each record (``Record`` or dict), nested lists / dicts included, one text per record:
    instruction + input + output of Alpaca data, every turn of a chat, ``text`` of plain text."""
    def strings(value: Any) -> Iterable[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, (dict, list, tuple)):
            for v in value.values() if isinstance(value, dict) else value:
                yield from strings(v)

    texts = ("\n".join(s for s in strings(getattr(rec, "data", rec)) if s.strip()) for rec in records)
    return [text for text in texts if text]


def pieces_from_corpus(texts: list[str], source: PreTrainedTokenizerBase, *, vocab_size: int = 8000,
                       model_type: str = "bpe", character_coverage: float = 0.9995, seed: int = 42) -> list[str]:
    """Train a SentencePiece model on ``texts`` and keep its pieces the source vocabulary lacks that pass
    :func:`is_new_script_piece`, most frequent first (SentencePiece's order)."""
    import sentencepiece as spm

    if not texts:
        raise UsageError("the corpus holds no text to learn pieces from")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, split_digits=True, num_threads=1,
            max_sentence_length=1 << 20, hard_vocab_limit=False, minloglevel=2)
    except RuntimeError as err:
        raise UsageError(f"SentencePiece training failed: {err}") from None
    have = set(source.get_vocab())
    normal = 1  # sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    return [p.piece for p in _parse_proto(model.getvalue()).pieces
            if p.type == normal and p.piece not in have and is_new_script_piece(p.piece)]


def extend_tokenizer(source_dir: str | Path, pieces: Iterable[str], target_dir: str | Path
                     ) -> PreTrainedTokenizerBase:
    """Write the source tokenizer extended with ``pieces`` (those it lacks) to ``target_dir`` and return it.
    Old ids keep their pieces; new ids follow them in the order given."""
    source_dir, target_dir = Path(source_dir), Path(target_dir)
    source = load_source_tokenizer(source_dir)
    have = set(source.get_vocab())
    new = [p for p in dict.fromkeys(pieces) if p not in have]
    if (source_dir / SPM_FILE).is_file():
        tokenizer = _extend_sentencepiece(source_dir, new, target_dir)
    else:
        tokenizer = source
        texts = list(dict.fromkeys(p.replace(WORD_START, " ").strip() for p in new))
        tokenizer.add_tokens([t for t in texts if t and t not in have])
        tokenizer.save_pretrained(str(target_dir))
    return tokenizer


def _extend_sentencepiece(source_dir: Path, new: list[str], target_dir: Path) -> PreTrainedTokenizerBase:
    from sentencepiece import sentencepiece_model_pb2
    from transformers import LlamaTokenizer

    proto = _parse_proto((source_dir / SPM_FILE).read_bytes())
    low = min((p.score for p in proto.pieces), default=0.0)
    for i, piece in enumerate(new):
        entry = sentencepiece_model_pb2.ModelProto.SentencePiece()
        entry.piece, entry.score = piece, low - 1.0 - i
        proto.pieces.append(entry)
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="coati_spm_") as tmp:
        # every source file but the old fast vocabulary, so the tokenizer is rebuilt from the extended proto
        for f in source_dir.iterdir():
            if f.is_file() and f.name not in ("tokenizer.json", SPM_FILE) and not f.name.endswith(
                    (".safetensors", ".bin")) and f.name != "config.json":
                shutil.copy2(f, Path(tmp) / f.name)
        (Path(tmp) / SPM_FILE).write_bytes(proto.SerializeToString())
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
        tokenizer.save_pretrained(str(target_dir))
        shutil.copy2(Path(tmp) / SPM_FILE, target_dir / SPM_FILE)
    return tokenizer
