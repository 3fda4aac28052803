"""Direct preference optimisation of an SFT model: DPO, IPO, KTO, ORPO or SimPO.

    torchrun --standalone --nproc_per_node=2 examples/train_dpo.py --pretrain SFT_OUT --model llama \
        --strategy ddp --dataset dpo_en_demo.json --loss_type dpo --beta 0.1 --batch_size 4 --lr 5e-7 \
        --save_path DPO_OUT

    # KTO on unpaired {messages, label} records; LoRA, whose base with the adapter off is the reference
    python examples/train_dpo.py --pretrain SFT_OUT --dataset kto_en_demo.json --loss_type kto --lora_rank 16

Outputs: the trained policy as the HF model dir ``{save_path}`` (as train_sft.py writes it),
``{save_path}/metrics.jsonl`` and, with --save_interval, ``{save_path}/checkpoints/step_{n}``.
"""
from __future__ import annotations

import argparse
import copy
import os

from coati.dataset import (
    PackingPreferenceCollator, PreferenceCollator, PreferenceDataset, UnpairedPreferenceCollator,
    UnpairedPreferenceDataset, format_from_name, split_dataset,
)
from coati.models import Actor, packing_attention
from coati.trainer import DPOTrainer, PreferenceConfig, resolve_resume
from coati import cli, compat
from coati.utils.config import add_config_args, config_from_args
from coati.utils.tokenizer import load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser("coati: train a policy directly on preferences (DPO, IPO, KTO, ORPO, SimPO)")
    cli.add_model_args(p)
    cli.add_lora_args(p)
    cli.add_quant_args(p)
    cli.add_strategy_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", required=True,
                   help="preference file or dir: any pair format train_reward_model.py reads, or (KTO) "
                        "{messages, label} / {prompt, completion, label} records")
    d.add_argument("--subset", default=None, help="sub-directory of --dataset to read (e.g. hh-rlhf's harmless-base)")
    d.add_argument("--format", default=None, choices=["hh-rlhf", "rm-static", "sharegpt", "ranked", "chat"],
                   help="force a pair format (default: detected from the records)")
    d.add_argument("--eval_dataset", default=None, help="held-out preference file (default: --eval_ratio of --dataset)")
    d.add_argument("--eval_ratio", type=cli.Bounded(float, "[0, 1)"), default=0.05,
                   help="share of --dataset held out for preference accuracy / margin")
    d.add_argument("--max_datasets_size", type=cli.Bounded(int, ">= 1"), default=None, help="use at most this many pairs (KTO: samples)")
    d.add_argument("--max_len", type=cli.Bounded(int, ">= 1"), default=512, help="max tokens per chosen / rejected sequence")
    d.add_argument("--overlong", default="truncate", choices=["truncate", "skip"],
                   help="what to do with samples over --max_len")
    cli.add_empty_records_arg(d)
    d.add_argument("--prompt_template", default="auto", choices=["auto", "alpaca", "chatml", "none"],
                   help="how prompts are rendered; must match the SFT stage")
    cli.add_batching_args(d)
    add_config_args(p, PreferenceConfig)
    cli.add_training_args(p, lr=5e-7, warmup_ratio=0.1)
    compat.add_flag_aliases(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config = config_from_args(PreferenceConfig, args)
    quant = cli.quant_kwargs(args)  # refuse --quant without LoRA / on a sharding strategy up front
    attn = cli.attn_kwargs(args)  # and an attention kernel this machine lacks
    strategy = cli.strategy_from_args(args)
    cli.setup_logging(strategy.is_rank0())
    tokenizer = load_tokenizer(args.tokenizer or args.pretrain, args.trust_remote_code)

    dataset_cls, collate = ((UnpairedPreferenceDataset, UnpairedPreferenceCollator(tokenizer.pad_token_id))
                            if config.loss_type == "kto" else (PreferenceDataset, PreferenceCollator(tokenizer.pad_token_id)))
    path = os.path.join(args.dataset, args.subset) if args.subset else args.dataset
    data_kw = dict(max_len=args.max_len, prompt_template=args.prompt_template, overlong=args.overlong,
                   seed=args.seed, format=args.format or format_from_name(args.dataset), empty=args.empty_records)
    train_ds = dataset_cls(path, tokenizer, max_datasets_size=args.max_datasets_size, **data_kw)
    eval_ds = None
    if args.eval_dataset:
        eval_ds = dataset_cls(args.eval_dataset, tokenizer, **data_kw)
    elif args.eval_ratio > 0:
        train_ds, eval_ds = split_dataset(train_ds, args.eval_ratio, args.seed)

    packing = cli.packing_from_args(args, stage_packs=config.loss_type != "kto", stage="KTO")
    model = Actor.from_pretrained(args.pretrain, family=args.model, lora=cli.lora_settings(args),
                                  grad_checkpoint=args.grad_checkpoint, trust_remote_code=args.trust_remote_code,
                                  frozen_dtype=args.frozen_dtype, **quant, **attn)
    ref_model = None
    if config.uses_reference and not cli.lora_settings(args).enabled and not config.precompute_ref_logps:
        # the frozen copy of the starting policy, made before the policy is prepared: a sharded (fsdp) model
        # cannot be copied
        ref_model = strategy.prepare_model(copy.deepcopy(model), trainable=False)
    attention = packing_attention(model)
    model = strategy.prepare_model(model)
    train_collate = (PackingPreferenceCollator(tokenizer.pad_token_id, args.max_len, attention=attention)
                     if packing else collate)
    train_dl = strategy.setup_dataloader(train_ds, args.batch_size, shuffle=True, collate_fn=train_collate,
                                         drop_last=True, lengths=cli.group_lengths(args, train_ds))
    eval_dl = (strategy.setup_dataloader(eval_ds, args.batch_size, shuffle=False, collate_fn=collate)
               if eval_ds is not None else None)

    trainer = DPOTrainer(model, strategy, train_dl, eval_dl, ref_model=ref_model, config=config,
                         train_config=cli.train_config(args), tokenizer=tokenizer,
                         merge_lora=args.merge_lora_weights, run_config=vars(args))
    trainer.fit(resume_from=resolve_resume(args.resume, args.save_path))


if __name__ == "__main__":
    cli.run(main)
