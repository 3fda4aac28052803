"""Plain-text documents for the PPO-ptx language-modelling loss: ``{text}`` JSON / JSON lines, ``.txt`` (one
document per line), or ``{source, target}`` lines (joined). Each document is BOS (per the template module's
rule) + text + EOS with labels on every token but BOS. Longer documents keep their first ``max_len`` tokens
(``num_truncated``), or with ``chunk=True`` are cut into consecutive ``max_len`` blocks so nothing is lost.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from .common import as_tensor, convert_all, finish, has_target, select_subset, source_name
from .formats import pretrain_text
from .io import load_records
from .templates import SegmentEncoder


class PretrainDataset(Dataset):
    """Items ``{"input_ids": LongTensor, "labels": LongTensor}``."""

    def __init__(self, path: Any, tokenizer, *, max_len: int = 512, max_datasets_size: int | None = None,
                 seed: int = 42, chunk: bool = False, empty: str = "skip", split: str = "train"):
        self.source = source_name(path)
        records = load_records(path, split=split)
        texts, self.num_empty, first_empty = convert_all(records, lambda r: [pretrain_text(r)], empty)
        texts = select_subset(texts, max_datasets_size, seed)
        encoded = SegmentEncoder(tokenizer).encode_many([[(t, True)] for _, t in texts],
                                                        progress=len(texts) > 1000, desc="pretrain data")
        self.num_truncated = self.num_skipped = 0
        self.input_ids: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        for ids, labels in encoded:
            if len(ids) > max_len:
                self.num_truncated += 1
                starts = range(0, len(ids), max_len) if chunk else [0]
            else:
                starts = [0]
            for s in starts:
                block_ids, block_labels = ids[s: s + max_len], labels[s: s + max_len]
                if has_target(block_labels):
                    self.input_ids.append(as_tensor(block_ids))
                    self.labels.append(as_tensor(block_labels))
        finish(self, "pretrain", self.source, len(self.input_ids), first_empty, max_len)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[idx], "labels": self.labels[idx]}
