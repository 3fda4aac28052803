"""Preference pairs for reward-model training, tokenized exactly like SFT samples (prompt, response, EOS).

A ranked list ``[best, ..., worst]`` becomes every (better, worse) pair, C(n, 2) of them;
``max_datasets_size`` then counts pairs. Over-long pairs: ``overlong="truncate"`` keeps the first
``max_len`` tokens of each side and drops the pair (``num_skipped``) when a side loses all its response tokens
or both sides become identical; ``overlong="skip"`` drops every pair with a side longer than ``max_len``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from .common import as_tensor, check_choice, convert_all, finish, has_target, select_subset, source_name
from .formats import Pair, format_from_name, reward_converter
from .io import EmptyFieldError, load_records
from ..utils import IGNORE_INDEX
from .templates import SegmentEncoder, render_segments, resolve_template


class RewardDataset(Dataset):
    """Items ``{"chosen_input_ids": LongTensor, "rejected_input_ids": LongTensor}``.

    ``format``: "hh-rlhf", "rm-static", "sharegpt", "ranked", "chat", or None to infer it from the dataset
    name (:func:`~coati.dataset.formats.format_from_name`) and else from the first record's keys.
    """

    def __init__(self, path: Any, tokenizer, *, max_len: int = 512, max_datasets_size: int | None = None,
                 prompt_template: str = "auto", overlong: str = "truncate", seed: int = 42,
                 format: str | None = None, empty: str = "skip", split: str = "train"):
        check_choice("overlong", overlong, ("truncate", "skip"))
        resolve_template(tokenizer, prompt_template)
        pairs, first_empty = read_pairs(self, path, format, empty, split, max_datasets_size, seed)
        self.chosen: list[torch.Tensor] = []
        self.rejected: list[torch.Tensor] = []
        for c_ids, _, r_ids, _ in encode_pairs(self, pairs, tokenizer, prompt_template, max_len, overlong):
            self.chosen.append(as_tensor(c_ids))
            self.rejected.append(as_tensor(r_ids))
        finish(self, "reward", self.source, len(self.chosen), first_empty, max_len)

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {"chosen_input_ids": self.chosen[idx], "rejected_input_ids": self.rejected[idx]}


def read_pairs(dataset: Any, path: Any, format: str | None, empty: str, split: str, max_datasets_size: int | None,
               seed: int, converter: Callable[[Any, str | None], Callable] = reward_converter
               ) -> tuple[list[tuple[Any, Any]], EmptyFieldError | None]:
    """The (chosen, rejected) conversations of a preference source (or, with ``converter=unpaired_converter``,
    its KTO samples); sets ``dataset.source`` / ``num_empty``."""
    dataset.source = source_name(path)
    if format is None and dataset.source != "<records>":
        format = format_from_name(dataset.source)
    records = load_records(path, split=split)
    pairs, dataset.num_empty, first_empty = convert_all(records, converter(records[0], format), empty)
    return select_subset(pairs, max_datasets_size, seed), first_empty


def last_response_labels(labels: list[int]) -> list[int]:
    """Labels of the final assistant turn only (earlier turns become prompt): the trailing run of labelled
    tokens, since prompt text always separates two responses."""
    start = len(labels)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [IGNORE_INDEX] * start + labels[start:]


def encode_pairs(dataset: Any, pairs: list[tuple[Any, Pair]], tokenizer, prompt_template: str, max_len: int,
                 overlong: str, last_response_only: bool = False) -> list[tuple[list[int], ...]]:
    """``(chosen_ids, chosen_labels, rejected_ids, rejected_labels)`` per kept pair, tokenized as SFT samples
    (labels on every response, or with ``last_response_only`` on the final one), after the over-long policy;
    sets ``dataset.num_truncated`` / ``num_skipped``."""
    segments = [render_segments(side, tokenizer, prompt_template) for _, pair in pairs for side in pair]
    encoded = SegmentEncoder(tokenizer).encode_many(segments, progress=len(pairs) > 1000, desc="preference data")
    dataset.num_truncated = dataset.num_skipped = 0
    out = []
    for k in range(len(pairs)):
        (c_ids, c_labels), (r_ids, r_labels) = encoded[2 * k], encoded[2 * k + 1]
        if last_response_only:
            c_labels, r_labels = last_response_labels(c_labels), last_response_labels(r_labels)
        if len(c_ids) > max_len or len(r_ids) > max_len:
            c_ids, c_labels, r_ids, r_labels = (x[:max_len] for x in (c_ids, c_labels, r_ids, r_labels))
            if overlong == "skip" or not (has_target(c_labels) and has_target(r_labels)) or c_ids == r_ids:
                dataset.num_skipped += 1
                continue
            dataset.num_truncated += 1
        out.append((c_ids, c_labels, r_ids, r_labels))
    return out
