"""LoRA through peft: one settings object, one call to add adapters, one to merge them away."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..errors import UsageError
from .families import get_family

TRAIN_BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraSettings:
    """LoRA hyper-parameters.

    ``rank`` 0 disables LoRA. ``alpha`` defaults to ``rank`` (scaling alpha/rank = 1, so changing the rank
    does not change the effective learning rate of the update). ``train_bias`` is peft's ``bias``: ``"none"``,
    ``"all"`` (every bias trains) or ``"lora_only"`` (biases of adapted layers). ``target_modules`` overrides
    the family's targets (module-name suffixes, or ``"all-linear"``).
    """

    rank: int = 0
    alpha: float | None = None
    dropout: float = 0.0
    train_bias: str = "none"
    target_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"LoRA rank must be >= 0, got {self.rank}")
        if self.train_bias not in TRAIN_BIAS_CHOICES:
            raise ValueError(f"lora train_bias must be one of {TRAIN_BIAS_CHOICES}, got {self.train_bias!r}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def peft_config(self, family: str = "auto", model: nn.Module | None = None) -> Any:
        """The peft ``LoraConfig`` for this family (``fan_in_fan_out`` set when the model uses GPT-2 Conv1D; an
        encoder-decoder ``model`` gets peft's seq2seq task type)."""
        from peft import LoraConfig

        targets = self.target_modules if self.target_modules is not None else get_family(family).targets()
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            lora_dropout=self.dropout,
            bias=self.train_bias,
            target_modules=targets,
            fan_in_fan_out=model is not None and _uses_conv1d(model),
            task_type="SEQ_2_SEQ_LM" if model is not None and model.config.is_encoder_decoder else "CAUSAL_LM",
        )


def _uses_conv1d(model: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a core dependency; this only guards odd environments
        return False
    return isinstance(model, PeftModel)


def check_ppo_train_bias(train_bias: str) -> None:
    """Refuse LoRA that trains biases in PPO: peft's ``bias="all"|"lora_only"`` trains the base model's own
    bias tensors, and that base, adapter off, is PPO's reference policy (and, with a shared critic / reward
    base, the reward model), which must not move. A frozen copy of the moving biases would have to be swapped
    in around every reference pass; bias training gives LoRA little, so PPO refuses it instead."""
    if train_bias != "none":
        raise UsageError(f"--lora_train_bias {train_bias} trains the base model's own biases, which PPO's "
                         f"reference policy (the actor with its adapter off) and a shared reward model run on; "
                         f"use --lora_train_bias none for PPO")


def lora_train_bias(model: nn.Module) -> str:
    """peft's ``bias`` setting of ``model``'s active adapter; ``"none"`` for a model without LoRA."""
    return model.peft_config[model.active_adapter].bias if is_peft_model(model) else "none"


def apply_lora(model: nn.Module, settings: LoraSettings | None, family: str = "auto") -> nn.Module:
    """Wrap a HF causal LM with LoRA adapters (a ``PeftModel``; base weights frozen), or return it unchanged
    when ``settings`` is None or has rank 0. Adapters are injected in place, so the wrapped model's own
    submodules (e.g. its transformer body) run through them too."""
    if settings is None or not settings.enabled:
        return model
    from peft import get_peft_model

    return get_peft_model(model, settings.peft_config(family, model))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA weights into the base weights and return the plain HF model (in place: copy first if the
    adapters should keep training). A model without adapters is returned as is."""
    return model.merge_and_unload() if is_peft_model(model) else model
