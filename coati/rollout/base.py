"""The rollout interface: :class:`Rollout`, :class:`RolloutEngine` and the sampled temperature."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn


@dataclass
class Rollout:
    """Generated samples, shapes ``(B, P + A)`` for the whole sequence and ``(B, A)`` for the response."""

    sequences: torch.Tensor  # prompt (left padded) + response; pad after the first EOS
    attention_mask: torch.Tensor  # prompt mask + valid response tokens
    action_mask: torch.Tensor  # 1 on response tokens up to and including the first EOS
    log_probs: torch.Tensor | None = None  # (B, A) float32 log-probs of the sampled tokens; None unless asked
    # an engine that is not the trainer's module: the sampled tokens' log-probs as it computed them (B, A), and
    # the version of the weights it sampled with (the optimizer step of its last update_weights)
    engine_log_probs: torch.Tensor | None = None
    weight_version: int | None = None
    stopped: torch.Tensor | None = None  # (B,) bool: the response ended at a stop string (cut_at_stop_strings)

    @property
    def num_actions(self) -> int:
        return self.action_mask.size(1)


@runtime_checkable
class RolloutEngine(Protocol):
    """What the experience maker needs from a generator (see the module doc for the contract)."""

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: dict[str, Any], *,
                 return_log_probs: bool = True) -> Rollout:
        """Sample with ``sampling`` (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``max_new_tokens`` and
        any other generation settings)."""
        ...

    def update_weights(self, weights: nn.Module | dict[str, torch.Tensor], version: int | None = None) -> None:
        """Generate from ``weights`` (the trained module or its state dict) from now on; ``version`` (the
        optimizer step) stamps the rollouts of an engine that records it."""
        ...


def stop_length(tokens: Sequence[int], stops: Sequence[str], decode: Callable[[Sequence[int]], str]) -> int | None:
    """The number of leading ``tokens`` up to and including the one that completes the first of ``stops`` in the
    decoded text, or None. Whether a prefix contains a stop string only turns from no to yes as it grows (a
    ``decode`` whose prefixes decode to prefixes: no clean-up of spaces), so a binary search decodes O(log n)
    prefixes."""
    if not tokens or not any(s in decode(tokens) for s in stops):
        return None
    lo, hi = 1, len(tokens)  # the shortest prefix containing a stop string lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(tokens[:mid]) for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return lo


def cut_at_stop_strings(rollout: Rollout, stops: Sequence[str], decode: Callable[[Sequence[int]], str],
                        pad_token_id: int) -> Rollout:
    """End each response at its first stop string (the completing token kept), whichever engine sampled it: the
    tokens after it become padding and leave the masks. Engines sample up to EOS or the token limit, and this
    one function gives stop strings their meaning, so both engines' rollouts mean the same."""
    action_mask = rollout.action_mask.clone()
    stopped = torch.zeros(action_mask.size(0), dtype=torch.bool, device=action_mask.device)
    actions = rollout.sequences[:, -rollout.num_actions:]
    for row, (tokens, valid) in enumerate(zip(actions.tolist(), action_mask.sum(-1).tolist())):
        length = stop_length(tokens[:int(valid)], stops, decode) if stops else None
        if length is not None:
            action_mask[row, length:] = 0
            stopped[row] = True
    sequences = rollout.sequences.clone()
    sequences[:, -rollout.num_actions:].masked_fill_(action_mask.eq(0), pad_token_id)
    attention_mask = rollout.attention_mask.clone()
    attention_mask[:, -rollout.num_actions:] = action_mask.to(attention_mask.dtype)
    return dataclasses.replace(rollout, sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
                               stopped=stopped)


def sampling_temperature(sampling: dict[str, Any]) -> float:
    """The temperature of the distribution ``sampling`` samples from: its ``temperature`` when sampling, 1 for
    greedy decoding (which has none)."""
    return float(sampling.get("temperature", 1.0)) if sampling.get("do_sample") else 1.0
