"""Losses for SFT and reward modelling (PPO's policy and value losses are in :mod:`coati.rl.losses`)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import IGNORE_INDEX


class GPTLMLoss(nn.Module):
    """Next-token cross-entropy: ``logits[:, t]`` predicts ``labels[:, t+1]``; labels ``-100`` are ignored.

    ``reduction="mean"`` divides by the number of counted tokens in the batch (0 tokens gives 0, not NaN, so
    a fully masked row or batch is harmless); ``"sum"`` returns the plain sum so trainers can normalise by a
    token count gathered across micro-batches and ranks.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        shift_logits = logits[..., :-1, :].float()
        shift_labels = labels[..., 1:].to(shift_logits.device)
        total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                ignore_index=self.ignore_index, reduction="sum")
        if reduction == "sum":
            return total
        count = shift_labels.ne(self.ignore_index).sum()
        return total / count.clamp(min=1)

    def from_log_probs(self, log_probs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The same loss from the labelled tokens' log-probs: per token ``(B, T - 1)`` (0 where the label is
        ignored) or their sum (``Actor(..., labels=labels, reduction="sum")``), so no full logits are held."""
        total = -log_probs.float().sum()
        if reduction == "sum":
            return total
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        return total / labels[..., 1:].ne(self.ignore_index).sum().clamp(min=1)


class LogSigLoss(nn.Module):
    """Pairwise ranking loss ``-log sigmoid(chosen - rejected - margin)``, averaged over pairs."""

    def __init__(self, margin: float = 0.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, chosen_reward: torch.Tensor, reject_reward: torch.Tensor) -> torch.Tensor:
        return -F.logsigmoid(chosen_reward.float() - reject_reward.float() - self.margin).mean()


class LogExpLoss(nn.Module):
    """Pairwise ranking loss ``log(1 + exp(rejected - chosen + margin))`` (softplus, numerically stable).

    Mathematically equal to :class:`LogSigLoss`; kept because Coati exposes both (``--loss_fn log_exp``).
    """

    def __init__(self, margin: float = 0.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, chosen_reward: torch.Tensor, reject_reward: torch.Tensor) -> torch.Tensor:
        return F.softplus(reject_reward.float() - chosen_reward.float() + self.margin).mean()
