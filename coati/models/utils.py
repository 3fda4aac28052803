"""Tensor helpers shared by the RLHF losses, the experience maker and the model wrappers.

Shapes: ``(B, T)`` for whole sequences, ``(B, A)`` for the ``A`` action (generated) tokens at the end of
each sequence. Masks may be bool, int or float; a 1 marks a position that counts.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under ``logits`` (``(..., V)`` and ``(...)`` -> ``(...)``), in fp32.

    Computed as ``logit[label] - logsumexp(logits)`` so the full ``log_softmax`` tensor is never kept
    for backward beyond what ``logsumexp`` needs.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Turn off every dropout of ``model`` in place (as TRL and OpenRLHF do for PPO) and return it.

    PPO scores old log-probs and values without gradients and then updates in train mode; dropout would make
    the two passes different functions, so noise alone moves the first ratio off 1 and triggers clipping.
    Hugging Face layers drop out in two ways: ``nn.Dropout`` modules (also peft's ``lora_dropout``, and
    GPT-2's ``attn_dropout.p`` read for sdpa), and float attributes handed to functional calls
    (``attention_dropout``, OPT's ``dropout`` and ``layerdrop``, BLOOM's ``hidden_dropout``). Both are zeroed;
    ``config`` is left alone, so a saved model keeps its dropout settings for later fine-tuning.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in vars(module).items():
            if ("dropout" in name or name.endswith("layerdrop")) and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


def masked_sum(x: torch.Tensor, mask: torch.Tensor | None, dim: int | None = None) -> torch.Tensor:
    if mask is None:
        return x.sum() if dim is None else x.sum(dim)
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is set (all of them along ``dim`` if ``dim`` given).

    A slice with no set position gives 0, not NaN (an empty response must not poison a batch).
    """
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Population variance of the masked entries of ``x``."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor | None, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to zero mean / unit variance using only masked entries (used for advantages).

    With ``shift_mean=False`` the mean is added back (scale-only whitening, e.g. for rewards).
    Entries outside the mask are transformed too; callers mask them afterwards.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def compute_approx_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
                      action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Non-negative, unbiased KL(pi || ref) estimate ``exp(r) - 1 - r`` with ``r = ref - logp`` ("k3").

    Returns per-token values ``(B, A)`` without a mask, or the per-sequence masked mean ``(B,)`` with one
    (the form logged as ``kl``).
    """
    log_ratio = ref_log_probs.float() - log_probs.float()
    kl = log_ratio.exp() - 1 - log_ratio
    if action_mask is None:
        return kl
    return masked_mean(kl, action_mask, dim=-1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is set, per row: ``(B, T) -> (B,)``.

    Works for left, right and both-sides padding; a row with no set position gives 0.
    """
    mask = attention_mask.ne(0).long()
    positions = torch.arange(mask.size(-1), device=mask.device)
    return (mask * positions).argmax(dim=-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting only real tokens (``cumsum - 1``, clamped at 0).

    Left padding then gives the first real token position 0, as right padding does, so both paddings
    produce the same outputs for models with absolute or rotary positions.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def compute_reward(r: torch.Tensor, kl_coef: float, log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
                   action_mask: torch.Tensor, reward_clip: float | None = None,
                   kl_estimator: str = "k1") -> torch.Tensor:
    """Per-token PPO rewards ``(B, A)``: ``-kl_coef * (logp - logp_ref)`` (or another estimator of
    ``coati.algos.kl_estimate``, clamped as it clamps) on each valid action token, and the sequence reward
    ``r`` (clipped to ``[-reward_clip, reward_clip]`` when given) added on the last valid action token. Positions
    outside ``action_mask`` are 0; a row without valid actions gets all zeros.
    """
    from ..algos import kl_estimate  # coati.algos imports this module

    mask = action_mask.float()
    r = r.float().reshape(-1)
    if reward_clip is not None:
        r = r.clamp(-reward_clip, reward_clip)
    rewards = -kl_coef * kl_estimate(log_probs, ref_log_probs, kl_estimator) * mask
    last = last_token_index(action_mask)
    has_action = mask.sum(-1).gt(0).float()
    bonus = F.one_hot(last, num_classes=mask.size(-1)).float() * (r * has_action).unsqueeze(-1)
    return rewards + bonus
