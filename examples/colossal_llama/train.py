"""Colossal-LLaMA step 5: continual pre-training and SFT on prepared (spliced, binned) data, with
Colossal-LLaMA's flags, on coati's strategies and SFTTrainer.

    torchrun --standalone --nproc_per_node 8 examples/colossal_llama/train.py --pretrained EXTENDED_MODEL \
        --dataset PREPARED_DIR [PREPARED_DIR ...] --plugin zero2 --save_interval 1000 --save_dir OUT \
        --tensorboard_dir OUT/tb --num_epochs 1 --micro_batch_size 2 --lr 1e-4 --mixed_precision bf16

Each epoch walks buckets (bin b of every sub-dataset, in a seeded order). --plugin maps onto coati's
strategies: gemini / gemini_auto / zero2 / zero2_cpu run ColossalAI's plugins (colossalai_*) where ColossalAI
and a GPU are present, and otherwise fall back to torch FSDP2 with the same sharding, saying so; 3d has no
coati counterpart (no tensor / pipeline parallelism) and runs FSDP2 (--zero 0: DDP); naive / ddp / fsdp pick
coati's strategies directly. --load_checkpoint takes a training checkpoint (resume: same step, optimizer,
scheduler and data position) or a model dir (a new stage that starts at step 0 from those weights).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from coati.dataset import SFTCollator
from coati.dataset.buckets import BinnedDataset, BucketSampler
from coati.errors import MissingInputError, UsageError
from coati.models import Actor
from coati.models.loading import attention_kwargs
from coati.trainer import SFTTrainer
from coati.trainer.base import latest_checkpoint, resolve_resume
from coati.trainer.strategies import make_strategy
from coati.trainer.strategies.base import StrategyUnavailableError
from coati import cli
from coati.utils.optim import OPTIM_HELP, OPTIMIZERS, check_optimizer
from coati.utils.tokenizer import load_tokenizer

logger = logging.getLogger("coati")

# plugin -> (coati strategy where ColossalAI runs, its keyword arguments, FSDP2 fallback keyword arguments)
PLUGINS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "gemini": ("colossalai_gemini", {"placement_policy": "static"}, {"zero_stage": 3}),
    "gemini_auto": ("colossalai_gemini", {"placement_policy": "auto"}, {"zero_stage": 3}),
    "zero2": ("colossalai_zero2", {}, {"zero_stage": 2}),
    "zero2_cpu": ("colossalai_zero2_cpu", {}, {"zero_stage": 2, "cpu_offload": True}),
}
COATI_STRATEGIES = ("naive", "ddp", "fsdp")


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser("Colossal-LLaMA: continual pre-training / SFT on prepared, bucketed data")
    p.add_argument("--pretrained", required=True, help="model dir to start from (and its tokenizer)")
    p.add_argument("--dataset", nargs="+", required=True,
                   help="prepared data (prepare_pretrain_dataset.py / prepare_sft_dataset.py output): prepared "
                        "dirs, their arrow/, category dirs (arrow/<category>) or bin dirs (arrow/<category>/"
                        "part-NNNNN, as Colossal-LLaMA lists them); each category is one sub-dataset of "
                        "bucket-based training")
    p.add_argument("--plugin", default="gemini", choices=[*PLUGINS, "3d", *COATI_STRATEGIES],
                   help="gemini / gemini_auto / zero2 / zero2_cpu: ColossalAI's plugin where ColossalAI and a GPU "
                        "run, else torch FSDP2 with the same sharding; 3d: FSDP2 with --tp tensor parallelism "
                        "(coati has no pipeline parallelism); naive / ddp / fsdp: coati's strategies")
    p.add_argument("--load_checkpoint", default=None,
                   help="a training checkpoint (a checkpoints/step_N dir, or a save dir holding checkpoints/ but "
                        "no final model): resume exactly; a model dir (a finished stage's save dir): its weights "
                        "start a new stage at step 0")
    p.add_argument("--save_interval", type=cli.Bounded(int, ">= 0"), default=1000, help="checkpoint every N optimizer steps (0 = off)")
    p.add_argument("--save_dir", default="output", help="final model, checkpoints/ and metrics go here")
    p.add_argument("--tensorboard_dir", default=None, help="also log to tensorboard in this dir")
    p.add_argument("--config_file", default=None,
                   help="JSON file recording every argument (default: SAVE_DIR/train_config.json)")
    p.add_argument("--num_epochs", type=cli.Bounded(int, ">= 1"), default=1, help="passes over the data")
    p.add_argument("--accumulation_steps", type=cli.Bounded(int, ">= 1"), default=8, help="micro-batches per optimizer step")
    p.add_argument("--micro_batch_size", type=cli.Bounded(int, ">= 1"), default=2, help="samples per process per micro-batch")
    p.add_argument("--lr", type=cli.Bounded(float, "> 0"), default=3e-4, help="peak learning rate (warmup then cosine)")
    p.add_argument("--max_length", type=cli.Bounded(int, ">= 1"), default=8192, help="samples longer than this are truncated")
    p.add_argument("--mixed_precision", default="fp16", choices=["fp16", "bf16", "no"],
                   help="compute precision (trained weights stay fp32 masters); fp16 needs a GPU")
    p.add_argument("--gradient_clipping", type=cli.Bounded(float, ">= 0"), default=1.0, help="clip the global gradient norm (0 = off)")
    p.add_argument("-w", "--weight_decay", type=cli.Bounded(float, ">= 0"), default=0.1, help="decoupled weight decay (as AdamW's)")
    p.add_argument("--optim", default="adamw_torch", choices=list(OPTIMIZERS), help=OPTIM_HELP)
    p.add_argument("-s", "--warmup_steps", type=cli.Bounded(int, ">= 0"), default=None,
                   help="linear warmup steps before the cosine decay (default: 3%% of the steps)")
    p.add_argument("--use_grad_checkpoint", action=cli.BoolFlag, default=False, help="gradient checkpointing")
    p.add_argument("--use_flash_attn", action=cli.BoolFlag, default=False,
                   help="FlashAttention-2 kernels: the training scripts' --attn_implementation flash_attention_2 "
                        "(needs a CUDA GPU and flash-attn or kernels; refused before training without them)")
    p.add_argument("--freeze_non_embeds_params", action=cli.BoolFlag, default=False,
                   help="train only the input embedding and the LM head (the new vocabulary's rows with them)")
    p.add_argument("--tp", type=cli.Bounded(int, ">= 1"), default=1,
                   help="tensor parallel size (3d plugin; also with --plugin fsdp): the training scripts' --tp_size")
    p.add_argument("--zero", type=int, default=1, choices=[0, 1, 2],
                   help="ZeRO stage of the 3d plugin: 0 = DDP, 1 / 2 = FSDP2 with ZeRO-2 sharding")
    p.add_argument("--seed", type=cli.Bounded(int, ">= 0"), default=42, help="seed for init and the bucket order")
    p.add_argument("--log_interval", type=cli.Bounded(int, ">= 1"), default=10, help="log metrics every N steps")
    cli.add_neftune_args(p.add_argument_group("NEFTune (SFT)"))
    return p


def resolve_strategy(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(coati strategy name, its keyword arguments) for --plugin, falling back to FSDP2 where ColossalAI
    cannot run (the reason logged)."""
    if args.tp != 1:
        if args.plugin not in ("3d", "fsdp"):
            raise UsageError(f"--tp {args.tp}: tensor parallelism runs with --plugin 3d or fsdp, not {args.plugin}")
        with cli.flag_errors():
            cli.check_tensor_parallel(args.tp, "fsdp", [args.pretrained])
        if args.plugin == "3d" and cli.rank() == 0:
            logger.warning("--plugin 3d: coati has no pipeline parallelism; running fsdp with ZeRO-2 sharding "
                           "over the data-parallel ranks and tensor parallelism %d", args.tp)
        return "fsdp", {"zero_stage": 2, "tp_size": args.tp} if args.plugin == "3d" else {"tp_size": args.tp}
    if args.plugin in COATI_STRATEGIES:
        return args.plugin, {}
    if args.plugin == "3d":
        if cli.rank() == 0:
            logger.warning("--plugin 3d --tp 1 (and coati has no pipeline parallelism): running %s",
                           "ddp" if args.zero == 0 else "fsdp with ZeRO-2 sharding")
        return ("ddp", {}) if args.zero == 0 else ("fsdp", {"zero_stage": 2})
    name, kwargs, fallback = PLUGINS[args.plugin]
    from coati.trainer.strategies.colossalai import check_available

    try:
        check_available(name)
    except StrategyUnavailableError as err:
        if cli.rank() == 0:  # every rank falls back alike: say so once
            logger.warning("--plugin %s: %s Falling back to --strategy fsdp %s.", args.plugin, err, fallback)
        return "fsdp", fallback
    return name, kwargs


def checkpoint_kind(path: str | None) -> str | None:
    """"state" for a training checkpoint, "model" for a model dir, None when no --load_checkpoint."""
    if path is None:
        return None
    p = Path(path)
    if (p / "trainer_state" / "state.pt").is_file():
        return "state"
    if (p / "config.json").is_file():  # a finished stage's save_dir: its model, even with checkpoints/ inside
        return "model"
    if latest_checkpoint(p) is not None:  # an interrupted run's save_dir
        return "state"
    raise MissingInputError(f"--load_checkpoint {path}: neither a training checkpoint (trainer_state/state.pt, "
                            "or checkpoints/step_N under it) nor a model dir (config.json)")


def freeze_non_embeddings(model: Actor) -> list[str]:
    """requires_grad only on the input embedding and the LM head; returns the names left trainable."""
    lm = model.base_lm
    keep = {id(lm.get_input_embeddings().weight), id(lm.get_output_embeddings().weight)}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def truncating(collate: SFTCollator, max_length: int):
    def collate_fn(batch: list[dict]) -> dict:
        return collate([{k: v[:max_length] for k, v in item.items()} for item in batch])
    return collate_fn


def write_config(args: argparse.Namespace, strategy: str, strategy_kwargs: dict[str, Any]) -> Path:
    path = Path(args.config_file or Path(args.save_dir) / "train_config.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**vars(args), "resolved_strategy": strategy, "resolved_strategy_kwargs": strategy_kwargs}
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def main(argv: list[str] | None = None) -> SFTTrainer:
    args = build_parser().parse_args(argv)
    attn = attention_kwargs("flash_attention_2" if args.use_flash_attn else "sdpa")  # refused up front
    cli.setup_logging(cli.rank() == 0)
    kind = checkpoint_kind(args.load_checkpoint)
    name, strategy_kwargs = resolve_strategy(args)
    check_optimizer(args.optim, accumulation_steps=args.accumulation_steps, strategy=name,
                    precision=args.mixed_precision)
    with cli.flag_errors():
        strategy = make_strategy(name, seed=args.seed, mixed_precision=args.mixed_precision,
                                 grad_clip=args.gradient_clipping, **strategy_kwargs)
    if strategy.is_rank0():
        logger.info("arguments recorded in %s", write_config(args, name, strategy_kwargs))
    tokenizer = load_tokenizer(args.pretrained)
    dataset = BinnedDataset(args.dataset)

    model = Actor.from_pretrained(args.load_checkpoint if kind == "model" else args.pretrained,
                                  grad_checkpoint=args.use_grad_checkpoint, **attn)
    if args.freeze_non_embeds_params:
        logger.info("training only %s", ", ".join(freeze_non_embeddings(model)))
    cli.neftune_from_args(model, args)
    model = strategy.prepare_model(model)

    sampler = BucketSampler(dataset.bins, num_replicas=strategy.dp_size, rank=strategy.dp_rank, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.micro_batch_size, sampler=sampler, drop_last=True,
                        collate_fn=truncating(SFTCollator(tokenizer.pad_token_id), args.max_length))
    trainer = SFTTrainer(
        model, strategy, loader, lr=args.lr, weight_decay=args.weight_decay, max_epochs=args.num_epochs,
        accumulation_steps=args.accumulation_steps, save_path=args.save_dir, save_interval=args.save_interval,
        log_interval=args.log_interval, log_dir=args.tensorboard_dir,
        use_tensorboard=args.tensorboard_dir is not None, tokenizer=tokenizer, run_config=vars(args), optim=args.optim)
    if args.warmup_steps is not None:
        from transformers import get_cosine_schedule_with_warmup  # imports bitsandbytes, which talks on import

        trainer.scheduler = get_cosine_schedule_with_warmup(
            strategy.base_optimizer(trainer.optimizer), args.warmup_steps, max(1, trainer.total_steps))
    trainer.fit(resume_from=resolve_resume(args.load_checkpoint, args.save_dir) if kind == "state" else None)
    return trainer


if __name__ == "__main__":
    cli.run(main)
