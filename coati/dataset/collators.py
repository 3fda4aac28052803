"""Batching: SFT and reward batches pad on the right, PPO prompts on the left (generation appends on the
right). Attention masks come from lengths, never from comparing ids with the pad id, so a pad id that is
also EOS/BOS (GPT-2) cannot mask real tokens. Tensors stay on the CPU; strategies move them."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..utils import IGNORE_INDEX


def pad_sequences(seqs: Sequence[torch.Tensor], value: int, side: str = "right",
                  pad_to_multiple_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(padded, attention_mask)`` of 1-D sequences padded to the longest one."""
    if not seqs:
        raise ValueError("cannot collate an empty batch")
    length = max(len(s) for s in seqs)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        s = torch.as_tensor(s, dtype=torch.long)
        span = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        out[i, span] = s
        mask[i, span] = 1
    return out, mask


def _check_pad(pad_token_id: int | None) -> int:
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the EOS or UNK token)")
    return int(pad_token_id)


class PaddingCollator:
    """Base of the padding collators: the pad id (required) and an optional multiple to pad lengths to."""

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None):
        self.pad_token_id = _check_pad(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of


class SFTCollator(PaddingCollator):
    """-> ``input_ids``, ``attention_mask``, ``labels`` (right padded; labels padded with -100)."""

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_sequences([b["input_ids"] for b in batch], self.pad_token_id, "right",
                                  self.pad_to_multiple_of)
        labels, _ = pad_sequences([b["labels"] for b in batch], IGNORE_INDEX, "right", self.pad_to_multiple_of)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class RewardCollator(PaddingCollator):
    """-> ``chosen_input_ids``, ``chosen_attention_mask``, ``rejected_input_ids``, ``rejected_attention_mask``
    (right padded; each side to its own longest sequence)."""

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        out = {}
        for side in ("chosen", "rejected"):
            ids, mask = pad_sequences([b[f"{side}_input_ids"] for b in batch], self.pad_token_id, "right",
                                      self.pad_to_multiple_of)
            out[f"{side}_input_ids"], out[f"{side}_attention_mask"] = ids, mask
        return out


class PromptCollator(PaddingCollator):
    """-> left-padded ``input_ids``, ``attention_mask``, ``prompts: list[str]`` and each extra field as a list
    (None where a record lacks it)."""

    def __call__(self, batch: Sequence[dict]) -> dict[str, Any]:
        ids, mask = pad_sequences([b["input_ids"] for b in batch], self.pad_token_id, "left",
                                  self.pad_to_multiple_of)
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "prompts": [b.get("prompt") for b in batch]}
        keys: dict[str, None] = {}
        for b in batch:
            keys.update((k, None) for k in b if k not in ("input_ids", "prompt"))
        for k in keys:
            out[k] = [b.get(k) for b in batch]
        return out
