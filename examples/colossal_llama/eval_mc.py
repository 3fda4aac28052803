"""Colossal-LLaMA step 7: k-shot multiple-choice evaluation (MMLU / CMMLU style) scored on the first predicted
token, plus the combined metric; per-subject and overall accuracy as a table and JSON.

    python examples/colossal_llama/eval_mc.py --model_path MODEL --data mmlu/test --dev_data mmlu/dev \
        --k_shot 5 --output results.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from coati.eval import evaluate_mc, format_table, load_mc_items
from coati.models import Actor
from coati import cli
from coati.utils.tokenizer import load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser("first-token multiple-choice evaluation (MMLU / CMMLU style)")
    p.add_argument("--model_path", required=True, help="model dir (with its tokenizer)")
    p.add_argument("--data", required=True, help="test items: a JSON lines / JSON / CSV file or a dir of them")
    p.add_argument("--dev_data", default=None, help="dev items the k-shot exemplars come from (same subject)")
    p.add_argument("--k_shot", type=cli.Bounded(int, ">= 0"), default=5, help="exemplars per prompt (needs --dev_data when > 0)")
    p.add_argument("--batch_size", type=cli.Bounded(int, ">= 1"), default=8, help="prompts per forward pass")
    p.add_argument("--combined", action=cli.BoolFlag, default=True,
                   help="also generate the answer greedily for the combined metric")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--output", default=None, help="write the JSON report (per-item predictions included) here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    items = load_mc_items(args.data)
    dev = load_mc_items(args.dev_data) if args.dev_data else []
    k_shot = args.k_shot if dev else 0
    tokenizer = load_tokenizer(args.model_path)
    model = Actor.from_pretrained(args.model_path, frozen=True).to(args.device)
    report = evaluate_mc(model, tokenizer, items, dev=dev, k_shot=k_shot, batch_size=args.batch_size,
                         combined=args.combined, device=args.device)
    print(format_table(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


if __name__ == "__main__":
    cli.run(main)
