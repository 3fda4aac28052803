"""Stage 2: reward-model training on preference pairs.

    torchrun --standalone --nproc_per_node=2 examples/train_reward_model.py --pretrain SFT_OUT --model llama \
        --strategy ddp --dataset Anthropic/hh-rlhf --subset harmless-base --loss_fn log_sig \
        --batch_size 4 --max_epochs 1 --lr 5e-6 --save_path RM_OUT
"""
from __future__ import annotations

import argparse
import os

from coati.dataset import PackingRewardCollator, RewardCollator, RewardDataset, format_from_name, split_dataset
from coati.models import RewardModel, packing_attention
from coati.trainer import RewardModelTrainer, resolve_resume
from coati import cli, compat
from coati.utils.tokenizer import load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser("coati stage 2: train a reward model (LM backbone + value head) on chosen/rejected pairs")
    cli.add_model_args(p)
    cli.add_lora_args(p)
    cli.add_quant_args(p)
    cli.add_strategy_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", required=True,
                   help="preference file or dir; 'Anthropic/hh-rlhf' or 'Dahoas/rm-static' read the local copy "
                        "at that path in that format")
    d.add_argument("--subset", default=None, help="sub-directory of --dataset to read (e.g. hh-rlhf's harmless-base)")
    d.add_argument("--format", default=None, choices=["hh-rlhf", "rm-static", "sharegpt", "ranked"],
                   help="force a data format (default: detected from the records)")
    d.add_argument("--eval_dataset", default=None, help="held-out preference file (default: --eval_ratio of --dataset)")
    d.add_argument("--eval_ratio", type=cli.Bounded(float, "[0, 1)"), default=0.05, help="share of --dataset held out for accuracy / margin")
    d.add_argument("--max_datasets_size", type=cli.Bounded(int, ">= 1"), default=None, help="use at most this many pairs' records")
    d.add_argument("--max_len", type=cli.Bounded(int, ">= 1"), default=512, help="max tokens per chosen / rejected sequence")
    d.add_argument("--overlong", default="truncate", choices=["truncate", "skip"], help="what to do with pairs over --max_len")
    cli.add_empty_records_arg(d)
    d.add_argument("--prompt_template", default="auto", choices=["auto", "alpaca", "chatml", "none"],
                   help="how prompts are rendered; must match the SFT stage")
    cli.add_batching_args(d)
    t = cli.add_training_args(p)
    t.add_argument("--loss_fn", default="log_sig", choices=["log_sig", "log_exp"],
                   help="log_sig: -log sigmoid(r_c - r_r); log_exp: log(1 + exp(r_r - r_c))")
    t.add_argument("--margin", type=cli.Bounded(float, ">= 0"), default=0.0, help="required reward margin inside the loss")
    t.add_argument("--test", action=cli.BoolFlag, default=False,
                   help="quick smoke run: at most 256 records, one epoch (Coati's --test)")
    compat.add_flag_aliases(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    quant = cli.quant_kwargs(args)  # refuse --quant without LoRA / on a sharding strategy up front
    attn = cli.attn_kwargs(args)  # and an attention kernel this machine lacks
    if args.test:
        args.max_datasets_size = min(args.max_datasets_size or 256, 256)
        args.max_epochs = 1
    strategy = cli.strategy_from_args(args)
    cli.setup_logging(strategy.is_rank0())
    tokenizer = load_tokenizer(args.tokenizer or args.pretrain, args.trust_remote_code)

    path = os.path.join(args.dataset, args.subset) if args.subset else args.dataset
    data_kw = dict(max_len=args.max_len, prompt_template=args.prompt_template, overlong=args.overlong,
                   seed=args.seed, format=args.format or format_from_name(args.dataset), empty=args.empty_records)
    train_ds = RewardDataset(path, tokenizer, max_datasets_size=args.max_datasets_size, **data_kw)
    if args.eval_dataset:
        eval_ds = RewardDataset(args.eval_dataset, tokenizer, **data_kw)
    elif args.eval_ratio > 0:
        train_ds, eval_ds = split_dataset(train_ds, args.eval_ratio, args.seed)
    else:
        eval_ds = None

    packing = cli.packing_from_args(args)  # before the model loads
    model = RewardModel.from_pretrained(args.pretrain, family=args.model, lora=cli.lora_settings(args),
                                        grad_checkpoint=args.grad_checkpoint, trust_remote_code=args.trust_remote_code,
                                        frozen_dtype=args.frozen_dtype, **quant, **attn)
    attention = packing_attention(model)
    model = strategy.prepare_model(model)
    collate = RewardCollator(tokenizer.pad_token_id)
    train_collate = (PackingRewardCollator(tokenizer.pad_token_id, args.max_len, attention=attention)
                     if packing else collate)
    train_dl = strategy.setup_dataloader(train_ds, args.batch_size, shuffle=True, collate_fn=train_collate,
                                         drop_last=True, lengths=cli.group_lengths(args, train_ds))
    eval_dl = (strategy.setup_dataloader(eval_ds, args.batch_size, shuffle=False, collate_fn=collate)
               if eval_ds is not None else None)

    trainer = RewardModelTrainer(model, strategy, train_dl, eval_dl, loss_fn=args.loss_fn, margin=args.margin,
                                 train_config=cli.train_config(args), tokenizer=tokenizer,
                                 merge_lora=args.merge_lora_weights, run_config=vars(args))
    trainer.fit(resume_from=resolve_resume(args.resume, args.save_path))


if __name__ == "__main__":
    cli.run(main)
