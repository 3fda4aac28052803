"""Colossal-LLaMA step 3 (SFT): tokenise {messages: [{from, content}]} chats (any SFT format coati reads) with
the loss on assistant turns, one sample per record (not spliced), binned per category like pre-training data.

    python examples/colossal_llama/prepare_sft_dataset.py --data_input_dirs sft_dir --tokenizer_dir MODEL \
        --data_output_dirs OUT --max_length 4096 --llama_version 3
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prepare_pretrain_dataset import add_prepare_args  # noqa: E402

from coati.dataset import SFTDataset  # noqa: E402
from coati.dataset.spliced import record_category, load_dirs, write_bins  # noqa: E402
from coati import cli  # noqa: E402
from coati.vocab import load_source_tokenizer  # noqa: E402

logger = logging.getLogger("coati")
# LLaMA-2 base models have no chat template; LLaMA-3 tokenizers carry theirs
TEMPLATE_FOR_VERSION = {2: "alpaca", 3: "auto"}


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser("Colossal-LLaMA: tokenise and bin SFT chats (loss on assistant turns)")
    add_prepare_args(p, default_max_length=4096)
    p.add_argument("--llama_version", type=int, default=3, choices=sorted(TEMPLATE_FOR_VERSION),
                   help="picks the prompt template: 2 = alpaca (LLaMA-2 bases have no chat template), 3 = the "
                        "tokenizer's chat template (alpaca when it has none)")
    p.add_argument("--prompt_template", default=None, choices=["auto", "alpaca", "chatml", "none"],
                   help="override the template --llama_version picks")
    return p


def main(argv: list[str] | None = None) -> dict[str, list[int]]:
    args = build_parser().parse_args(argv)
    cli.setup_logging()
    tokenizer = load_source_tokenizer(args.tokenizer_dir)
    template = args.prompt_template or TEMPLATE_FOR_VERSION[args.llama_version]
    records = load_dirs([d for d in args.data_input_dirs.split(",") if d])
    by_category: dict[str, list] = {}
    for rec in records:
        by_category.setdefault(record_category(rec), []).append(rec)
    samples = {}
    for category, recs in by_category.items():
        ds = SFTDataset(recs, tokenizer, max_len=args.max_length, prompt_template=template, seed=args.seed)
        samples[category] = [(ids.tolist(), labels.tolist()) for ids, labels in zip(ds.input_ids, ds.labels)]
    summary = write_bins(samples, args.data_output_dirs, num_bins=args.num_spliced_dataset_bins, max_length=None,
                         seed=args.seed)
    for category, sizes in summary.items():
        logger.info("%s: %d samples in %d bins", category, sum(sizes), len(sizes))
    return summary


if __name__ == "__main__":
    cli.run(main)
