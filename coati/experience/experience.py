"""The unit of RL data: one batch of generated responses with everything the update needs.

Tensors with an action axis have shape (batch, num_actions) and are aligned with the last
``num_actions`` tokens of ``sequences``. Prompts are left padded and responses right padded, so an
experience can be split into samples and re-batched with different padding without changing the
model outputs (the models compute position ids from ``attention_mask``). Optional tensors are None when
the algorithm has no use for them: ``values`` / ``returns`` without a critic, ``ref_log_probs`` unless the
KL is a loss term, ``group`` (the prompt each sample answers) is always set by the experience maker, and
``action_log_probs`` when the update's first forward is the policy that sampled (see PPOTrainer: one optimizer
step per rollout batch), whose detached log-probs are then the old ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

# Per-action tensors: trimmed / padded along the action axis together.
ACTION_FIELDS = ("action_mask", "action_log_probs", "values", "returns", "advantages", "ref_log_probs",
                 "rollout_is_weights")
# Per-sample tensors (shape (batch,)) that the update uses; ``info`` holds those only logged.
SAMPLE_FIELDS = ("group",)


@dataclass
class Experience:
    """A batch of rollouts. ``info`` holds per-sample scalars (shape (batch,)) for logging only, ``timings`` the
    seconds the experience maker's stages took (kept by select / to, not by split / collate)."""

    sequences: torch.Tensor  # (B, T) prompt (left padded) + response (right padded)
    attention_mask: torch.Tensor  # (B, T) 1 on prompt tokens and valid response tokens
    action_mask: torch.Tensor  # (B, A) 1 on response tokens up to and including the first EOS
    action_log_probs: torch.Tensor | None  # (B, A) log pi_old(a_t | s_t); None: the update's own, detached
    values: torch.Tensor | None  # (B, A) V_old(s_t); None without a critic
    returns: torch.Tensor | None  # (B, A) value targets; None without a critic
    advantages: torch.Tensor  # (B, A) from the configured estimator
    ref_log_probs: torch.Tensor | None = None  # (B, A) log pi_ref, for a KL loss term
    group: torch.Tensor | None = None  # (B,) id of the prompt each sample answers
    rollout_is_weights: torch.Tensor | None = None  # (B, A) rollout-correction weights (--rollout_is), or None
    info: dict[str, torch.Tensor] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds each stage of making it took

    @property
    def num_actions(self) -> int:
        return self.action_mask.size(1)

    @property
    def batch_size(self) -> int:
        return self.sequences.size(0)

    def _map(self, fn) -> "Experience":
        kw = {f.name: _opt(fn, getattr(self, f.name)) for f in dataclasses.fields(self)
              if f.name not in ("info", "timings")}
        return Experience(**kw, info={k: fn(v) for k, v in self.info.items()}, timings=dict(self.timings))

    def select(self, index: torch.Tensor) -> "Experience":
        """The samples at ``index`` (a 1-d index or boolean tensor)."""
        return self._map(lambda t: t[index.to(t.device)])

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
            nz = self.attention_mask[i, :prompt_len].nonzero()
            start = int(nz[0]) if len(nz) else prompt_len
            act = self.action_mask[i].nonzero()
            n_act = int(act[-1]) + 1 if len(act) else 1
            end = prompt_len + n_act
            kw = {
                "sequences": self.sequences[i : i + 1, start:end].clone(),
                "attention_mask": self.attention_mask[i : i + 1, start:end].clone(),
            }
            for name in ACTION_FIELDS:
                kw[name] = _opt(lambda t: t[i : i + 1, :n_act].clone(), getattr(self, name))
            for name in SAMPLE_FIELDS:
                kw[name] = _opt(lambda t: t[i : i + 1].clone(), getattr(self, name))
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
                per_action[name].append(_opt(lambda t: _pad(t, 0, right, 0), getattr(e, name)))
        info_keys = set(items[0].info).intersection(*(e.info for e in items[1:]))
        return Experience(
            sequences=torch.cat(seqs),
            attention_mask=torch.cat(attn),
            **{name: _cat(ts) for name, ts in per_action.items()},
            **{name: _cat([getattr(e, name) for e in items]) for name in SAMPLE_FIELDS},
            info={k: torch.cat([e.info[k] for e in items]) for k in sorted(info_keys)},
        )


def _pad(t: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
    if left == 0 and right == 0:
        return t
    return torch.nn.functional.pad(t, (left, right), value=value)


def _opt(fn, t):
    return None if t is None else fn(t)


def _cat(ts: list) -> torch.Tensor | None:
    """Concatenate, or None when the field is absent (it is absent from all items or from none)."""
    if any(t is None for t in ts):
        if not all(t is None for t in ts):
            raise ValueError("cannot collate experiences where only some carry a field")
        return None
    return torch.cat(ts)
