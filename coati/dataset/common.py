"""Pieces every dataset shares: record conversion with the empty-content policy, seeded subsets, splits,
and the one log line that reports what was dropped."""
from __future__ import annotations

import logging
import random
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch.utils.data import Dataset, Subset

from ..errors import UsageError
from .io import DatasetFormatError, EmptyFieldError, Record
from ..utils import IGNORE_INDEX

logger = logging.getLogger("coati")
T = TypeVar("T")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {tuple(choices)}")


def source_name(source: Any) -> str:
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        return str(source)
    return "<records>"


def convert_all(records: list[Record], convert: Callable[[Record], list[T]], empty: str
                ) -> tuple[list[tuple[Record, T]], int, EmptyFieldError | None]:
    """Apply a converter to every record. Structural errors always raise; an empty response / prompt raises
    with ``empty="raise"`` and is skipped and counted with ``empty="skip"``."""
    check_choice("empty", empty, ("skip", "raise"))
    out: list[tuple[Record, T]] = []
    n_empty, first = 0, None
    for rec in records:
        try:
            items = convert(rec)
        except EmptyFieldError as e:
            if empty == "raise":
                raise
            n_empty += 1
            first = first or e
            continue
        out.extend((rec, item) for item in items)
    return out, n_empty, first


def select_subset(items: list[T], max_size: int | None, seed: int) -> list[T]:
    """The first ``max_size`` items after a ``random.Random(seed)`` shuffle; all items, in file order, when
    no limit applies."""
    if max_size is None or max_size >= len(items):
        return items
    if max_size < 0:
        raise ValueError(f"max_datasets_size must be >= 0, got {max_size}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[:max_size]]


def has_target(labels: Sequence[int]) -> bool:
    """True when at least one label reaches the shifted LM loss (position 0 is never predicted)."""
    return any(label != IGNORE_INDEX for label in labels[1:])


def as_tensor(ids: Sequence[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def finish(dataset: Any, name: str, source: str, n: int, first_empty: EmptyFieldError | None,
           max_len: int | None, limit_name: str = "max_len") -> None:
    """Raise when nothing is left; log once what was truncated / skipped."""
    parts = []
    if dataset.num_empty:
        parts.append(f"skipped {dataset.num_empty} record(s) with empty content (first: {first_empty})")
    if dataset.num_truncated:
        parts.append(f"truncated {dataset.num_truncated} sample(s) to {limit_name}={max_len}")
    if dataset.num_skipped:
        parts.append(f"skipped {dataset.num_skipped} sample(s) longer than {limit_name}={max_len}")
    if n == 0:
        raise DatasetFormatError(source, None, None, f"no {name} samples left" + (": " + "; ".join(parts)
                                                                                   if parts else ""))
    if parts:
        logger.warning("%s %s: %d samples; %s", name, source, n, "; ".join(parts))
    else:
        logger.info("%s %s: %d samples", name, source, n)


def split_dataset(dataset: Dataset, eval_ratio: float, seed: int = 42) -> tuple[Dataset, Dataset | None]:
    """Seeded random split into ``(train, eval)`` subsets (each kept in dataset order); ``eval`` is None when
    ``eval_ratio`` is 0, else holds ``max(1, round(len * eval_ratio))`` items."""
    if not 0.0 <= eval_ratio < 1.0:
        raise ValueError(f"eval_ratio must be in [0, 1), got {eval_ratio}")
    n = len(dataset)
    n_eval = 0 if eval_ratio == 0 else max(1, round(n * eval_ratio))
    if n_eval == 0:
        return dataset, None
    if n_eval >= n:
        raise UsageError(f"--eval_ratio {eval_ratio} holds out all {n} usable records and leaves none to train on: "
                         "give more data, --eval_ratio 0, or --eval_dataset")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return Subset(dataset, sorted(order[n_eval:])), Subset(dataset, sorted(order[:n_eval]))
