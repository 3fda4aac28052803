"""Attention by segments: a packed row's samples attend one at a time, so masked scores are never computed.

sdpa given a mask computes every query-key score of a row and masks most of them away: a row holding a pair
that shares its prompt (:mod:`coati.dataset.packing`) scores ``(c + r - s)^2`` pairs where the two sides
need ``c^2/2 + (r - s) r`` of them, and a row of several samples scores ``W^2`` where they need the sum of
their own triangles. Here each piece of a row (a sample, or a rejected side's tokens after the prompt it
shares) is one causal sdpa call over its own keys (plus the shared prompt's), so the cost is that of the
samples alone and a batch can be one row with no padding at all, the layout varlen kernels use on GPU.

Models loaded by coati with sdpa attention run ``"coati_sdpa"`` (:func:`use_segment_attention`): a call
without a segment layout is exactly transformers' sdpa (same function, same masks); a packed batch's call
carries its layout as the ``coati_segments`` keyword, which transformers hands on to the attention function
of every layer (and again when activation checkpointing recomputes one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

SEGMENT_SDPA = "coati_sdpa"


@dataclass(frozen=True)
class Segments:
    """A packed batch's layout: ``rows[r]``, the ``(start, end, prefix_start, prefix_len)`` pieces of row ``r``
    in order. A piece's queries ``[start, end)`` attend causally to its own tokens and to all ``prefix_len``
    tokens from ``prefix_start`` (the prompt a rejected side shares with its chosen side; 0: none). Slots no
    piece covers are padding, whose outputs are zero. A type of its own, which the model call recognises."""

    rows: tuple[tuple[tuple[int, int, int, int], ...], ...]


def _placeholder(rows: int, device: torch.device) -> torch.Tensor:
    """The 4D "mask" a segment call passes: transformers returns a 4D mask unchanged instead of building a
    ``W x W`` one; it is empty, so an attention that ignored the layout would fail, not attend everything."""
    return torch.zeros(rows, 1, 0, 0, dtype=torch.bool, device=device)


def segment_inputs(segments: Segments, rows: int, device: torch.device) -> dict[str, Any]:
    return {"attention_mask": _placeholder(rows, device), "coati_segments": segments}


def _piece_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, window: int | None,
                     dropout: float, scaling: float | None) -> torch.Tensor:
    """Causal attention of ``q``'s tokens over ``k`` / ``v``, whose first ``prefix`` tokens come before them.
    Grouped-query heads are repeated where a mask is given or heads are wide: CUDA's GQA-capable kernel takes
    neither (transformers' sdpa makes the same choice)."""
    n, m = q.shape[2], k.shape[2]
    mask = None
    if prefix or (window is not None and n > window):
        i = torch.arange(n, device=q.device)[:, None] + prefix
        j = torch.arange(m, device=q.device)[None, :]
        mask = j <= i
        if window is not None:
            mask &= (i - j) < window
    groups = q.shape[1] // k.shape[1]
    gqa = groups > 1 and mask is None and k.shape[-1] == v.shape[-1] <= 256
    if groups > 1 and not gqa:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                          is_causal=mask is None, enable_gqa=gqa)


def segment_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         coati_segments: Segments | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` ``(R, H, W, D)``, ``key`` / ``value``
    ``(R, H_kv, W, D)``; returns ``(R, W, H, D)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if coati_segments is None:
        if attention_mask is not None and attention_mask.shape[-1] == 0:
            raise RuntimeError("a packed batch's segment layout did not reach the attention function: this "
                               "architecture does not pass attention keywords through; train it with "
                               "--no-packing or eager attention")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    for unsupported in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"segment attention does not support {unsupported!r}; use eager attention")
    window = kwargs.get("sliding_window")
    width = query.shape[2]
    rows = []
    for r, pieces in enumerate(coati_segments.rows):
        bounds = [0]
        for start, end, _, _ in pieces:
            if start > bounds[-1]:
                bounds.append(start)
            bounds.append(end)
        if width > bounds[-1]:
            bounds.append(width)
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        index = {a: i for i, a in enumerate(bounds[:-1])}
        qs, ks, vs = (t[r:r + 1].split(sizes, 2) for t in (query, key, value))
        outs: list[torch.Tensor | None] = [None] * len(qs)
        for start, end, prefix_start, prefix_len in pieces:
            i = index[start]
            k, v = ks[i], vs[i]
            if prefix_len:
                src = index[prefix_start]
                k = torch.cat([ks[src][:, :, :prefix_len], k], 2)
                v = torch.cat([vs[src][:, :, :prefix_len], v], 2)
            outs[i] = _piece_attention(qs[i], k, v, prefix_len, window, dropout, scaling)
        pad = [q.new_zeros(*q.shape[:-1], value.shape[-1]) if o is None else o for q, o in zip(qs, outs)]
        rows.append(torch.cat(pad, 2))
    return torch.cat(rows, 0).transpose(1, 2).contiguous(), None


def _register() -> bool:
    """Register :data:`SEGMENT_SDPA`; False on a transformers without the interfaces (before 4.54)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_forward)
    AttentionMaskInterface.register(SEGMENT_SDPA, sdpa_mask)
    return True


def use_segment_attention(model: nn.Module) -> None:
    """Switch a model on transformers' sdpa to :data:`SEGMENT_SDPA` (identical for unpacked inputs); others
    (eager, flash, flex) keep theirs. Callers switch only architectures packing supports: some others branch
    on the name "sdpa" itself. The name is not saved: checkpoints load in plain transformers."""
    config = getattr(model, "config", None)
    if (config is None or getattr(config, "_attn_implementation", None) != "sdpa"
            or not hasattr(model, "set_attn_implementation") or not _register()):
        return
    model.set_attn_implementation(SEGMENT_SDPA)
