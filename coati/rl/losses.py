"""Policy and value losses and how per-token losses become one number.

Policy losses are registered by name (``--policy_loss``); each returns ``(loss, metrics)`` with metrics as
detached 0-d tensors, aggregated like the loss: pg_clipfrac (share of tokens whose clipped branch is taken),
pg_clipfrac_high / _low (ratio above 1 + clip_high with A > 0, below 1 - clip_low with A < 0), ppo_kl (KL(old ||
new) estimated as ratio - 1 - log ratio), ratio_max / ratio_min (over valid tokens: 1 on the first update of a
batch, when the policy is the one that sampled).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..models.utils import masked_mean
from .kl import LOG_RATIO_CLAMP

POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {}
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def register_policy_loss(name: str):
    def deco(fn):
        POLICY_LOSSES[name] = fn
        return fn
    return deco


# ----- aggregation ---------------------------------------------------------------------------------------

def agg_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str, norm_len: int | None = None) -> torch.Tensor:
    """Reduce a ``(B, A)`` per-token loss to a scalar.

    ``token_mean``: every valid token of the batch weighs the same (DAPO). ``seq_mean_token_mean``: mean per
    sequence, then over sequences (PPO, GRPO). ``seq_mean_token_sum``: per-sequence sum, then the mean over
    sequences: the sequence-level objective ``A * log pi(y)`` (RLOO), every token of every sequence weighted
    alike. ``seq_mean_token_sum_norm``: per-sequence sum divided by the constant ``norm_len`` (Dr. GRPO;
    default the action width), then the mean over sequences, so no length bias enters through the normaliser.
    """
    m = mask.to(loss.dtype)
    if mode == "token_mean":
        return (loss * m).sum() / m.sum().clamp(min=1.0)
    if mode == "seq_mean_token_mean":
        return masked_mean(loss, mask, dim=-1).mean()
    if mode == "seq_mean_token_sum":
        return (loss * m).sum(-1).mean()
    if mode == "seq_mean_token_sum_norm":
        return ((loss * m).sum(-1) / float(norm_len or loss.size(-1))).mean()
    raise ValueError(f"loss aggregation must be one of {AGG_MODES}, got {mode!r}")


def _clipped_surrogate(ratio: torch.Tensor, log_ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                       clip_low: float, clip_high: float | None, dual_clip: float | None, agg_mode: str,
                       norm_len: int | None, is_weights: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)``, with dual clip, times the rollout-correction
    weights ``is_weights`` when given (:mod:`coati.rl.rollout_is`), aggregated, and its metrics."""
    clip_high = clip_low if clip_high is None else clip_high
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    loss = -torch.min(surr1, surr2)
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        loss = torch.where(adv < 0, torch.min(loss, -dual_clip * adv), loss)
    if is_weights is not None:
        loss = loss * is_weights.detach().to(loss.dtype)
    with torch.no_grad():
        r, lr = ratio.detach(), log_ratio.detach()
        valid = mask.bool()
        # shares and means stay shares and means whatever the loss sums: per token, or per sequence first
        share_mode = "token_mean" if agg_mode == "token_mean" else "seq_mean_token_mean"
        metrics = {name: agg_loss(x.float(), mask, share_mode) for name, x in (
            ("pg_clipfrac", surr2.detach().lt(surr1.detach())), ("pg_clipfrac_high", (r > 1 + clip_high) & (adv > 0)),
            ("pg_clipfrac_low", (r < 1 - clip_low) & (adv < 0)), ("ppo_kl", r - 1 - lr))}
        metrics["ratio_max"] = r[valid].max() if valid.any() else r.new_tensor(1.0)
        metrics["ratio_min"] = r[valid].min() if valid.any() else r.new_tensor(1.0)
    return agg_loss(loss, mask, agg_mode, norm_len), metrics


@register_policy_loss("ppo")
def ppo_clip_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float | None = None,
                  dual_clip: float | None = None, agg_mode: str = "seq_mean_token_mean",
                  norm_len: int | None = None, is_weights: torch.Tensor | None = None,
                  **_: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate ``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)`` per token.

    ``clip_high`` defaults to ``clip_low`` (PPO); a larger one is DAPO's clip-higher, which lets
    low-probability tokens grow. ``dual_clip`` (c > 1) bounds the loss of negative-advantage tokens by
    ``-c A`` so a huge ratio cannot blow the step up (dual-clip PPO). The log-ratio is clamped to
    ``+-LOG_RATIO_CLAMP`` before ``exp``.
    """
    log_ratio = (log_probs.float() - old_log_probs.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return _clipped_surrogate(log_ratio.exp(), log_ratio, advantages.float(), mask, clip_low, clip_high, dual_clip,
                              agg_mode, norm_len, is_weights)


@register_policy_loss("gspo")
def gspo_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              *, clip_low: float = 3e-4, clip_high: float | None = 4e-4, dual_clip: float | None = None,
              agg_mode: str = "seq_mean_token_mean", norm_len: int | None = None,
              is_weights: torch.Tensor | None = None, **_: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO: one importance ratio per sequence, ``s = exp(mean_t(log pi - log pi_old))`` over its valid
    tokens, clipped with GSPO's small ranges. Written per token as ``sg[s] * pi_t / sg[pi_t]`` so the value is
    ``s`` and the gradient is ``s`` times the sequence's mean token-log-prob gradient. ``dual_clip`` bounds a
    negative-advantage sequence's loss by ``-c A`` (the sequence-level dual clip: every token carries ``s``)."""
    log_ratio = log_probs.float() - old_log_probs.float()
    seq_log_ratio = masked_mean(log_ratio, mask, dim=-1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    token_log_ratio = seq_log_ratio.detach().unsqueeze(-1) + log_probs.float() - log_probs.float().detach()
    return _clipped_surrogate(token_log_ratio.exp(), token_log_ratio, advantages.float(), mask, clip_low, clip_high,
                              dual_clip, agg_mode, norm_len, is_weights)


def _seq_then_batch_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(x, mask, dim=-1).mean()


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
