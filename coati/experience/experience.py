"""The unit of PPO data: one batch of generated responses with everything the update needs.

Tensors with an action axis have shape (batch, num_actions) and are aligned with the last
``num_actions`` tokens of ``sequences``. Prompts are left padded and responses right padded, so an
experience can be split into samples and re-batched with different padding without changing the
model outputs (the models compute position ids from ``attention_mask``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

# Per-action tensors: trimmed / padded along the action axis together.
ACTION_FIELDS = ("action_mask", "action_log_probs", "values", "returns", "advantages")


@dataclass
class Experience:
    """A batch of rollouts. ``info`` holds per-sample scalars (shape (batch,)) for logging only."""

    sequences: torch.Tensor  # (B, T) prompt (left padded) + response (right padded)
    attention_mask: torch.Tensor  # (B, T) 1 on prompt tokens and valid response tokens
    action_mask: torch.Tensor  # (B, A) 1 on response tokens up to and including the first EOS
    action_log_probs: torch.Tensor  # (B, A) log pi_old(a_t | s_t)
    values: torch.Tensor  # (B, A) V_old(s_t)
    returns: torch.Tensor  # (B, A) GAE returns (targets of the value loss)
    advantages: torch.Tensor  # (B, A) GAE advantages (whitened unless turned off)
    info: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_actions(self) -> int:
        return self.action_mask.size(1)

    @property
    def batch_size(self) -> int:
        return self.sequences.size(0)

    def _map(self, fn) -> "Experience":
        kw = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "info"}
        return Experience(**kw, info={k: fn(v) for k, v in self.info.items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Experience":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Experience":
        return self._map(lambda t: t.pin_memory())

    def split(self) -> list["Experience"]:
        """One experience per sample, with prompt left padding and response right padding removed."""
        items = []
        num_actions = self.num_actions
        prompt_len = self.sequences.size(1) - num_actions
        for i in range(self.batch_size):
            prompt_mask = self.attention_mask[i, :prompt_len]
            nz = prompt_mask.nonzero()
            start = int(nz[0]) if len(nz) else prompt_len
            act = self.action_mask[i].nonzero()
            n_act = int(act[-1]) + 1 if len(act) else 1
            end = prompt_len + n_act
            kw = {
                "sequences": self.sequences[i : i + 1, start:end].clone(),
                "attention_mask": self.attention_mask[i : i + 1, start:end].clone(),
            }
            for name in ACTION_FIELDS:
                kw[name] = getattr(self, name)[i : i + 1, :n_act].clone()
            info = {k: v[i : i + 1].clone() for k, v in self.info.items()}
            items.append(Experience(**kw, info=info))
        return items

    @staticmethod
    def collate(items: list["Experience"], pad_token_id: int) -> "Experience":
        """Concatenate experiences, left padding prompts and right padding responses to common lengths."""
        if not items:
            raise ValueError("cannot collate an empty list of experiences")
        max_actions = max(e.num_actions for e in items)
        max_prompt = max(e.sequences.size(1) - e.num_actions for e in items)
        seqs, attn, per_action = [], [], {name: [] for name in ACTION_FIELDS}
        for e in items:
            n_act = e.num_actions
            p_len = e.sequences.size(1) - n_act
            left, right = max_prompt - p_len, max_actions - n_act
            seqs.append(_pad(e.sequences, left, right, pad_token_id))
            attn.append(_pad(e.attention_mask, left, right, 0))
            for name in ACTION_FIELDS:
                per_action[name].append(_pad(getattr(e, name), 0, right, 0))
        info_keys = set(items[0].info)
        for e in items[1:]:
            info_keys &= set(e.info)
        return Experience(
            sequences=torch.cat(seqs),
            attention_mask=torch.cat(attn),
            **{name: torch.cat(ts) for name, ts in per_action.items()},
            info={k: torch.cat([e.info[k] for e in items]) for k in sorted(info_keys)},
        )


def _pad(t: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
    if left == 0 and right == 0:
        return t
    return torch.nn.functional.pad(t, (left, right), value=value)
