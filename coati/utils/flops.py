"""Model FLOPs of a training step and MFU (model FLOPs utilisation) of a dense decoder.

MFU counts the arithmetic the job needs, not what the kernels spent: every matmul weight once per token
(``2 x weights`` forward), the LM head only on the positions the loss reads (coati never runs it
elsewhere), and causal attention over each sample's own tokens (``s (s + 1) / 2`` query-key pairs of a
sample of ``s`` tokens, none across a packed row's samples). A training step is 3x the forward (backward:
the input and the weight gradients), as for full fine-tuning. Embedding lookups, norms, activations and
the optimizer are not counted (they are not matmuls). Mixture-of-experts layers would be over-counted (all
experts' weights), LoRA's frozen weights too (no weight gradients), sliding windows too (full causal).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

# dense bf16 tensor-core peak, TFLOP/s, by the marketing name torch.cuda.get_device_name() contains
# (the SXM parts; the first match wins, so the PCIe / NVL variants come first)
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("B200", 2250.0),
)


@dataclass(frozen=True)
class DecoderShape:
    """What a dense decoder's matmul count needs: weights per token, the head, and attention's width."""

    body_weights: int  # elements of every matmul weight except the LM head's
    head_weights: int
    layers: int
    attention_width: int  # query heads x head dim

    @classmethod
    def of(cls, model: nn.Module) -> "DecoderShape":
        """Read from a Hugging Face causal LM, or a coati wrapper (its ``.model`` is one)."""
        lm = model if hasattr(model, "get_output_embeddings") else model.model
        head = lm.get_output_embeddings()
        matmuls = [m for m in lm.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
        body = sum(m.weight.numel() for m in matmuls if m is not head)
        cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(body, head.weight.numel(), cfg.num_hidden_layers, heads * head_dim)

    def matmul_flops(self, tokens: int, head_tokens: int) -> float:
        """Forward + backward FLOPs of the weight matmuls: the body on ``tokens``, the head on ``head_tokens``."""
        return 3.0 * (2 * self.body_weights * tokens + 2 * self.head_weights * head_tokens)

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
    if "sample_ids" in batch:
        ids = batch["sample_ids"]
        counts = torch.bincount(ids[ids >= 0].flatten())
        return [int(c) for c in counts if c > 0]
    return [int(n) for n in batch["attention_mask"].sum(1) if n > 0]


def head_positions(batch: dict[str, Any]) -> int:
    """Positions whose next token is a label: where coati runs the LM head."""
    return int(batch["labels"][:, 1:].ne(-100).sum())


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
