"""Reward shaping: from a sequence's score to the per-token rewards the advantage estimators read (the KL
penalty in the reward, the score on the last token) and DAPO's overlong penalty.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.utils import last_token_index
from .kl import kl_estimate


def compute_reward(r: torch.Tensor, kl_coef: float, log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
                   action_mask: torch.Tensor, reward_clip: float | None = None,
                   kl_estimator: str = "k1") -> torch.Tensor:
    """Per-token PPO rewards ``(B, A)``: ``-kl_coef * (logp - logp_ref)`` (or another estimator of
    :func:`coati.rl.kl.kl_estimate`, clamped as it clamps) on each valid action token, and the sequence reward
    ``r`` (clipped to ``[-reward_clip, reward_clip]`` when given) added on the last valid action token. Positions
    outside ``action_mask`` are 0; a row without valid actions gets all zeros.
    """
    mask = action_mask.float()
    r = r.float().reshape(-1)
    if reward_clip is not None:
        r = r.clamp(-reward_clip, reward_clip)
    rewards = -kl_coef * kl_estimate(log_probs, ref_log_probs, kl_estimator) * mask
    last = last_token_index(action_mask)
    has_action = mask.sum(-1).gt(0).float()
    bonus = F.one_hot(last, num_classes=mask.size(-1)).float() * (r * has_action).unsqueeze(-1)
    return rewards + bonus


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to ``max_len - buffer_len`` tokens, then falling linearly to
    ``-factor`` at ``max_len`` (and beyond). ``max_len`` is the configured budget, never a batch's width, so a
    response's penalty depends on its length alone."""
    if buffer_len <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    if buffer_len > max_len:
        raise ValueError(f"overlong buffer {buffer_len} exceeds the generation budget {max_len}")
    expected = max_len - buffer_len
    return ((expected - lengths.float()) / buffer_len).clamp(min=-1.0, max=0.0) * factor
