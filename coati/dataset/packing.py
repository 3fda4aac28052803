"""Padding-free packing: a micro-batch's samples are concatenated into rows of at most ``max_len`` tokens.

Each sample keeps its own position ids (0, 1, ... restarting at every sample) and the model is called with
``attention_mask=None``: transformers then builds a block-diagonal causal mask from the position ids
(``masking_utils.find_packed_sequence_indices`` for sdpa / eager / flex attention; varlen kernels for
``flash_attention_2``), so no token attends across a sample boundary. Only architectures that pass position
ids to that mask builder isolate samples; :func:`coati.models.families.supports_packing` names them.

Packing happens inside the collator, over the samples the sampler already chose for the micro-batch, so a
step sees exactly the samples of the unpacked run: loss normalisation (a global token or pair count), the
data order and resume positions are unchanged, only the padding goes. Rows are filled first-fit by
decreasing length (ties by batch position), which is deterministic, so a resumed run packs identically.

A packed batch carries, per prefix (``""``, ``"kl_"``), ``input_ids``, ``position_ids``, ``labels`` (each
sample's first label set to -100, since the previous sample's last token must not predict it; unpacked the
shift drops it anyway), ``sample_ids`` (the batch position of the sample each token belongs to, -1 on pad)
and ``seq_lens`` ``(N,)``; :func:`sample_sums` and :func:`last_token_flat_index` give per-sample values.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .collators import _check_pad
from .templates import IGNORE_INDEX


def first_fit(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Rows of sample indices, each row's total length at most ``max_len`` (a longer sample gets a row of its
    own): first-fit over the samples by decreasing length."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_len - lengths[i])
    return rows


def pack(input_ids: Sequence[torch.Tensor], labels: Sequence[torch.Tensor] | None, max_len: int, pad_token_id: int,
         prefix: str = "") -> dict[str, torch.Tensor]:
    """Pack 1-D samples into rows (see the module doc). Pad tails get position ids from 0 (a segment of their
    own, after every real token, so causal attention never lets a real token see them)."""
    if not input_ids:
        raise ValueError("cannot pack an empty batch")
    lengths = [len(s) for s in input_ids]
    rows = first_fit(lengths, max_len)
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    sid = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            ids[r, start:start + n] = torch.as_tensor(input_ids[i], dtype=torch.long)
            pos[r, start:start + n] = torch.arange(n)
            if labels is not None:
                lab[r, start + 1:start + n] = torch.as_tensor(labels[i], dtype=torch.long)[1:]
            sid[r, start:start + n] = i
            start += n
        pos[r, start:] = torch.arange(width - start)
    out = {"input_ids": ids, "position_ids": pos, "sample_ids": sid, "seq_lens": torch.tensor(lengths)}
    if labels is not None:
        out["labels"] = lab
    return {prefix + k: v for k, v in out.items()}


def is_packed(batch: dict[str, Any], prefix: str = "") -> bool:
    return f"{prefix}position_ids" in batch


def model_inputs(batch: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """The keyword arguments a model call takes for this batch: ``position_ids`` when packed (the mask is then
    built from them), else ``attention_mask``."""
    if is_packed(batch, prefix):
        return {"position_ids": batch[f"{prefix}position_ids"]}
    return {"attention_mask": batch[f"{prefix}attention_mask"]}


def sample_sums(values: torch.Tensor, sample_ids: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Per-sample sums ``(N,)`` of ``values`` (same shape as ``sample_ids``; pad positions, id -1, left out)."""
    keep = sample_ids >= 0
    out = torch.zeros(num_samples, dtype=values.dtype, device=values.device)
    return out.index_add(0, sample_ids[keep], values[keep])


def last_token_flat_index(sample_ids: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Index into ``sample_ids.flatten()`` of each sample's last token, ``(N,)``: where a reward model reads
    its score."""
    flat = sample_ids.flatten()
    keep = flat >= 0
    positions = torch.arange(flat.numel(), device=flat.device)
    out = torch.zeros(num_samples, dtype=torch.long, device=flat.device)
    return out.scatter_reduce(0, flat[keep], positions[keep], reduce="amax", include_self=False)


def batch_token_counts(batch: dict[str, Any]) -> tuple[int, int]:
    """``(real tokens, all token slots)`` of a collated batch, padded (``*attention_mask``) or packed
    (``*sample_ids``), for throughput and the padding share."""
    real = total = 0
    for k, v in batch.items():
        if not torch.is_tensor(v):
            continue
        if k.endswith("attention_mask"):
            real += int(v.sum())
            total += v.numel()
        elif k.endswith("sample_ids"):
            real += int((v >= 0).sum())
            total += v.numel()
    return real, total


class PackingCollator:
    """SFT / pretraining samples (``input_ids``, ``labels``) -> one packed batch (see the module doc)."""

    def __init__(self, pad_token_id: int | None, max_len: int):
        self.pad_token_id = _check_pad(pad_token_id)
        self.max_len = max_len

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        return pack([b["input_ids"] for b in batch], [b["labels"] for b in batch], self.max_len, self.pad_token_id)


class PackingRewardCollator(PackingCollator):
    """Reward pairs -> one packed batch of ``2B`` samples, the chosen sides first (batch positions ``0..B-1``)."""

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        seqs = [b[f"{side}_input_ids"] for side in ("chosen", "rejected") for b in batch]
        return pack(seqs, None, self.max_len, self.pad_token_id)


class PackingPreferenceCollator(PackingCollator):
    """Preference pairs -> one packed batch of ``2B`` samples, the chosen sides first, plus ``ref_logps``
    when the dataset holds precomputed ones (the layout of :class:`~coati.dataset.PreferenceCollator`)."""

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        from .preference import PreferenceDataset, _ref

        sides = [(b[f"{side}_input_ids"], b[f"{side}_labels"]) for side in ("chosen", "rejected") for b in batch]
        out = pack([s[0] for s in sides], [s[1] for s in sides], self.max_len, self.pad_token_id)
        ref = _ref(batch, PreferenceDataset.REF_KEYS)
        if ref is not None:
            out["ref_logps"] = ref
        return out


def sample_lengths(dataset: Any) -> list[int]:
    """Tokens per sample (all its ``*input_ids`` fields together), what ``--group_by_length`` sorts by."""
    return [sum(len(v) for k, v in dataset[i].items() if k.endswith("input_ids")) for i in range(len(dataset))]
