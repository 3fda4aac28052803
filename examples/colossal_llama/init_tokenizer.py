"""Colossal-LLaMA step 1: extend a tokenizer with the pieces of a JSON lines file ({"piece": "你好"}); old ids
never change (SentencePiece: the pieces join the model proto; fast BPE: added tokens).

    python examples/colossal_llama/init_tokenizer.py --source_tokenizer_dir LLAMA2 \
        --target_tokenizer_dir EXTENDED_TOKENIZER --expand_tokens_file pieces.jsonl
"""
from __future__ import annotations

import argparse
import logging

from coati import cli
from coati.vocab import extend_tokenizer, load_source_tokenizer, read_pieces

logger = logging.getLogger("coati")


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser("extend a tokenizer with new pieces (old ids unchanged)")
    p.add_argument("--source_tokenizer_dir", required=True, help="the tokenizer (or model) dir to extend")
    p.add_argument("--target_tokenizer_dir", required=True, help="where the extended tokenizer is written")
    p.add_argument("--expand_tokens_file", required=True, help="JSON lines {\"piece\": ...} (make_expand_tokens.py)")
    return p


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    cli.setup_logging()
    pieces = read_pieces(args.expand_tokens_file)
    old = len(load_source_tokenizer(args.source_tokenizer_dir))
    tokenizer = extend_tokenizer(args.source_tokenizer_dir, pieces, args.target_tokenizer_dir)
    logger.info("%d -> %d tokens, written to %s", old, len(tokenizer), args.target_tokenizer_dir)
    return tokenizer


if __name__ == "__main__":
    cli.run(main)
