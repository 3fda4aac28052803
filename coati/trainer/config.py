"""The supervised loop's hyper-parameters (SFT, reward model, DPO), declared once.

``examples/train_sft.py``, ``train_reward_model.py`` and ``train_dpo.py`` make their "training" and "logging
and checkpoints" flags from :class:`TrainConfig` (``train_prompts.py`` the latter), the trainers take it, and the
built-in pipeline builds its stages from it. A script's own defaults (SFT accumulates 8 micro-batches) are
passed to ``add_config_args(defaults=...)`` next to its other flags.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..utils.config import check_bounds, option
from ..utils.optim import OPTIM_HELP, OPTIMIZERS, check_optimizer

T, L = "training", "logging and checkpoints"
LR_SCHEDULES = ("cosine", "linear", "constant")  # transformers' names; each after a linear warmup
SAVE_INTERVAL_HELP = "checkpoint every N {} (0 = only the final model)"  # train_prompts.py counts episodes


@dataclass(frozen=True)
class TrainConfig:
    """Field names are the scripts' flag names; a value outside a field's bounds raises UsageError. Without
    ``save_path`` a trainer saves nothing (the scripts' default is ``output``)."""

    batch_size: int = option(4, "micro-batch size per process (reward model and DPO: pairs; KTO: samples)",
                             bounds=">= 1", group=T)
    accumulation_steps: int = option(1, "micro-batches per optimizer step", bounds=">= 1", group=T)
    optim: str = option("adamw_torch", OPTIM_HELP, choices=list(OPTIMIZERS), group=T)
    lr: float = option(5e-6, "peak learning rate (warmup then --lr_scheduler)", bounds="> 0", group=T)
    lr_scheduler: str = option("cosine", "learning-rate schedule after the linear warmup", choices=LR_SCHEDULES,
                               group=T)
    weight_decay: float = option(0.0, "decoupled weight decay (as AdamW's)", bounds=">= 0", group=T)
    warmup_ratio: float = option(0.03, "share of optimizer steps spent warming up", bounds="[0, 1]", group=T)
    max_epochs: int = option(1, "passes over the training data", bounds=">= 1", group=T)
    max_steps: int | None = option(None, "stop after this many optimizer steps", bounds=">= 1", group=T)
    eval_interval: int = option(0, "evaluate every N steps (0 = each epoch end)", bounds=">= 0", group=T)
    early_stop_patience: int = option(0, "stop when the held-out metric the stage watches (SFT: loss; reward model: "
                                         "pair accuracy; DPO: reward accuracy) has not beaten its best by "
                                         "--early_stop_min_delta for this many evaluations in a row (0 = off)",
                                      bounds=">= 0", group=T)
    early_stop_min_delta: float = option(0.005, "the gain over the best that counts as progress for "
                                                "--early_stop_patience", bounds=">= 0", group=T)
    save_path: str | None = option(None, "where the final model (and checkpoints/) go", group=L)
    save_interval: int = option(0, SAVE_INTERVAL_HELP.format("optimizer steps"), bounds=">= 0", group=L)
    save_total_limit: int = option(0, "keep only the newest N checkpoints (0 = all)", bounds=">= 0", group=L)
    need_optim_ckpt: bool = option(True, "store optimizer state in checkpoints (needed for exact resume)", group=L)
    log_interval: int = option(10, "log metrics every N steps", bounds=">= 1", group=L)
    log_dir: str | None = option(None, "metrics.jsonl / tensorboard dir (default: --save_path)", group=L)
    use_tensorboard: bool = option(False, "also log to tensorboard", group=L)
    use_wandb: bool = option(False, "also log to Weights & Biases", group=L)

    def __post_init__(self) -> None:
        check_bounds(self)
        check_optimizer(self.optim, accumulation_steps=self.accumulation_steps)
