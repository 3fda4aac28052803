"""Rollout generation behind one small function, so a faster engine can replace HF ``generate`` later."""
from __future__ import annotations

from typing import Any, Sequence

import torch


def action_mask_from_tokens(generated: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """``(B, A)`` mask: 1 up to and including the first EOS of each row, 0 after (all 1 without EOS).

    Counting EOS tokens strictly before each position works whether the tokens after EOS are pad or EOS.
    """
    eos = torch.as_tensor(eos_token_id, device=generated.device).reshape(-1)
    is_eos = torch.isin(generated, eos).long()
    eos_before = is_eos.cumsum(-1) - is_eos
    return eos_before.eq(0)


@torch.no_grad()
def generate_with_masks(actor: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                        eos_token_id: int | Sequence[int], pad_token_id: int,
                        **sampling: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample continuations of left-padded prompts.

    ``actor`` is an :class:`~coati.models.Actor` or a HF model; ``sampling`` goes to HF ``generate``
    (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``max_new_tokens``, ``logits_processor`` ...).
    Returns ``sequences`` (prompt + generated, ``(B, P + A)``), ``attention_mask`` (prompt mask + valid
    actions) and ``action_mask`` (``(B, A)``, 1 up to and including the first EOS), masks in the dtype of
    the prompt mask.
    """
    if input_ids.size(0) > 1 and attention_mask[:, -1].eq(0).any():
        raise ValueError("generate_with_masks needs left-padded prompts (a row ends with padding)")
    sequences = actor.generate(input_ids=input_ids, attention_mask=attention_mask,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id, **sampling)
    generated = sequences[:, input_ids.size(1):]
    action_mask = action_mask_from_tokens(generated, eos_token_id).to(attention_mask.dtype)
    full_mask = torch.cat([attention_mask, action_mask], dim=1)
    return sequences, full_mask, action_mask
