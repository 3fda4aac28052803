"""Rollout correction: when another engine (vLLM) samples, its log-probs ``log mu`` differ a little from the
trainer's ``log pi_old`` of the same tokens (kernels, precision), so the samples are slightly off-policy. These pure
functions measure the gap and reweight the policy loss by truncated importance sampling (TIS, Yao et al. 2025):

* ``token``: ``w_t = min(exp(log pi_old_t - log mu_t), cap)`` per token;
* ``sequence``: ``w = min(exp(sum_t (log pi_old_t - log mu_t)), cap)``, one weight for every token of a sequence;
* ``off``: no weights.

Outlier masking (``mask_threshold`` t > 1): a sequence whose geometric-mean ratio ``exp(mean_t(log pi_old_t -
log mu_t))`` lies outside ``[1/t, t]`` gets weight 0 (it stays in the loss's normaliser). Weights are detached
(they carry no gradient) and 0 off the action mask.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..models.utils import masked_mean
from .kl import LOG_RATIO_CLAMP

ROLLOUT_IS: dict[str, Callable[..., torch.Tensor | None]] = {}


def register_rollout_is(name: str):
    def deco(fn):
        ROLLOUT_IS[name] = fn
        return fn
    return deco


def _log_ratio(old_log_probs: torch.Tensor, engine_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (old_log_probs.float() - engine_log_probs.float()) * mask.float()


@register_rollout_is("off")
def no_rollout_is(old_log_probs: torch.Tensor, engine_log_probs: torch.Tensor, mask: torch.Tensor, *,
                  cap: float = 2.0) -> None:
    return None


@register_rollout_is("token")
def token_rollout_is(old_log_probs: torch.Tensor, engine_log_probs: torch.Tensor, mask: torch.Tensor, *,
                     cap: float = 2.0) -> torch.Tensor:
    """``min(pi_old_t / mu_t, cap)`` per valid token, ``(B, A)``."""
    log_ratio = _log_ratio(old_log_probs, engine_log_probs, mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_ratio.exp().clamp(max=cap) * mask.float()


@register_rollout_is("sequence")
def sequence_rollout_is(old_log_probs: torch.Tensor, engine_log_probs: torch.Tensor, mask: torch.Tensor, *,
                        cap: float = 2.0) -> torch.Tensor:
    """``min(prod_t pi_old_t / mu_t, cap)`` per sequence, on each of its valid tokens, ``(B, A)``."""
    seq = _log_ratio(old_log_probs, engine_log_probs, mask).sum(-1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return seq.exp().clamp(max=cap).unsqueeze(-1) * mask.float()


def rollout_outliers(old_log_probs: torch.Tensor, engine_log_probs: torch.Tensor, mask: torch.Tensor,
                     threshold: float) -> torch.Tensor:
    """``(B,)`` True for a sequence whose geometric-mean ratio ``exp(mean_t log(pi_old_t / mu_t))`` is outside
    ``[1/threshold, threshold]``."""
    if threshold <= 1:
        raise ValueError(f"the outlier threshold must be > 1, got {threshold}")
    geo = masked_mean(_log_ratio(old_log_probs, engine_log_probs, mask), mask, dim=-1)
    return geo.abs() > torch.log(torch.tensor(float(threshold)))


def rollout_is_weights(mode: str, old_log_probs: torch.Tensor, engine_log_probs: torch.Tensor, mask: torch.Tensor,
                       *, cap: float = 2.0, mask_threshold: float | None = None) -> torch.Tensor | None:
    """The ``(B, A)`` weights of ``mode`` (``ROLLOUT_IS``), outlier sequences zeroed; None for ``off`` without
    masking."""
    weights = ROLLOUT_IS[mode](old_log_probs, engine_log_probs, mask, cap=cap)
    if mask_threshold is not None:
        keep = ~rollout_outliers(old_log_probs, engine_log_probs, mask, mask_threshold)
        base = mask.float() if weights is None else weights
        weights = base * keep.float().unsqueeze(-1)
    return None if weights is None else weights.detach()


def logprob_diff_stats(old_log_probs: torch.Tensor, engine_log_probs: torch.Tensor, mask: torch.Tensor,
                       threshold: float) -> dict[str, torch.Tensor]:
    """Per sequence ``(B,)``: the mean and the max of ``|log pi_old - log mu|`` over its valid tokens, and the
    share of those above ``threshold``."""
    diff = _log_ratio(old_log_probs, engine_log_probs, mask).abs()
    valid = mask.bool()
    return {"logprob_diff": masked_mean(diff, mask, dim=-1),
            "logprob_diff_max": diff.masked_fill(~valid, 0.0).amax(-1),
            "logprob_diff_over": masked_mean((diff > threshold).float(), mask, dim=-1)}
