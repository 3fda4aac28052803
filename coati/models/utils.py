"""Tensor helpers shared by the RLHF losses, the experience maker and the model wrappers.

Shapes: ``(B, T)`` for whole sequences, ``(B, A)`` for the ``A`` action (generated) tokens at the end of
each sequence. Masks may be bool, int or float; a 1 marks a position that counts.
"""
from __future__ import annotations

import torch
import torch.nn as nn


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
