"""Generalised advantage estimation over the valid action tokens of each response.

Why per-token GAE: Coati's original PPO used one sequence-level advantage (reward - value) and users saw
runs collapse; GAE with a discounted, lambda-weighted sum of TD errors gives lower-variance credit
assignment per generated token.
"""
from __future__ import annotations

import torch


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
    ``returns = advantages + values`` (raw, not whitened; whitening is the experience maker's job).
    """
    if rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} differ in shape")
    values = values.float()
    rewards = rewards.float()
    if action_mask is None:
        mask = torch.ones_like(values)
    else:
        if action_mask.shape != values.shape:
            raise ValueError(f"action_mask {tuple(action_mask.shape)} does not match values {tuple(values.shape)}")
        mask = action_mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    num_actions = values.size(1)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(num_actions)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m
        advantages[:, t] = adv
        # A padded position resets the recursion, so the token before it sees V=0 and A=0 after it.
        next_value = values[:, t] * m
        next_adv = adv
    returns = (advantages + values) * mask
    return advantages, returns
