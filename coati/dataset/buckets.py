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


def _is_bin(p: Path) -> bool:
    return p.name.startswith("part-") and (p / "state.json").is_file()  # a `datasets` save_to_disk dir


def _bins(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if _is_bin(p))


def _categories(d: Path) -> list[tuple[Path, list[Path]]]:
    """``[(category dir, [bin dirs in order])]`` that ``d`` names: a prepared dir (its ``arrow/``), an ``arrow/``
    dir, one category's dir (``arrow/<category>``), or one bin of a category (``arrow/<category>/part-NNNNN``)."""
    if _is_bin(d):
        return [(d.parent, [d])]
    arrow = d / "arrow" if (d / "arrow").is_dir() else d
    if _bins(arrow):
        return [(arrow, _bins(arrow))]
    return [(sub, _bins(sub)) for sub in sorted(p for p in arrow.iterdir() if p.is_dir()) if _bins(sub)]


class BinnedDataset(Dataset):
    """Items ``{"input_ids", "labels"}`` of every bin the given dirs name (prepared dirs, their ``arrow/``,
    category dirs or single bins; the bins of one category, however named, are one sub-dataset, sub-datasets
    in the order first named), plus where each bin lies: ``bins[s][b]`` is the range of global indices of bin
    ``b`` of sub-dataset ``s``."""

    def __init__(self, dirs: Sequence[str | Path]):
        from datasets import load_from_disk

        subs: dict[Path, set[Path]] = {}
        for d in map(Path, dirs):
            if not d.is_dir():
                raise MissingInputError(f"{d}: no such prepared dataset dir")
            found = _categories(d)
            if not found:
                raise MissingInputError(f"{d}: no prepared data (arrow/<category>/{bin_name(0)} dirs) under it; "
                                        "name a prepared dir, its arrow/, a category dir or a bin dir (run "
                                        "prepare_pretrain_dataset.py or prepare_sft_dataset.py first)")
            for category, bin_dirs in found:
                subs.setdefault(category.resolve(), set()).update(b.resolve() for b in bin_dirs)
        self.parts: list = []
        self.names: list[str] = []
        self.bins: list[list[range]] = []
        self.offsets: list[int] = []
        total = 0
        for category, bin_dirs in subs.items():
            ranges = []
            for bd in sorted(bin_dirs):
                part = load_from_disk(str(bd)).with_format("torch")
                self.parts.append(part)
                self.offsets.append(total)
                ranges.append(range(total, total + len(part)))
                total += len(part)
            prepared = category.parent.parent if category.parent.name == "arrow" else category.parent
            self.names.append(f"{prepared.name}/{category.name}")
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
