"""Stage 1: supervised fine-tuning.

    torchrun --standalone --nproc_per_node=2 examples/train_sft.py --pretrain PATH --model llama \
        --strategy ddp --dataset data.json --batch_size 1 --accumulation_steps 8 --lr 2e-5 \
        --max_datasets_size 512 --max_epochs 1 --lora_rank 16 --save_path OUT
"""
from __future__ import annotations

import argparse

from coati.dataset import PackingCollator, SFTCollator, SFTDataset, split_dataset
from coati.models import Actor, Seq2SeqActor, packing_attention
from coati.trainer import SFTTrainer, resolve_resume
from coati import cli, compat
from coati.utils.tokenizer import load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser("coati stage 1: supervised fine-tuning of a causal LM (or an encoder-decoder such as "
                        "Flan-T5) on instruction / chat data")
    cli.add_model_args(p)
    cli.add_lora_args(p)
    cli.add_quant_args(p)
    cli.add_strategy_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", required=True, help="SFT data file or dir (Alpaca, messages, ShareGPT, text, KoChatGPT ...)")
    d.add_argument("--eval_dataset", default=None, help="held-out data file (default: --eval_ratio of --dataset)")
    d.add_argument("--eval_ratio", type=cli.Bounded(float, "[0, 1)"), default=0.0, help="share of --dataset held out for eval when no --eval_dataset")
    d.add_argument("--max_datasets_size", type=cli.Bounded(int, ">= 1"), default=None, help="use at most this many records (after seeded shuffle)")
    d.add_argument("--max_len", type=cli.Bounded(int, ">= 1"), default=512,
                   help="max tokens per sample (encoder-decoder models: per encoder input and per target)")
    d.add_argument("--overlong", default="truncate", choices=["truncate", "skip"], help="what to do with samples over --max_len")
    cli.add_empty_records_arg(d)
    d.add_argument("--prompt_template", default="auto", choices=["auto", "alpaca", "chatml", "none"],
                   help="auto = the tokenizer's chat template if it has one, else alpaca")
    cli.add_batching_args(d)
    t = cli.add_training_args(p, accumulation_steps=8, max_epochs=3)
    cli.add_neftune_args(t)
    compat.add_flag_aliases(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    quant = cli.quant_kwargs(args)  # refuse --quant without LoRA / on a sharding strategy up front
    strategy = cli.strategy_from_args(args)
    cli.setup_logging(strategy.is_rank0())
    tokenizer = load_tokenizer(args.tokenizer or args.pretrain, args.trust_remote_code)

    seq2seq = cli.seq2seq_from_args(args)  # an encoder-decoder (T5): prompt -> encoder, response -> decoder
    data_kw = dict(max_len=args.max_len, prompt_template=args.prompt_template, overlong=args.overlong, seed=args.seed,
                   empty=args.empty_records, seq2seq=seq2seq)
    train_ds = SFTDataset(args.dataset, tokenizer, max_datasets_size=args.max_datasets_size, **data_kw)
    eval_ds = None
    if args.eval_dataset:
        eval_ds = SFTDataset(args.eval_dataset, tokenizer, **data_kw)
    elif args.eval_ratio > 0:
        train_ds, eval_ds = split_dataset(train_ds, args.eval_ratio, args.seed)

    packing = cli.packing_from_args(args)  # before the model loads
    actor_cls = Seq2SeqActor if seq2seq else Actor
    model = actor_cls.from_pretrained(args.pretrain, family=args.model, lora=cli.lora_settings(args),
                                      grad_checkpoint=args.grad_checkpoint, trust_remote_code=args.trust_remote_code,
                                      frozen_dtype=args.frozen_dtype, **quant)
    cli.neftune_from_args(model, args)
    attention = packing_attention(model)
    model = strategy.prepare_model(model)
    collate = SFTCollator(tokenizer.pad_token_id)
    train_collate = PackingCollator(tokenizer.pad_token_id, args.max_len, attention=attention) if packing else collate
    train_dl = strategy.setup_dataloader(train_ds, args.batch_size, shuffle=True, collate_fn=train_collate,
                                         drop_last=True, lengths=cli.group_lengths(args, train_ds))
    eval_dl = (strategy.setup_dataloader(eval_ds, args.batch_size, shuffle=False, collate_fn=collate)
               if eval_ds is not None else None)

    trainer = SFTTrainer(model, strategy, train_dl, eval_dl, train_config=cli.train_config(args), tokenizer=tokenizer,
                         merge_lora=args.merge_lora_weights, run_config=vars(args))
    trainer.fit(resume_from=resolve_resume(args.resume, args.save_path))


if __name__ == "__main__":
    cli.run(main)
