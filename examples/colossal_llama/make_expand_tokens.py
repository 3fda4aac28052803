"""Colossal-LLaMA step 1a: make the pieces file (--expand_tokens_file of init_tokenizer.py) from a corpus:
train a SentencePiece model on it and keep the pieces the source tokenizer lacks (non-ASCII letters and
digits only, so ASCII text keeps its tokenisation).

    python examples/colossal_llama/make_expand_tokens.py --source_tokenizer_dir LLAMA2 \
        --corpus zh.json [more files] --vocab_size 8000 --expand_tokens_file pieces.jsonl
"""
from __future__ import annotations

import argparse
import logging

from coati.dataset import load_records
from coati import cli
from coati.vocab import corpus_texts, load_source_tokenizer, pieces_from_corpus, write_pieces

logger = logging.getLogger("coati")


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser("make a pieces file for tokenizer extension from a corpus")
    p.add_argument("--source_tokenizer_dir", required=True, help="the tokenizer to extend")
    p.add_argument("--corpus", nargs="+", required=True,
                   help="data files or dirs (any format coati reads); every string field is text")
    p.add_argument("--vocab_size", type=cli.Bounded(int, ">= 1"), default=8000, help="size of the SentencePiece model trained on it")
    p.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"], help="SentencePiece model type")
    p.add_argument("--expand_tokens_file", required=True, help="output JSON lines {\"piece\": ...}")
    return p


def main(argv: list[str] | None = None) -> list[str]:
    args = build_parser().parse_args(argv)
    cli.setup_logging()
    texts = corpus_texts(load_records(list(args.corpus)))
    source = load_source_tokenizer(args.source_tokenizer_dir)
    pieces = pieces_from_corpus(texts, source, vocab_size=args.vocab_size, model_type=args.model_type)
    write_pieces(args.expand_tokens_file, pieces)
    logger.info("%d new pieces from %d texts -> %s", len(pieces), len(texts), args.expand_tokens_file)
    return pieces


if __name__ == "__main__":
    cli.run(main)
