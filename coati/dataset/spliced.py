"""Colossal-LLaMA's prepared data: tokenised once, spliced, split into bins per category, written to disk.

Pretraining records ``{source, target, category}`` become ``BOS source target EOS`` with labels on ``target``
and its EOS only (the one tokenisation rule of :mod:`.templates`); a sample longer than ``max_length`` is cut
into ``max_length`` blocks, then consecutive samples are spliced (concatenated) while the total stays within
``max_length``, so no token is lost or repeated. SFT records (``{messages: [{from, content}]}``) are encoded
as :class:`~coati.dataset.SFTDataset` encodes them (loss on assistant turns) and are not spliced.

Each category's samples are shuffled (seeded), then split into ``num_bins`` contiguous bins of near-equal size
(fewer when there are fewer samples). The output dir holds::

    cache/<category>/            the tokenised samples before splicing (a datasets dir)
    jsonl/<category>/part-00000.jsonl ...   one {"input_ids", "labels"} line a sample
    arrow/<category>/part-00000/ ...        the same bins as ``datasets.load_from_disk`` dirs (training reads these)

and each bin's dir name gives its place in bucket-based training (:mod:`.buckets`).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import UsageError
from .io import Record, load_records
from .sft import encode_sft_records

Sample = tuple[list[int], list[int]]
DEFAULT_CATEGORY = "default"


def record_category(rec: Record) -> str:
    """A record's ``category`` (else its file's name) as a safe dir name."""
    name = str(rec.data.get("category") or (Path(rec.path).stem if rec.path != "<records>" else DEFAULT_CATEGORY))
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or DEFAULT_CATEGORY


def load_dirs(dirs: Sequence[str | Path]) -> list[Record]:
    """Every record of every data file in the given dirs (or files), in order."""
    return [rec for d in dirs for rec in load_records(str(d))]


def encode_by_category(records: list[Record], tokenizer, *, prompt_template: str = "none", max_length: int | None
                       = None, seed: int = 42) -> dict[str, list[Sample]]:
    """``{category: [(input_ids, labels)]}`` in record order: {source, target} records as ``BOS source target
    EOS`` (labels on target), chats and Alpaca records through ``prompt_template`` (labels on responses)."""
    encoded, _, _ = encode_sft_records(records, tokenizer, prompt_template=prompt_template, max_datasets_size=None,
                                       seed=seed, empty="skip", split="train", desc="tokenizing")
    out: dict[str, list[Sample]] = {}
    for rec, sample in encoded:
        out.setdefault(record_category(rec), []).append(sample)
    return out


def chunk(sample: Sample, max_length: int) -> list[Sample]:
    """A sample cut into consecutive blocks of at most ``max_length`` tokens."""
    ids, labels = sample
    return [(ids[s: s + max_length], labels[s: s + max_length]) for s in range(0, len(ids), max_length)]


def splice(samples: Iterable[Sample], max_length: int) -> list[Sample]:
    """Consecutive samples concatenated while the total stays within ``max_length`` (longer ones chunked
    first): every input token appears exactly once in the output, in order."""
    if max_length < 1:
        raise UsageError(f"--max_length must be >= 1, got {max_length}")
    out: list[Sample] = []
    ids: list[int] = []
    labels: list[int] = []
    for sample in samples:
        for block_ids, block_labels in chunk(sample, max_length):
            if ids and len(ids) + len(block_ids) > max_length:
                out.append((ids, labels))
                ids, labels = [], []
            ids.extend(block_ids)
            labels.extend(block_labels)
    if ids:
        out.append((ids, labels))
    return out


def split_bins(samples: list[Any], num_bins: int) -> list[list[Any]]:
    """``num_bins`` contiguous bins whose sizes differ by at most one (no empty bin: fewer bins when there are
    fewer samples)."""
    if num_bins < 1:
        raise UsageError(f"--num_spliced_dataset_bins must be >= 1, got {num_bins}")
    n = min(num_bins, len(samples))
    size, extra = divmod(len(samples), n) if n else (0, 0)
    bins, start = [], 0
    for b in range(n):
        end = start + size + (b < extra)
        bins.append(samples[start:end])
        start = end
    return bins


def bin_name(index: int) -> str:
    return f"part-{index:05d}"


def _rows(samples: list[Sample]) -> list[dict[str, list[int]]]:
    return [{"input_ids": ids, "labels": labels} for ids, labels in samples]


def write_bins(by_category: dict[str, list[Sample]], output_dir: str | Path, *, num_bins: int,
               max_length: int | None, seed: int = 42) -> dict[str, list[int]]:
    """Shuffle each category (seeded), splice it when ``max_length`` is given, split it into bins and write
    ``cache/``, ``jsonl/`` and ``arrow/`` (see module doc); returns ``{category: [samples per bin]}``."""
    from datasets import Dataset

    out = Path(output_dir)
    summary: dict[str, list[int]] = {}
    for category, samples in sorted(by_category.items()):
        Dataset.from_list(_rows(samples)).save_to_disk(str(out / "cache" / category))
        order = list(range(len(samples)))
        random.Random(seed).shuffle(order)
        shuffled = [samples[i] for i in order]
        ready = splice(shuffled, max_length) if max_length else shuffled
        bins = split_bins(ready, num_bins)
        (out / "jsonl" / category).mkdir(parents=True, exist_ok=True)
        for b, part in enumerate(bins):
            rows = _rows(part)
            with open(out / "jsonl" / category / f"{bin_name(b)}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            Dataset.from_list(rows).save_to_disk(str(out / "arrow" / category / bin_name(b)))
        summary[category] = [len(p) for p in bins]
    return summary
