"""Supervised fine-tuning samples: the loss is on response tokens only (every assistant turn + its EOS).

Over-long samples: ``overlong="truncate"`` keeps the first ``max_len`` tokens and drops the sample (counted
in ``num_skipped``) when no response token survives, so a row of only -100 labels never reaches the loss;
``overlong="skip"`` drops every sample longer than ``max_len``. Records with an empty response are skipped
and counted in ``num_empty`` (``empty="raise"`` makes them an error instead).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from .common import as_tensor, check_choice, convert_all, finish, has_target, select_subset, source_name
from .formats import sft_converter
from .io import EmptyFieldError, Record, load_records
from .templates import SegmentEncoder, resolve_template
from ..utils import IGNORE_INDEX


Encoded = tuple[list[int], list[int]]


def encode_sft_records(source: Any, tokenizer, *, prompt_template: str, max_datasets_size: int | None, seed: int,
                       empty: str, split: str, desc: str = "SFT data"
                       ) -> tuple[list[tuple[Record, Encoded]], int, EmptyFieldError | None]:
    """``[(record, (input_ids, labels))]`` of every SFT-format record (after the seeded subset), the number of
    empty records skipped and the first of them. The one SFT rendering, shared by PPO-ptx data."""
    resolve_template(tokenizer, prompt_template)
    records = load_records(source, split=split)
    examples, num_empty, first_empty = convert_all(records, sft_converter(records[0]), empty)
    examples = select_subset(examples, max_datasets_size, seed)
    segments = [conv.segments(tokenizer, prompt_template) for _, conv in examples]
    encoded = SegmentEncoder(tokenizer).encode_many(segments, progress=len(segments) > 1000, desc=desc)
    return [(rec, enc) for (rec, _), enc in zip(examples, encoded)], num_empty, first_empty


def seq2seq_sample(ids: list[int], labels: list[int]) -> Encoded:
    """A causal sample as an encoder-decoder one: the last response (+ EOS) is the decoder's target, the tokens
    before it (earlier turns included, as inference renders them) the encoder's input; labels are
    ``[-100] + target``, the -100 standing for the decoder's start token (never scored)."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return ids[:start], [IGNORE_INDEX] + ids[start:end]


class SFTDataset(Dataset):
    """Items ``{"input_ids": LongTensor, "labels": LongTensor}`` (labels -100 outside responses).

    ``seq2seq``: samples for an encoder-decoder model (:func:`seq2seq_sample`); ``max_len`` then limits the
    encoder input and the target each."""

    def __init__(self, path_or_records: Any, tokenizer, *, max_len: int = 512, max_datasets_size: int | None = None,
                 prompt_template: str = "auto", overlong: str = "truncate", seed: int = 42, empty: str = "skip",
                 split: str = "train", seq2seq: bool = False):
        check_choice("overlong", overlong, ("truncate", "skip"))
        self.source = source_name(path_or_records)
        encoded, self.num_empty, first_empty = encode_sft_records(
            path_or_records, tokenizer, prompt_template=prompt_template, max_datasets_size=max_datasets_size,
            seed=seed, empty=empty, split=split)

        self.num_truncated = self.num_skipped = 0
        self.input_ids: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.locations: list[str] = []
        limit = max_len + 1 if seq2seq else max_len  # labels: the decoder's start slot + max_len targets
        for rec, (ids, labels) in encoded:
            if seq2seq:
                ids, labels = seq2seq_sample(ids, labels)
            if len(ids) > max_len or len(labels) > limit:
                ids, labels = ids[:max_len], labels[:limit]
                if overlong == "skip" or not has_target(labels):
                    self.num_skipped += 1
                    continue
                self.num_truncated += 1
            self.input_ids.append(as_tensor(ids))
            self.labels.append(as_tensor(labels))
            self.locations.append(rec.location)
        finish(self, "SFT", self.source, len(self.input_ids), first_empty, max_len)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[idx], "labels": self.labels[idx]}
