"""Losses for SFT, reward modelling and PPO.

PPO losses average per sequence first (masked mean over its action tokens), then over sequences, so long
responses do not dominate a batch. They return ``(loss, metrics)`` where metrics are detached 0-d tensors
(converted to floats only when logged, to avoid a device sync per step).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .utils import masked_mean

IGNORE_INDEX = -100


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


class PtxLoss(GPTLMLoss):
    """PPO-ptx: the language-modelling loss on a pretraining batch, mixed into the actor loss."""


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


def _seq_then_batch_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    return masked_mean(x, mask, dim=-1).mean()


class PolicyLoss(nn.Module):
    """PPO clipped surrogate: ``-min(ratio * A, clip(ratio, 1-eps, 1+eps) * A)``.

    Metrics: ``clip_frac`` (share of tokens where the clipped branch is taken) and ``approx_kl``
    (``ratio - 1 - log ratio``: KL(old || new) estimated on tokens sampled from the old policy).
    """

    def __init__(self, clip_eps: float = 0.2) -> None:
        super().__init__()
        self.clip_eps = clip_eps

    def forward(self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        log_ratio = log_probs.float() - old_log_probs.float()
        ratio = log_ratio.exp()
        advantages = advantages.float()
        surr1 = ratio * advantages
        surr2 = ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps) * advantages
        loss = _seq_then_batch_mean(-torch.min(surr1, surr2), action_mask)
        with torch.no_grad():
            clip_frac = _seq_then_batch_mean(surr2.lt(surr1).float(), action_mask)
            approx_kl = _seq_then_batch_mean(ratio - 1 - log_ratio, action_mask)
        return loss, {"clip_frac": clip_frac, "approx_kl": approx_kl}


class ValueLoss(nn.Module):
    """PPO clipped value loss: ``0.5 * max((v - R)^2, (v_clip - R)^2)`` with
    ``v_clip = old + clip(v - old, -eps, eps)``, masked to the action tokens.

    Metric ``clip_frac``: share of tokens where the clipped error is the larger one.
    """

    def __init__(self, clip_eps: float = 0.4) -> None:
        super().__init__()
        self.clip_eps = clip_eps

    def forward(self, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                action_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values, old_values, returns = values.float(), old_values.float(), returns.float()
        values_clipped = old_values + (values - old_values).clamp(-self.clip_eps, self.clip_eps)
        err = (values - returns) ** 2
        err_clipped = (values_clipped - returns) ** 2
        loss = 0.5 * _seq_then_batch_mean(torch.max(err, err_clipped), action_mask)
        with torch.no_grad():
            clip_frac = _seq_then_batch_mean(err_clipped.gt(err).float(), action_mask)
        return loss, {"clip_frac": clip_frac}
