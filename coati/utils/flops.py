"""Model FLOPs of a training step and MFU (model FLOPs utilisation) of a dense decoder.

MFU counts the arithmetic the job needs, not what the kernels spent: every matmul weight once per token
(``2 x weights`` forward), the LM head only on the positions the loss reads (coati never runs it
elsewhere), and causal attention over each sample's own tokens (``s (s + 1) / 2`` query-key pairs of a
sample of ``s`` tokens, none across a packed row's samples). Backward computes each matmul's input gradient
(as many FLOPs as its forward) and, for a weight that trains, its weight gradient (as many again): a full
fine-tune's step is 3x the forward, a frozen weight's (LoRA's base, a frozen head) 2x. Counted from every
weight's shape (``in x out``), so a quantized base counts what it computes, not its packed storage.
Embedding lookups, norms, activations and the optimizer are not counted (they are not matmuls). Left
over-counted: the first layer's frozen q / k / v and their adapters' A under LoRA with a frozen embedding
(autograd needs no input gradient below the first trainable weight), mixture-of-experts layers
(all experts' weights), sliding windows (full causal).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from . import IGNORE_INDEX

# dense bf16 tensor-core peak, TFLOP/s, by the marketing name torch.cuda.get_device_name() contains
# (the SXM parts; the first match wins, so the PCIe / NVL variants come first)
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("B200", 2250.0),
)


@dataclass(frozen=True)
class DecoderShape:
    """What a dense decoder's matmul count needs: weights per token, the head, and attention's width."""

    body_weights: int  # elements (in x out) of every matmul weight except the LM head's
    head_weights: int  # the LM head's (with any adapter on it)
    layers: int
    attention_width: int  # query heads x head dim
    body_frozen: int = 0  # of body_weights, those that do not train (no weight gradient)
    head_frozen: int = 0

    @classmethod
    def of(cls, model: nn.Module) -> "DecoderShape":
        """Read from a Hugging Face causal LM, or a coati wrapper (its ``.model`` is one)."""
        lm = model if hasattr(model, "get_output_embeddings") else model.model
        in_head = {id(m) for m in lm.get_output_embeddings().modules()}  # a LoRA-wrapped head: base + adapter
        idle = {id(c) for m in lm.modules() if hasattr(m, "modules_to_save") and hasattr(m, "original_module")
                for c in m.original_module.modules()}  # peft's kept original beside a trained copy: never runs
        counts = {(h, f): 0 for h in (True, False) for f in (True, False)}  # (in the head, frozen) -> elements
        for m in lm.modules():
            if id(m) in idle:
                continue
            if isinstance(m, nn.Linear):
                elements = m.in_features * m.out_features
            elif type(m).__name__ == "Conv1D":  # GPT-2's
                elements = m.weight.shape[0] * m.weight.shape[1]
            else:
                continue
            counts[id(m) in in_head, not m.weight.requires_grad] += elements
        cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(counts[False, False] + counts[False, True], counts[True, False] + counts[True, True],
                   cfg.num_hidden_layers, heads * head_dim, counts[False, True], counts[True, True])

    def matmul_flops(self, tokens: int, head_tokens: int) -> float:
        """Forward + backward FLOPs of the weight matmuls: the body on ``tokens``, the head on ``head_tokens``
        (6 per weight element and token where the weight trains, 4 where it is frozen)."""
        return (2.0 * tokens * (3 * self.body_weights - self.body_frozen)
                + 2.0 * head_tokens * (3 * self.head_weights - self.head_frozen))

    def attention_flops(self, sample_lengths: list[int]) -> float:
        """Forward + backward FLOPs of causal attention within each sample (q.k and p.v per query-key pair)."""
        pairs = sum(s * (s + 1) // 2 for s in sample_lengths)
        return 3.0 * 4 * self.layers * self.attention_width * pairs

    def train_flops(self, sample_lengths: list[int], head_tokens: int) -> float:
        """Model FLOPs of one training forward + backward over samples of these lengths."""
        return self.matmul_flops(sum(sample_lengths), head_tokens) + self.attention_flops(sample_lengths)

    def batch_flops(self, batch: dict[str, Any]) -> float:
        """:meth:`train_flops` of a collated SFT batch, padded or packed (the same samples, the same count)."""
        return self.train_flops(batch_sample_lengths(batch), head_positions(batch))


def batch_sample_lengths(batch: dict[str, Any]) -> list[int]:
    """Each sample's token count in a collated SFT batch, padded (``attention_mask``) or packed
    (``sample_ids``, -1 on pad slots)."""
    if "packed" in batch:
        ids = batch["packed"].sample_ids
        counts = torch.bincount(ids[ids >= 0].flatten())
        return [int(c) for c in counts if c > 0]
    return [int(n) for n in batch["attention_mask"].sum(1) if n > 0]


def head_positions(batch: dict[str, Any]) -> int:
    """Positions whose next token is a label: where coati runs the LM head."""
    return int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a known accelerator, else None (MFU is then not reported)."""
    return next((tf for name, tf in PEAK_BF16_TFLOPS if name in device_name), None)


def device_peak_tflops(device: torch.device) -> float | None:
    """The peak MFU is measured against on ``device``: ``COATI_PEAK_TFLOPS`` where set (a GPU the table lacks,
    another precision), else the table's figure for a CUDA device, else None (CPUs have no figure here)."""
    if os.environ.get("COATI_PEAK_TFLOPS"):
        return float(os.environ["COATI_PEAK_TFLOPS"])
    if device.type == "cuda":
        return peak_bf16_tflops(torch.cuda.get_device_name(device))
    return None
