"""Colossal-LLaMA step 3: tokenise {source, target, category} JSON lines for continual pre-training, splice
them into samples of at most --max_length tokens and split each category into bins.

    python examples/colossal_llama/prepare_pretrain_dataset.py --data_input_dirs zh_dir,en_dir \
        --tokenizer_dir EXTENDED_MODEL --data_output_dirs OUT --max_length 4096 --num_spliced_dataset_bins 10

The loss falls on ``target`` only (and its EOS); records may also be {text} (loss on every token) or any SFT
format coati reads. OUT gets cache/ (tokenised, before splicing), jsonl/ and arrow/ (``datasets`` dirs that
examples/colossal_llama/train.py --dataset OUT reads).
"""
from __future__ import annotations

import argparse
import logging

from coati.dataset.spliced import encode_by_category, load_dirs, write_bins
from coati import cli
from coati.vocab import load_source_tokenizer

logger = logging.getLogger("coati")


def add_prepare_args(p: argparse.ArgumentParser, *, default_max_length: int) -> None:
    p.add_argument("--data_input_dirs", required=True,
                   help="comma-separated dirs (or files) of JSON lines; every data file in a dir is read")
    p.add_argument("--tokenizer_dir", required=True, help="tokenizer (or model) dir, e.g. the extended model")
    p.add_argument("--data_output_dirs", required=True, help="output dir: cache/, jsonl/ and arrow/ go under it")
    p.add_argument("--max_length", type=cli.Bounded(int, ">= 1"), default=default_max_length, help="max tokens per sample")
    p.add_argument("--num_spliced_dataset_bins", type=cli.Bounded(int, ">= 1"), default=10,
                   help="bins per category (each bin joins one bucket of bucket-based training)")
    p.add_argument("--seed", type=cli.Bounded(int, ">= 0"), default=42, help="seed of the per-category shuffle before binning")


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser("Colossal-LLaMA: tokenise, splice and bin continual pre-training data")
    add_prepare_args(p, default_max_length=4096)
    return p


def main(argv: list[str] | None = None) -> dict[str, list[int]]:
    args = build_parser().parse_args(argv)
    cli.setup_logging()
    tokenizer = load_source_tokenizer(args.tokenizer_dir)
    records = load_dirs([d for d in args.data_input_dirs.split(",") if d])
    by_category = encode_by_category(records, tokenizer, prompt_template="none", seed=args.seed)
    summary = write_bins(by_category, args.data_output_dirs, num_bins=args.num_spliced_dataset_bins,
                         max_length=args.max_length, seed=args.seed)
    for category, sizes in summary.items():
        logger.info("%s: %d spliced samples in %d bins", category, sum(sizes), len(sizes))
    return summary


if __name__ == "__main__":
    cli.run(main)
