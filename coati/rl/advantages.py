"""Advantage estimators, registered by name: an algorithm picks one (``--adv_estimator``).

Shapes: ``(B, A)`` for per-action tensors aligned with the last ``A`` tokens of each sequence, ``(B,)`` for
per-sequence ones. ``mask`` marks valid action tokens (1 up to and including the first EOS). ``group`` holds
one integer per sequence naming the prompt it answers (the ``n_samples_per_prompt`` samples of a prompt
share it). ``reduce_sum``, where taken, sums a tensor over every process (the strategy's all-reduce), so
statistics over "the batch" mean the global batch; leave it None on one process.
"""
from __future__ import annotations

from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor] | None

ADV_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}


def register_adv_est(name: str, *, needs_critic: bool = False, needs_groups: bool = False):
    """Register an advantage estimator. ``needs_critic``: it reads a value model's ``values`` (else no critic
    is built); ``needs_groups``: it compares samples of one prompt (so ``n_samples_per_prompt`` must be > 1)."""
    def deco(fn):
        fn.needs_critic, fn.needs_groups = needs_critic, needs_groups
        ADV_ESTIMATORS[name] = fn
        return fn
    return deco


# ----- statistics ----------------------------------------------------------------------------------------

def whiten(x: torch.Tensor, mask: torch.Tensor, reduce_sum: Reduce = None, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the valid entries of the global batch; invalid entries become 0.
    Two passes (mean, then the mean squared deviation), the same arithmetic as PPO's per-batch whitening."""
    x = x.float()
    m = mask.to(torch.float32)
    stats = torch.stack([(x * m).sum(), m.sum()])
    if reduce_sum is not None:
        stats = reduce_sum(stats)
    count = stats[1].clamp(min=1e-8)
    mean = stats[0] / count
    sq = ((x - mean) ** 2 * m).sum()
    if reduce_sum is not None:
        sq = reduce_sum(sq)
    return (x - mean) * torch.rsqrt(sq / count + eps) * m


def group_stats(scores: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence: the size, mean and unbiased std of its group's scores (std 0 for a group of one)."""
    scores = scores.float()
    _, inverse = torch.unique(group, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    count = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, inverse, torch.ones_like(scores))
    total = torch.zeros_like(count).index_add_(0, inverse, scores)
    mean = total / count
    sq = torch.zeros_like(count).index_add_(0, inverse, (scores - mean[inverse]) ** 2)
    std = (sq / (count - 1).clamp(min=1.0)).sqrt()
    return count[inverse], mean[inverse], std[inverse]


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor | None,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token GAE for tensors of shape (batch, num_actions).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where the value
    and advantage after the last valid action token are 0 (the episode ends there). Padded positions
    (action_mask 0) get advantage and return 0. Returns ``(advantages, returns)`` with
    ``returns = advantages + values`` (raw, not whitened: the ``gae`` estimator whitens).
    """
    if rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} differ in shape")
    if action_mask is not None and action_mask.shape != values.shape:
        raise ValueError(f"action_mask {tuple(action_mask.shape)} does not match values {tuple(values.shape)}")
    mask = torch.ones_like(values, dtype=torch.float32) if action_mask is None else action_mask.float()
    values, rewards = values.float() * mask, rewards.float() * mask
    advantages = torch.zeros_like(values)
    next_value = next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m
        advantages[:, t] = adv
        # A padded position resets the recursion, so the token before it sees V=0 and A=0 after it.
        next_value = values[:, t] * m
        next_adv = adv
    returns = (advantages + values) * mask
    return advantages, returns


# ----- advantage estimators ------------------------------------------------------------------------------
# Each returns (advantages, returns), both (B, A) and 0 outside the mask. Keyword arguments an estimator
# does not use are accepted and ignored, so callers pass one set of inputs to any of them.

@register_adv_est("gae", needs_critic=True)
def gae_advantages(*, token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95, whiten_advantages: bool = True, reduce_sum: Reduce = None,
                   **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's generalised advantage estimation on a critic's values; returns are the value targets."""
    advantages, returns = compute_gae(token_rewards, values * mask.to(values.dtype), mask, gamma, lam)
    if whiten_advantages:
        advantages = whiten(advantages, mask, reduce_sum)
    return advantages, returns


def _broadcast(per_seq: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    adv = per_seq.float().unsqueeze(-1) * mask.to(torch.float32)
    return adv, adv


@register_adv_est("grpo", needs_groups=True)
def grpo_advantages(*, scores: torch.Tensor, group: torch.Tensor, mask: torch.Tensor, norm_by_std: bool = True,
                    eps: float = 1e-6, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: ``(r - mean_group) / (std_group + eps)`` on every token. A group of one, or one whose rewards
    are all equal, carries no signal and gets advantage 0."""
    count, mean, std = group_stats(scores, group)
    adv = scores.float() - mean
    if norm_by_std:
        adv = adv / (std + eps)
    return _broadcast(torch.where(count > 1, adv, torch.zeros_like(adv)), mask)


@register_adv_est("dr_grpo", needs_groups=True)
def dr_grpo_advantages(**kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO: the group mean is the baseline, no division by the std (which over-weights easy prompts)."""
    return grpo_advantages(**{**kwargs, "norm_by_std": False})


@register_adv_est("rloo", needs_groups=True)
def rloo_advantages(*, scores: torch.Tensor, group: torch.Tensor, mask: torch.Tensor,
                    **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: each sample's baseline is the mean of the *other* samples of its prompt,
    ``r_i - (sum_g - r_i) / (n - 1)``; a group of one has no baseline and gets 0. With the KL in the reward,
    ``scores`` already carry it (``r - kl_coef * sum_t KL_t``, see the experience maker)."""
    count, mean, _ = group_stats(scores, group)
    scores = scores.float()
    loo = (mean * count - scores) / (count - 1).clamp(min=1.0)
    return _broadcast(torch.where(count > 1, scores - loo, torch.zeros_like(scores)), mask)


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = sum_{k >= t} gamma^(k-t) r_k`` over the valid tokens of each row."""
    m = mask.to(torch.float32)
    rewards = token_rewards.float() * m
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = (rewards[:, t] + gamma * running) * m[:, t]
        out[:, t] = running
    return out


@register_adv_est("reinforce_pp")
def reinforce_pp_advantages(*, token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            reduce_sum: Reduce = None, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: discounted returns of the per-token rewards (score on the last token, KL penalty on
    every token), normalised over the global batch; no critic, no groups."""
    returns = discounted_returns(token_rewards, mask, gamma)
    return whiten(returns, mask, reduce_sum), returns
