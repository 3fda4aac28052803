"""Critic and reward model on one frozen base (``--share_critic_reward_base``).

PPO holds four models; with LoRA the actor's frozen base already doubles as the reference policy (adapter
disabled). Here the critic's frozen base also serves the reward model: one peft model carries the critic's
trainable adapter (``default``) and, when the reward model was trained as a LoRA adapter, that adapter frozen
as ``reward``; a reward model saved as full weights *is* the base, run with the critic's adapter disabled.
Each role keeps its own fp32 value head. A run then holds two base copies instead of four.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from .base import Critic, RewardModel
from .lora import LoraSettings

REWARD_ADAPTER = "reward"
logger = logging.getLogger(__name__)


@contextlib.contextmanager
def active_adapter(model: nn.Module, name: str | None) -> Iterator[None]:
    """Run a peft model with adapter ``name`` (None: the base alone, every adapter off), then restore the
    previous adapter and every ``requires_grad`` flag (peft's ``set_adapter`` makes the active one trainable)."""
    if name is None:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    if name == previous:
        yield
        return
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for p, flag in flags:
            p.requires_grad_(flag)


class SharedBaseRewardModel(RewardModel):
    """A reward model running on another model's peft model (``adapter``: its frozen adapter, or None for the
    base alone) with its own value head.

    The shared model is deliberately not a registered submodule: freezing, moving or offloading this reward
    model (as strategies and PPO do) touches only its value head, never the critic that owns the base.
    """

    shares_base = True  # strategies that shard models refuse it (see quant.check_strategy_support)

    def __init__(self, shared: nn.Module, value_head: nn.Linear, adapter: str | None = None) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "model", shared)
        self.value_head = value_head
        self.adapter = adapter

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Every score (``values``, ``forward``) reads the body through here, with this model's adapter on."""
        with active_adapter(self.model, self.adapter):
            return super().hidden_states(input_ids, attention_mask, position_ids)

    def save_pretrained(self, path: str | Path, tokenizer: Any = None, merge_lora: bool = False,
                        exact: bool = False) -> None:
        raise NotImplementedError("a reward model sharing the critic's base is frozen: the reward model dir it was "
                                  "loaded from is its checkpoint")


def _same_lora_shape(a: Any, b: Any) -> bool:
    def targets(c: Any) -> Any:
        t = c.target_modules
        return t if isinstance(t, str) else frozenset(t or ())

    return (a.r, a.lora_alpha, targets(a), a.fan_in_fan_out) == (b.r, b.lora_alpha, targets(b), b.fan_in_fan_out)


def shared_critic_and_reward(path: str | Path, *, lora: LoraSettings, reward_adapter: str | Path | None = None,
                             family: str = "auto", grad_checkpoint: bool = False,
                             **load_kwargs: Any) -> tuple[Critic, RewardModel]:
    """A LoRA critic on the reward model's base and a reward model sharing that base.

    ``path``: the reward model's full-weight dir (its ``value_head.safetensors`` beside it), or the base
    ``reward_adapter`` (a LoRA reward model dir, value head beside it) was trained on. As an unshared critic
    loaded from the reward model would, the critic starts with the reward model's value head and, when the
    adapter shapes match, its adapter weights. ``load_kwargs`` go to ``Critic.from_pretrained`` (e.g.
    ``quant="4bit"``).
    """
    if lora is None or not lora.enabled:
        raise ValueError("--share_critic_reward_base needs --lora_rank > 0: the shared base must stay frozen")
    critic = Critic.from_pretrained(path, family=family, lora=lora, grad_checkpoint=grad_checkpoint, **load_kwargs)
    adapter = None
    if reward_adapter is not None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        peft_model = critic.model
        peft_model.load_adapter(str(reward_adapter), adapter_name=REWARD_ADAPTER, is_trainable=False)
        for name, p in peft_model.named_parameters():
            if f".{REWARD_ADAPTER}." in name:
                p.requires_grad_(False)
        critic._load_extra(Path(reward_adapter))
        active = peft_model.active_adapter
        if _same_lora_shape(peft_model.peft_config[active], peft_model.peft_config[REWARD_ADAPTER]):
            state = get_peft_model_state_dict(peft_model, adapter_name=REWARD_ADAPTER)
            set_peft_model_state_dict(peft_model, state, adapter_name=active)
        else:
            logger.info("critic adapter starts at zero: its LoRA shape differs from the reward adapter's")
        adapter = REWARD_ADAPTER
    head = copy.deepcopy(critic.value_head).requires_grad_(False)
    return critic, SharedBaseRewardModel(critic.model, head, adapter)
