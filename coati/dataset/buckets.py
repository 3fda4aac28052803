"""Bucket-based training over binned data (Colossal-LLaMA): every epoch walks buckets, each made of one bin
from every sub-dataset (category), in a seeded order, so the mixture of categories stays balanced across the
run instead of one category's samples clustering in time.

Bin ``b`` of every sub-dataset forms bucket ``b``; each epoch the buckets are taken in a seeded permutation
(seed + epoch) and each bucket's samples in a seeded shuffle; with several processes each rank takes every
W-th index of that order (the tail that does not fill all ranks is dropped). The sampler can start part-way
through an epoch (``start_index``), which SupervisedTrainer uses for exact resume.
"""
from __future__ import annotations

import bisect
import random
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from ..errors import MissingInputError
from .spliced import bin_name


def _bin_dirs(root: Path) -> list[tuple[str, list[Path]]]:
    """``[(sub_dataset, [bin dirs in order])]`` under a prepared dir (its ``arrow/``) or an ``arrow/`` dir."""
    arrow = root / "arrow" if (root / "arrow").is_dir() else root
    found = []
    for sub in sorted(p for p in arrow.iterdir() if p.is_dir()):
        bins = sorted(p for p in sub.iterdir() if p.is_dir() and p.name.startswith("part-"))
        if bins:
            found.append((f"{root.name}/{sub.name}", bins))
    return found


class BinnedDataset(Dataset):
    """Items ``{"input_ids", "labels"}`` of every bin under one or more prepared dirs, plus where each bin
    lies: ``bins[s][b]`` is the range of global indices of bin ``b`` of sub-dataset ``s``."""

    def __init__(self, dirs: Sequence[str | Path]):
        from datasets import load_from_disk

        self.parts: list = []
        self.names: list[str] = []
        self.bins: list[list[range]] = []
        self.offsets: list[int] = []
        total = 0
        for d in dirs:
            d = Path(d)
            if not d.is_dir():
                raise MissingInputError(f"{d}: no such prepared dataset dir")
            subs = _bin_dirs(d)
            if not subs:
                raise MissingInputError(f"{d}: no arrow/<category>/{bin_name(0)} dirs (run "
                                        "prepare_pretrain_dataset.py or prepare_sft_dataset.py first)")
            for name, bin_dirs in subs:
                ranges = []
                for bd in bin_dirs:
                    part = load_from_disk(str(bd)).with_format("torch")
                    self.parts.append(part)
                    self.offsets.append(total)
                    ranges.append(range(total, total + len(part)))
                    total += len(part)
                self.names.append(name)
                self.bins.append(ranges)
        self.total = total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        k = bisect.bisect_right(self.offsets, idx) - 1
        row = self.parts[k][idx - self.offsets[k]]
        return {"input_ids": row["input_ids"].long(), "labels": row["labels"].long()}


def bucket_order(bins: list[list[range]], seed: int, epoch: int) -> list[int]:
    """One epoch's global order: buckets (bin b of every sub-dataset) in a seeded permutation, each bucket's
    indices shuffled with the same generator."""
    rng = random.Random(seed + epoch)
    buckets = list(range(max((len(s) for s in bins), default=0)))
    rng.shuffle(buckets)
    order: list[int] = []
    for b in buckets:
        members = [i for sub in bins if b < len(sub) for i in sub[b]]
        rng.shuffle(members)
        order.extend(members)
    return order


class BucketSampler(Sampler[int]):
    """This rank's share of :func:`bucket_order`, resumable part-way through an epoch."""

    def __init__(self, bins: list[list[range]], *, num_replicas: int = 1, rank: int = 0, seed: int = 42) -> None:
        self.bins, self.num_replicas, self.rank, self.seed = bins, num_replicas, rank, seed
        self.epoch = 0
        self.start_index = 0
        self.num_samples = sum(len(r) for sub in bins for r in sub) // num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = bucket_order(self.bins, self.seed, self.epoch)[: self.num_samples * self.num_replicas]
        mine = order[self.rank:: self.num_replicas]
        start, self.start_index = self.start_index, 0
        return iter(mine[start:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index
