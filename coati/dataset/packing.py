"""Padding-free packing: a micro-batch's samples are concatenated into rows without padding between them.

Each sample keeps its own position ids (0, 1, ... restarting at every sample) and no token attends across a
sample boundary: under ``"dense"`` and ``"varlen"`` (below) the model gets ``attention_mask=None`` (or an
explicit mask for pairs) and transformers builds a block-diagonal causal mask from the position ids
(``masking_utils.find_packed_sequence_indices``; varlen kernels for ``flash_attention_2``), which only
architectures named by :func:`coati.models.families.supports_packing` do; under ``"segments"`` each sample
attends by itself.

Packing happens inside the collator, over the samples the sampler chose for the micro-batch, so a step sees
exactly the samples of the unpacked run: loss normalisation, data order and resume positions are unchanged,
only the padding goes. Rows are filled first-fit by decreasing length (ties by batch position), which is
deterministic, so a resumed run packs identically.

Row layouts, by the model's attention (``attention``, :func:`coati.models.packing_attention`):

- ``"segments"`` (coati's sdpa, :mod:`coati.models.segment_attention`): one row with no padding, carrying its
  layout as ``segments``; pairs share their prompt. A batch in which no pair longer than
  :data:`SEGMENT_MIN_UNIT` tokens shares its prompt is laid out ``"dense"`` instead (:func:`_segments_pay`).
- ``"dense"`` (eager; plain sdpa): every query-key score of a row is computed, masked or not, so rows are as
  long as the batch's longest unit (a sample, or a pair sharing its prompt): packed samples never take more
  slots or attention than padded ones.
- ``"varlen"`` (flash, flex): the kernels skip what the position ids rule out, so rows fill ``max_len``;
  pairs are packed with each side whole (position ids cannot express a shared prompt).

A packed batch holds ``input_ids`` and ``labels`` where a padded one does (each sample's first label set to
-100: the previous sample's last token must not predict it), and its layout as a :class:`PackedLayout` under
``"packed"``, which gives the model call's arguments (:meth:`PackedLayout.model_inputs`);
:func:`sample_sums` and :func:`last_token_flat_index` read per-sample values back.

A reward or preference pair whose sides start with the same tokens is one unit, ``[chosen | rejected after
the common prefix]`` (:func:`pack_pairs`), the rejected part's position ids continuing from the prefix, so
the prompt runs through the model once (24% fewer tokens a pair on the preference demo set at 256 tokens).
Position ids cannot say that the rejected part sees the prefix but not the chosen answer between them, so such
a batch also carries ``segments`` or ``shared_ids``, from which :func:`model_inputs` builds the explicit mask
:func:`pair_attention_mask`. The prefix stops before the first labelled token and leaves the rejected side at
least one token, so every label is predicted from the same context as unpacked and every sample keeps a last
token of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch

from ..models.segment_attention import Segments
from .collators import _check_pad
from ..utils import IGNORE_INDEX

ATTENTION_LAYOUTS = ("segments", "dense", "varlen")
# a "segments" batch whose units are all this short is laid out "dense": one masked call over short rows
# costs less than a call per sample (tiny pipeline model, 32 pairs of ~28 tokens: 55-70 ms a step dense,
# 100-117 ms by segments; 256-wide model, ~415-token pairs: segments 1.4x faster)
SEGMENT_MIN_UNIT = 128


@dataclass(frozen=True)
class PackedLayout:
    """Where a packed micro-batch's samples sit in its rows (module doc): what the model needs to keep them
    apart, and what the losses need to read per-sample values back. The tokens and labels stay under the keys a
    padded batch has, so one loss code path serves both."""

    position_ids: torch.Tensor  # (R, W), restarting at every sample
    sample_ids: torch.Tensor  # (R, W), the batch position of each token's sample, -1 on pad
    seq_lens: torch.Tensor  # (N,) tokens per sample
    shared_ids: torch.Tensor | None = None  # (R, W) pairs sharing a prompt: the rejected side reading the token
    segments: Segments | None = None  # "segments" attention: each piece and the prefix it reads

    @property
    def num_samples(self) -> int:
        return int(self.seq_lens.shape[0])

    def model_inputs(self) -> dict[str, Any]:
        """The model call's ``position_ids`` and ``attention_mask``: the :class:`Segments`, or
        :func:`pair_attention_mask` where pairs share a prompt, or None (transformers builds the mask from the
        position ids)."""
        mask = self.segments if self.segments is not None else pair_attention_mask(self.sample_ids, self.shared_ids)
        return {"position_ids": self.position_ids, "attention_mask": mask}

    def to(self, device: torch.device, non_blocking: bool = False) -> "PackedLayout":
        def move(value: Any) -> Any:
            return value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value

        return PackedLayout(*(move(getattr(self, f.name)) for f in fields(self)))


def _segments_pay(units: list["_Unit"], sizes: Sequence[int]) -> bool:
    """Whether a call per piece costs less than one masked call over rows as long as the longest unit: only
    where some unit longer than SEGMENT_MIN_UNIT holds a pair sharing its prompt (samples sharing nothing
    already compute little that is masked in such rows: SFT bench, Alpaca demo, 8 samples of up to 256
    tokens, coati over the plain loop 1.27 dense, 1.07 by segments; RM pairs 1.14x TRL -> 1.67x)."""
    return any(size > SEGMENT_MIN_UNIT and any(with_ >= 0 for *_, with_ in unit) for unit, size in zip(units, sizes))


def _check_attention(attention: str) -> None:
    if attention not in ATTENTION_LAYOUTS:
        raise ValueError(f"attention must be one of {ATTENTION_LAYOUTS}, not {attention!r}")


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


# one packed unit: (sample, first token, end, tokens shared with this other sample or -1) pieces, laid out in order
_Unit = list[tuple[int, int, int, int]]


def _pack_units(units: list[_Unit], input_ids: Sequence[torch.Tensor], labels: Sequence[torch.Tensor] | None,
                max_len: int, pad_token_id: int, attention: str) -> dict[str, Any]:
    """Lay units out first-fit into rows of ``max_len`` tokens (``"dense"``: of the longest unit's; ``"segments"``:
    all in one row, with its :class:`Segments`). A piece starting a sample's tokens in a row (not continuing the
    piece before it) loses its first label: the token before it is another sample's. Pad tails get position ids from
    0 (a segment of their own, after every real token, so causal attention never lets a real token see them)."""
    if not units:
        raise ValueError("cannot pack an empty batch")
    sizes = [sum(end - start for _, start, end, _ in unit) for unit in units]
    _check_attention(attention)
    if attention == "segments" and not _segments_pay(units, sizes):
        attention = "dense"
    rows = first_fit(sizes, {"dense": min(max_len, max(sizes)), "segments": sum(sizes)}.get(attention, max_len))
    width = max(sum(sizes[u] for u in row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    sid = torch.full((len(rows), width), -1, dtype=torch.long)
    shr = torch.full((len(rows), width), -1, dtype=torch.long)
    row_pieces: list[list[list[int]]] = []
    for r, row in enumerate(rows):
        at = 0
        pieces: list[list[int]] = []
        for u in row:
            previous = None
            shared_at: dict[int, tuple[int, int]] = {}  # sample -> (row offset, length) of the prefix it reads
            for i, start, end, with_ in units[u]:
                n = end - start
                if previous is not None and previous[0] == i:
                    pieces[-1][1] += n  # the same sample running on: one causal piece
                else:
                    pieces.append([at, at + n, *shared_at.get(i, (at, 0))])
                if with_ >= 0:
                    shared_at[with_] = (at, n)
                ids[r, at:at + n] = torch.as_tensor(input_ids[i][start:end], dtype=torch.long)
                pos[r, at:at + n] = torch.arange(start, end)
                if labels is not None:
                    skip = 0 if previous == (i, start) else 1
                    lab[r, at + skip:at + n] = torch.as_tensor(labels[i][start + skip:end], dtype=torch.long)
                sid[r, at:at + n] = i
                shr[r, at:at + n] = with_
                previous = (i, end)
                at += n
        pos[r, at:] = torch.arange(width - at)
        row_pieces.append(pieces)
    layout = PackedLayout(
        position_ids=pos, sample_ids=sid, seq_lens=torch.tensor([len(s) for s in input_ids]),
        shared_ids=shr if bool((shr >= 0).any()) else None,  # decided here, on the CPU, not in every forward
        segments=Segments(tuple(tuple(tuple(p) for p in pieces) for pieces in row_pieces)) if attention == "segments"
        else None)
    return {"input_ids": ids, "packed": layout} | ({"labels": lab} if labels is not None else {})


def pack(input_ids: Sequence[torch.Tensor], labels: Sequence[torch.Tensor] | None, max_len: int, pad_token_id: int,
         attention: str = "dense") -> dict[str, Any]:
    """Pack 1-D samples into rows (see the module doc)."""
    units = [[(i, 0, len(s), -1)] for i, s in enumerate(input_ids)]
    return _pack_units(units, input_ids, labels, max_len, pad_token_id, attention)


def shared_prefix_len(chosen: torch.Tensor, rejected: torch.Tensor,
                      rejected_labels: torch.Tensor | None = None) -> int:
    """Leading tokens a pair's sides can share (module doc): their common prefix, ending before the rejected
    side's last token and before the token preceding its first label (where the rejected part starts, its
    first token carries no label in a packed row, so it must be one no loss reads; the shared tokens count
    for the chosen side only, so none may be labelled on the rejected side)."""
    n = min(len(chosen), len(rejected) - 1)
    if rejected_labels is not None:
        labelled = torch.nonzero(torch.as_tensor(rejected_labels) != IGNORE_INDEX)
        if len(labelled):
            n = min(n, int(labelled[0]) - 1)
    if n <= 0:
        return 0
    differ = torch.nonzero(torch.as_tensor(chosen[:n]) != torch.as_tensor(rejected[:n]))
    return int(differ[0]) if len(differ) else n


def pack_pairs(chosen: Sequence[torch.Tensor], rejected: Sequence[torch.Tensor], max_len: int, pad_token_id: int,
               chosen_labels: Sequence[torch.Tensor] | None = None,
               rejected_labels: Sequence[torch.Tensor] | None = None,
               attention: str = "dense") -> dict[str, Any]:
    """Pack ``B`` pairs as ``2B`` samples, chosen sides at batch positions ``0..B-1``, a pair whose sides share
    a prefix one unit with it once (module doc), any other side a unit of its own (``"varlen"``: every side,
    position ids alone keeping them apart), laid out as ``attention`` says (``"varlen"``: rows of at most
    ``2 * max_len`` tokens, a pair's two sides at their longest, what the padded batch's ``2B`` rows of
    ``max_len`` hold)."""
    b = len(chosen)
    input_ids = list(chosen) + list(rejected)
    labels = None if chosen_labels is None else list(chosen_labels) + list(rejected_labels)
    units: list[_Unit] = []
    for i in range(b):
        s = 0 if attention == "varlen" else shared_prefix_len(chosen[i], rejected[i],
                                                         None if labels is None else rejected_labels[i])
        if s:
            units.append([(i, 0, s, b + i), (i, s, len(chosen[i]), -1), (b + i, s, len(rejected[i]), -1)])
        else:  # nothing shared: two samples, each placed on its own
            units += [[(i, 0, len(chosen[i]), -1)], [(b + i, 0, len(rejected[i]), -1)]]
    return _pack_units(units, input_ids, labels, 2 * max_len, pad_token_id, attention)


def is_packed(batch: dict[str, Any]) -> bool:
    return "packed" in batch


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments a model call takes for this batch: its layout's (:meth:`PackedLayout.model_inputs`)
    when packed, else its ``attention_mask``."""
    return batch["packed"].model_inputs() if is_packed(batch) else {"attention_mask": batch["attention_mask"]}


def pair_attention_mask(sample_ids: torch.Tensor, shared_ids: torch.Tensor | None) -> torch.Tensor | None:
    """``(R, 1, W, W)`` bool, True where query ``i`` may attend key ``j``: ``j <= i`` and ``j`` is of the same
    sample, or a prefix token ``i``'s sample shares. None where nothing is shared (position ids suffice)."""
    if shared_ids is None:
        return None
    width = sample_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=sample_ids.device).tril()
    same = sample_ids[:, :, None] == sample_ids[:, None, :]
    via_prefix = (shared_ids[:, None, :] == sample_ids[:, :, None]) & (shared_ids[:, None, :] >= 0)
    return ((same | via_prefix) & causal)[:, None]


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
    """``(real tokens, all token slots)`` of a collated batch, padded (``*attention_mask``) or packed, for
    throughput and the padding share."""
    if is_packed(batch):
        ids = batch["packed"].sample_ids
        return int((ids >= 0).sum()), ids.numel()
    masks = [v for k, v in batch.items() if k.endswith("attention_mask") and torch.is_tensor(v)]
    return sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)


class PackingCollator:
    """SFT / pretraining samples (``input_ids``, ``labels``) -> one packed batch (see the module doc).
    ``attention``: the row layout the model's attention takes (module doc; ``packing_attention(model)``)."""

    def __init__(self, pad_token_id: int | None, max_len: int, attention: str = "dense"):
        _check_attention(attention)
        self.pad_token_id = _check_pad(pad_token_id)
        self.max_len = max_len
        self.attention = attention

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        return pack([b["input_ids"] for b in batch], [b["labels"] for b in batch], self.max_len, self.pad_token_id,
                    attention=self.attention)


class PackingRewardCollator(PackingCollator):
    """Reward pairs -> one packed batch of ``2B`` samples, the chosen sides first (batch positions ``0..B-1``),
    each pair's prompt once (:func:`pack_pairs`)."""

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        return pack_pairs([b["chosen_input_ids"] for b in batch], [b["rejected_input_ids"] for b in batch],
                          self.max_len, self.pad_token_id, attention=self.attention)


class PackingPreferenceCollator(PackingCollator):
    """Preference pairs -> one packed batch of ``2B`` samples, the chosen sides first, each pair's prompt once
    (:func:`pack_pairs`), plus ``ref_logps`` when the dataset holds precomputed ones (the layout of
    :class:`~coati.dataset.PreferenceCollator`)."""

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        from .preference import PreferenceDataset, _ref

        out = pack_pairs(*([b[k] for b in batch] for k in ("chosen_input_ids", "rejected_input_ids")), self.max_len,
                         self.pad_token_id, *([b[k] for b in batch] for k in ("chosen_labels", "rejected_labels")),
                         attention=self.attention)
        ref = _ref(batch, PreferenceDataset.REF_KEYS)
        if ref is not None:
            out["ref_logps"] = ref
        return out


def sample_lengths(dataset: Any) -> list[int]:
    """Tokens per sample (all its ``*input_ids`` fields together), what ``--group_by_length`` sorts by."""
    return [sum(len(v) for k, v in dataset[i].items() if k.endswith("input_ids")) for i in range(len(dataset))]
