"""The optimizers of ``--optim`` (transformers' ``TrainingArguments.optim`` names), declared once, and the
combinations they cannot train, refused in one line before anything loads. Built by
:func:`coati.trainer.optim.make_optimizer`; the supervised TrainConfig and the RL config both take the name."""
from __future__ import annotations

from ..errors import UsageError

# transformers' TrainingArguments.optim names; what each holds: README, Memory-light training
OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "adafactor", "lomo", "adalomo")
FUSED = ("lomo", "adalomo")  # update inside backward (`optimizer.fused_backward`)
SHARDING_UNAWARE = ("adamw_bnb_8bit", "paged_adamw_8bit", "adafactor", "adalomo")  # fail on FSDP2's DTensors
OPTIM_HELP = ("optimizer, by transformers' names (README: Memory-light training): AdamW (fused where it can), "
              "bitsandbytes' 8-bit AdamW (paged: state to CPU under GPU memory pressure), Adafactor, or LOMO / AdaLomo "
              "(lomo-optim), which update inside backward and keep no gradient: full fine-tuning, --accumulation_steps "
              "1, one process (lomo also fsdp)")


def check_optimizer(optim: str, *, accumulation_steps: int = 1, strategy: str = "naive", lora: bool = False,
                    ptx: bool = False, precision: str | None = None) -> None:
    """A UsageError saying why, where ``optim`` cannot train as configured."""
    if optim not in OPTIMIZERS:
        raise UsageError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {optim!r}")
    if strategy.startswith("colossalai") and optim != "adamw_torch":
        raise UsageError(f"--optim {optim}: ColossalAI's plugins step their own Adam on their flattened ZeRO shards "
                         "(HybridAdam when offloading); use --optim adamw_torch, or --strategy fsdp")
    if strategy == "fsdp" and optim in SHARDING_UNAWARE:
        raise UsageError(f"--optim {optim} cannot step FSDP2's sharded (DTensor) weights: its state is plain tensors "
                         "shaped like whole weights (bitsandbytes' kernels take plain tensors only); use --optim "
                         f"adamw_torch or lomo under fsdp, or --strategy {'naive' if optim in FUSED else 'ddp'}")
    if optim not in FUSED:
        return
    why = f"--optim {optim} updates each weight inside backward as soon as its gradient exists and keeps none"
    if accumulation_steps > 1:
        raise UsageError(f"{why}, so it cannot accumulate micro-batches: use --accumulation_steps 1 (and a larger "
                         "batch size)")
    if ptx:
        raise UsageError(f"{why}, so PPO-ptx's second backward (the pretraining loss) would be a second update per "
                         "micro-batch: drop --pretrain_dataset (or --ptx_coef 0), or use another --optim")
    if strategy == "ddp":
        raise UsageError(f"{why}, before DDP averages it over the processes, so the replicas would drift apart: use "
                         f"--strategy {'fsdp (or naive)' if optim == 'lomo' else 'naive'}")
    if lora:
        raise UsageError(f"--optim {optim} saves full fine-tuning's gradient and optimizer-state memory; LoRA "
                         "adapters have little of either, so it would only add a backward pass: use --optim "
                         "adamw_torch with LoRA, or --lora_rank 0")
    if precision == "fp16" and optim == "lomo":
        raise UsageError("--optim lomo scales an fp16 loss only when the loss itself is fp16, and coati's fp16 "
                         "computes under autocast over fp32 weights, so its gradients would underflow unscaled: use "
                         "--mixed_precision bf16, or --optim adalomo (which always scales the loss)")
