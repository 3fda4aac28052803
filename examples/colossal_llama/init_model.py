"""Colossal-LLaMA step 2: resize a model to the extended tokenizer; each new row of the input embedding and the
LM head is the mean of the source rows of that token's old tokenisation, old rows untouched, tied embeddings
kept tied; the tokenizer is written beside the model.

    python examples/colossal_llama/init_model.py --source_model_and_tokenizer_path LLAMA2_MODEL \
        --target_tokenizer_path EXTENDED_TOKENIZER --target_model_path EXTENDED_MODEL
"""
from __future__ import annotations

import argparse
import logging

from coati import cli
from coati.vocab import save_extended_model

logger = logging.getLogger("coati")


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser("initialise the new vocabulary's embedding rows from the old ones")
    p.add_argument("--source_model_and_tokenizer_path", required=True, help="source model dir with its tokenizer")
    p.add_argument("--target_tokenizer_path", required=True, help="the extended tokenizer (init_tokenizer.py)")
    p.add_argument("--target_model_path", required=True, help="where the resized model and tokenizer go")
    return p


def main(argv: list[str] | None = None) -> tuple[int, int]:
    args = build_parser().parse_args(argv)
    cli.setup_logging()
    old, new = save_extended_model(args.source_model_and_tokenizer_path, args.target_tokenizer_path,
                                   args.target_model_path)
    logger.info("vocabulary %d -> %d; model written to %s", old, new, args.target_model_path)
    return old, new


if __name__ == "__main__":
    cli.run(main)
