"""The Hugging Face ``generate`` rollout engine: samples with the trained actor module itself."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..models.generation import generate_with_masks
from .base import Rollout, sampling_temperature


class HFRolloutEngine:
    """Generates with ``actor`` (an unwrapped :class:`~coati.models.Actor`) and scores the sampled tokens with
    one forward of it. Generation is :func:`~coati.models.generate_with_masks`: transformers' ``generate``,
    whose rows leave the batch once they end (the tokens of its own loop for the same seed, fewer forwards).
    It shares the trained module, so the trainer's new weights are already in place: ``update_weights`` given
    that module does nothing, given another module raises, and given a state dict with the actor's keys copies
    in the tensors that are not the actor's own (other keys raise). ``autocast`` makes the context of the
    scoring forward (the strategy's mixed precision)."""

    def __init__(self, actor: nn.Module, *, eos_token_id: int | Sequence[int], pad_token_id: int,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self.actor = actor
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.autocast = autocast

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: dict[str, Any], *,
                 return_log_probs: bool = True) -> Rollout:
        sequences, full_mask, action_mask = generate_with_masks(
            self.actor, input_ids, attention_mask, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            **sampling)
        num_actions = action_mask.size(1)
        # Tokens after the first EOS are padding: keep them out of every model input.
        sequences = sequences.clone()
        sequences[:, -num_actions:].masked_fill_(action_mask.eq(0), self.pad_token_id)
        log_probs = None
        if return_log_probs:
            with self.autocast():
                log_probs = self.actor(sequences, full_mask, num_actions=num_actions,
                                       temperature=sampling_temperature(sampling)).float()
        return Rollout(sequences, full_mask, action_mask, log_probs)

    def update_weights(self, weights: nn.Module | dict[str, torch.Tensor], version: int | None = None) -> None:
        if isinstance(weights, nn.Module):
            if weights is not self.actor:
                raise ValueError("HFRolloutEngine generates with the trained module itself; it was given another "
                                 "one (make a new engine for it)")
            return
        own = self.actor.state_dict()
        if set(weights) != set(own):
            raise ValueError(f"update_weights: the state dict's keys are not the actor's "
                             f"({len(set(weights) ^ set(own))} differ)")
        stale = {k: v for k, v in weights.items() if v.data_ptr() != own[k].data_ptr()}
        if stale:  # not the module's own tensors: copy them in
            self.actor.load_state_dict(stale, strict=False)
