"""The rollout interface: :class:`Rollout`, :class:`RolloutEngine` and the sampled temperature."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn


@dataclass
class Rollout:
    """Generated samples, shapes ``(B, P + A)`` for the whole sequence and ``(B, A)`` for the response."""

    sequences: torch.Tensor  # prompt (left padded) + response; pad after the first EOS
    attention_mask: torch.Tensor  # prompt mask + valid response tokens
    action_mask: torch.Tensor  # 1 on response tokens up to and including the first EOS
    log_probs: torch.Tensor | None = None  # (B, A) float32 log-probs of the sampled tokens; None unless asked
    # an engine that is not the trainer's module: the sampled tokens' log-probs as it computed them (B, A), and
    # the version of the weights it sampled with (the optimizer step of its last update_weights)
    engine_log_probs: torch.Tensor | None = None
    weight_version: int | None = None

    @property
    def num_actions(self) -> int:
        return self.action_mask.size(1)


@runtime_checkable
class RolloutEngine(Protocol):
    """What the experience maker needs from a generator (see the module doc for the contract)."""

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: dict[str, Any], *,
                 return_log_probs: bool = True) -> Rollout:
        """Sample with ``sampling`` (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``max_new_tokens`` and
        any other generation settings)."""
        ...

    def update_weights(self, weights: nn.Module | dict[str, torch.Tensor], version: int | None = None) -> None:
        """Generate from ``weights`` (the trained module or its state dict) from now on; ``version`` (the
        optimizer step) stamps the rollouts of an engine that records it."""
        ...


def sampling_temperature(sampling: dict[str, Any]) -> float:
    """The temperature of the distribution ``sampling`` samples from: its ``temperature`` when sampling, 1 for
    greedy decoding (which has none)."""
    return float(sampling.get("temperature", 1.0)) if sampling.get("do_sample") else 1.0
