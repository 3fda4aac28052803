"""HF ``generate`` with exact sampling settings and response masks (what :class:`~coati.rollout.HFRolloutEngine`
samples with)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import GenerationConfig


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
    """Sample continuations of left-padded prompts with exactly the settings given.

    ``actor`` is an :class:`~coati.models.Actor`, whose ``generate`` ignores the checkpoint's
    ``generation_config.json``; ``sampling`` (``do_sample``, ``temperature``, ``top_k``, ``top_p``,
    ``max_new_tokens`` ...) makes the whole :class:`~transformers.GenerationConfig`, unset fields keeping
    transformers' library defaults, and entries that are no config field (``logits_processor`` ...) go to
    ``generate`` as they are.
    Returns ``sequences`` (prompt + generated, ``(B, P + A)``), ``attention_mask`` (prompt mask + valid
    actions) and ``action_mask`` (``(B, A)``, 1 up to and including the first EOS), masks in the dtype of
    the prompt mask.
    """
    if input_ids.size(0) > 1 and attention_mask[:, -1].eq(0).any():
        raise ValueError("generate_with_masks needs left-padded prompts (a row ends with padding)")
    config = GenerationConfig(eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    extra = config.update(**sampling)
    sequences = actor.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                               **extra)
    generated = sequences[:, input_ids.size(1):]
    action_mask = action_mask_from_tokens(generated, eos_token_id).to(attention_mask.dtype)
    full_mask = torch.cat([attention_mask, action_mask], dim=1)
    return sequences, full_mask, action_mask
