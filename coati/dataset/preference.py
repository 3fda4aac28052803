"""Preference data for training the policy directly (DPO, IPO, ORPO, SimPO, KTO).

Samples are tokenized as SFT samples of the same conversation (same template, BOS / EOS rules, ids), with
labels on the *final* assistant turn only: earlier turns of a multi-turn record are context, as in TRL, so
a pair differs only in what it is judged on. ``max_len``, ``overlong`` and ``empty`` act as in
:class:`~coati.dataset.reward.RewardDataset`.

Reference log-probs computed once before training (``precompute_ref_logps``) are stored on the dataset
(:meth:`set_ref_logps`) and returned with every item, so training needs no reference model.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from .collators import PaddingCollator, pad_sequences
from .common import as_tensor, check_choice, finish, has_target, logger
from .formats import unpaired_converter
from .reward import encode_pairs, last_response_labels, read_pairs
from ..utils import IGNORE_INDEX
from .templates import SegmentEncoder, render_segments, resolve_template


class _RefLogps:
    """Per-item reference log-probs set once, returned under ``REF_KEYS`` by ``__getitem__``."""

    REF_KEYS: tuple[str, ...] = ()
    ref_logps: torch.Tensor | None = None

    def set_ref_logps(self, values: torch.Tensor) -> None:
        """``values``: ``(len(self), len(REF_KEYS))`` fp32, in item order."""
        if tuple(values.shape) != (len(self), len(self.REF_KEYS)):
            raise ValueError(f"expected reference log-probs of shape {(len(self), len(self.REF_KEYS))}, "
                             f"got {tuple(values.shape)}")
        self.ref_logps = values.detach().float().cpu()

    def _with_ref(self, item: dict[str, Any], idx: int) -> dict[str, Any]:
        if self.ref_logps is not None:
            item.update(zip(self.REF_KEYS, self.ref_logps[idx]))
        return item


class PreferenceDataset(_RefLogps, Dataset):
    """Pairs from every format :class:`RewardDataset` reads. Items: ``chosen_input_ids``, ``chosen_labels``,
    ``rejected_input_ids``, ``rejected_labels`` (labels -100 outside the final response and its EOS)."""

    REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")

    def __init__(self, path: Any, tokenizer, *, max_len: int = 512, max_datasets_size: int | None = None,
                 prompt_template: str = "auto", overlong: str = "truncate", seed: int = 42,
                 format: str | None = None, empty: str = "skip", split: str = "train"):
        check_choice("overlong", overlong, ("truncate", "skip"))
        resolve_template(tokenizer, prompt_template)
        pairs, first_empty = read_pairs(self, path, format, empty, split, max_datasets_size, seed)
        self.items = [tuple(as_tensor(x) for x in row) for row in
                      encode_pairs(self, pairs, tokenizer, prompt_template, max_len, overlong, last_response_only=True)]
        finish(self, "preference", self.source, len(self.items), first_empty, max_len)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        c_ids, c_labels, r_ids, r_labels = self.items[idx]
        return self._with_ref({"chosen_input_ids": c_ids, "chosen_labels": c_labels,
                               "rejected_input_ids": r_ids, "rejected_labels": r_labels}, idx)


def mismatched_indices(prompts: Sequence[Sequence[int]]) -> list[int]:
    """For each sample, the nearest previous sample (cyclically) whose prompt ids differ: KTO's KL baseline
    needs completions written for another prompt. When every prompt is the same there is none; then the
    previous sample, with a warning. O(n) prompt comparisons."""
    n = len(prompts)
    start = next((i for i in range(n) if prompts[i - 1] != prompts[i]), None)
    if start is None:
        logger.warning("KTO: every sample has the same prompt, so the KL baseline is estimated on completions "
                       "of that same prompt (the previous sample's)")
        return [(i - 1) % n for i in range(n)]
    other = [0] * n
    for k in range(start, start + n):  # i with i-1's prompt has i-1's nearest other prompt
        i = k % n
        other[i] = (i - 1) % n if prompts[i - 1] != prompts[i] else other[i - 1]
    return other


class UnpairedPreferenceDataset(_RefLogps, Dataset):
    """KTO samples: ``{messages, label}`` / ``{prompt, completion, label}`` records, or pairs split into a
    desirable and an undesirable sample. Items: ``input_ids``, ``labels``, ``desirable`` (bool) and the
    mismatched sample KTO's KL baseline z0 is estimated on, ``kl_input_ids`` / ``kl_labels``: this sample's
    prompt with the completion of the nearest previous sample (cyclically) whose prompt differs
    (:func:`mismatched_indices`). TRL takes the previous sample's, which for split pairs is half the time the
    same prompt's chosen answer, so z0 would be measured partly on matched pairs."""

    REF_KEYS = ("ref_logps", "ref_kl_logps")

    def __init__(self, path: Any, tokenizer, *, max_len: int = 512, max_datasets_size: int | None = None,
                 prompt_template: str = "auto", overlong: str = "truncate", seed: int = 42,
                 format: str | None = None, empty: str = "skip", split: str = "train"):
        check_choice("overlong", overlong, ("truncate", "skip"))
        resolve_template(tokenizer, prompt_template)
        samples, first_empty = read_pairs(self, path, format, empty, split, max_datasets_size, seed,
                                          converter=unpaired_converter)
        segments = [render_segments(messages, tokenizer, prompt_template) for _, (messages, _) in samples]
        encoded = SegmentEncoder(tokenizer).encode_many(segments, progress=len(samples) > 1000, desc="KTO data")

        self.num_truncated = self.num_skipped = 0
        kept: list[tuple[list[int], list[int], bool]] = []  # (prompt ids, completion ids, desirable)
        for (_, (_, desirable)), (ids, labels) in zip(samples, encoded):
            labels = last_response_labels(labels)
            if len(ids) > max_len:
                if overlong == "skip" or not has_target(labels[:max_len]):
                    self.num_skipped += 1
                    continue
                self.num_truncated += 1
            start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
            kept.append((ids[:start], ids[start:], desirable))
        finish(self, "KTO", self.source, len(kept), first_empty, max_len)
        self.max_len = max_len
        self.samples = [self._encode(prompt, completion) + (desirable,) for prompt, completion, desirable in kept]
        self.kl_samples = [self._encode(kept[i][0], kept[j][1])
                           for i, j in enumerate(mismatched_indices([prompt for prompt, _, _ in kept]))]

    def _encode(self, prompt: list[int], completion: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = (prompt + completion)[: self.max_len]
        labels = ([IGNORE_INDEX] * len(prompt) + completion)[: self.max_len]
        return as_tensor(ids), as_tensor(labels)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        ids, labels, desirable = self.samples[idx]
        kl_ids, kl_labels = self.kl_samples[idx]
        return self._with_ref({"input_ids": ids, "labels": labels, "desirable": desirable,
                               "kl_input_ids": kl_ids, "kl_labels": kl_labels}, idx)


def _pad(seqs: Sequence[torch.Tensor], pad_id: int, multiple: int | None, prefix: str = "") -> dict[str, torch.Tensor]:
    ids, mask = pad_sequences([s[0] for s in seqs], pad_id, "right", multiple)
    labels, _ = pad_sequences([s[1] for s in seqs], IGNORE_INDEX, "right", multiple)
    return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask, f"{prefix}labels": labels}


def _ref(batch: Sequence[dict], keys: Sequence[str]) -> torch.Tensor | None:
    if keys[0] not in batch[0]:
        return None
    return torch.stack([torch.as_tensor(b[k], dtype=torch.float32) for k in keys for b in batch])


class PreferenceCollator(PaddingCollator):
    """-> one concatenated batch of ``2B`` rows, the chosen sides first: ``input_ids``, ``attention_mask``,
    ``labels`` (right padded), and ``ref_logps`` ``(2B,)`` when the dataset holds precomputed ones."""

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        rows = [(b[f"{side}_input_ids"], b[f"{side}_labels"]) for side in ("chosen", "rejected") for b in batch]
        out = _pad(rows, self.pad_token_id, self.pad_to_multiple_of)
        ref = _ref(batch, PreferenceDataset.REF_KEYS)
        if ref is not None:
            out["ref_logps"] = ref
        return out


class UnpairedPreferenceCollator(PreferenceCollator):
    """-> ``input_ids``, ``attention_mask``, ``labels``, ``desirable`` (bool), the same three with a ``kl_``
    prefix, and ``ref_logps`` / ``ref_kl_logps`` when precomputed."""

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        out = _pad([(b["input_ids"], b["labels"]) for b in batch], self.pad_token_id, self.pad_to_multiple_of)
        out.update(_pad([(b["kl_input_ids"], b["kl_labels"]) for b in batch], self.pad_token_id,
                        self.pad_to_multiple_of, prefix="kl_"))
        out["desirable"] = torch.tensor([bool(b["desirable"]) for b in batch])
        ref = _ref(batch, UnpairedPreferenceDataset.REF_KEYS)
        if ref is not None:
            out["ref_logps"], out["ref_kl_logps"] = ref.view(2, -1)
        return out
