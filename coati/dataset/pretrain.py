"""Samples for the PPO-ptx language-modelling loss, read and rendered exactly as :class:`SFTDataset` reads them.

Coati's ``--pretrain_dataset`` was the SFT instruction data, so every SFT format works: chats and Alpaca /
``{source, target}`` records carry labels on their responses only (the prompt is masked, rendered with
``prompt_template``), while plain text (``{text}`` JSON / JSON lines, ``.txt`` with one document per line) has
labels on every token but BOS. Longer samples keep their first ``max_len`` tokens (``num_truncated``), or with
``chunk=True`` are cut into consecutive ``max_len`` blocks so nothing is lost; a sample left with no labelled
token is dropped (``num_skipped``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from .common import as_tensor, finish, has_target, source_name
from .sft import encode_sft_records


class PretrainDataset(Dataset):
    """Items ``{"input_ids": LongTensor, "labels": LongTensor}``."""

    def __init__(self, path: Any, tokenizer, *, max_len: int = 512, max_datasets_size: int | None = None,
                 prompt_template: str = "auto", seed: int = 42, chunk: bool = False, empty: str = "skip",
                 split: str = "train"):
        self.source = source_name(path)
        encoded, self.num_empty, first_empty = encode_sft_records(
            path, tokenizer, prompt_template=prompt_template, max_datasets_size=max_datasets_size, seed=seed,
            empty=empty, split=split, desc="pretrain data")
        self.num_truncated = self.num_skipped = 0
        self.input_ids: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        for _, (ids, labels) in encoded:
            self.num_truncated += len(ids) > max_len
            starts = range(0, len(ids), max_len) if chunk else [0]
            kept = 0
            for s in starts:
                block_ids, block_labels = ids[s: s + max_len], labels[s: s + max_len]
                if has_target(block_labels):
                    self.input_ids.append(as_tensor(block_ids))
                    self.labels.append(as_tensor(block_labels))
                    kept += 1
            self.num_skipped += kept == 0
        finish(self, "pretrain", self.source, len(self.input_ids), first_empty, max_len)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[idx], "labels": self.labels[idx]}
