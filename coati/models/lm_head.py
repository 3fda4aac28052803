"""The LM head only where it is needed, in chunks: per-token log-probs without ``(B, T, V)`` logits.

Losses and log-probs need the logits of a few positions (labelled tokens for SFT / PTX / DPO, action tokens
for PPO / GRPO), one row at a time. :func:`token_log_probs` takes the final hidden states of just those rows
and computes ``log_softmax(process(h W^T + b) / T)[target]`` ``chunk_size`` rows at a time, so peak logits
memory is O(chunk x V) in forward *and* backward: the fused path is an autograd function that recomputes each
chunk's logits in backward instead of keeping them. ``process`` is the family's own logit processing
(:class:`LogitProcessing`: Gemma 2/3 final soft-capping, Cohere / Granite logit scaling), applied exactly as
the model's forward applies it.

A head that is not a plain ``nn.Linear`` over a plain tensor (peft LoRA on the head, a bitsandbytes layer, a
tensor-parallel DTensor weight, a custom module) runs as its own module on the same chunks, each chunk under
activation checkpointing so backward again holds one chunk's logits at a time (:func:`fused_head` decides).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

# elements of one chunk of logits (32 MiB in fp32): chunk_size = this // V rows when not given
_CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class LogitProcessing:
    """What a family's forward does to ``lm_head``'s output: ``logits * scale``, then (when ``softcap``)
    ``softcap * tanh(logits / softcap)``."""

    scale: float = 1.0
    softcap: float | None = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_processing(config: Any) -> LogitProcessing:
    """The logit processing a transformers config asks for, under the names its families use:
    ``final_logit_softcapping`` (Gemma 2/3/3n), ``logit_scale`` (Cohere, a factor), ``logits_scaling``
    (Granite, a divisor; MiniCPM3 divides the hidden states by it, the same for a bias-free head)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    if getattr(text, "logit_scale", None) is not None:
        scale *= float(text.logit_scale)
    if getattr(text, "logits_scaling", None) is not None:
        scale /= float(text.logits_scaling)
    softcap = getattr(text, "final_logit_softcapping", None)
    return LogitProcessing(scale=scale, softcap=float(softcap) if softcap else None)


def fused_head(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight, bias)`` when ``head`` is a plain ``nn.Linear`` on plain tensors, which the fused chunked
    function computes itself; None when the module must run as itself (LoRA / quantized / custom layers are
    other classes, tensor-parallel weights are DTensors)."""
    if type(head) is not nn.Linear:
        return None
    tensors = [head.weight] + ([head.bias] if head.bias is not None else [])
    if any(type(t.data) is not torch.Tensor for t in tensors):
        return None
    return head.weight, head.bias


def _chunk_rows(chunk_size: int | None, vocab: int) -> int:
    return chunk_size or max(1, _CHUNK_ELEMENTS // vocab)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on (as ``lm_head`` would under it)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _raw_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
    out = h.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        out = out + bias.to(dtype)
    return out.float()


def _processed_(raw: torch.Tensor, temperature: float, processing: LogitProcessing
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``processing(raw) / temperature`` computed in place over ``raw`` (a chunk's fresh fp32 logits), and
    the soft-cap's ``tanh`` that backward needs (then the result is a second tensor), so a chunk costs one or
    two ``(chunk, V)`` buffers."""
    if processing.scale != 1.0:
        raw.mul_(processing.scale)
    if processing.softcap is None:
        return raw.div_(temperature), None
    tanh = raw.div_(processing.softcap).tanh_()
    return tanh * (processing.softcap / temperature), tanh


class _ChunkedLogProbs(torch.autograd.Function):
    """``log_softmax(process(h W^T + b) / T)[y]`` per row; backward recomputes each chunk's logits.

    With ``z = s(l) / T``, ``l = scale * (h W^T + b)`` and ``s`` the soft-cap, the gradient of a row's
    log-prob wrt its raw logits is ``g (onehot(y) - softmax(z)) s'(l) scale / T`` with
    ``s'(l) = 1 - tanh(l / c)^2``; hidden, weight and bias gradients follow from the matmul.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, processing, chunk):
        dtype = _compute_dtype(hidden)
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = torch.empty_like(out)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                z, _ = _processed_(_raw_logits(hidden[s:s + chunk], weight, bias, dtype), temperature, processing)
                lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
                out[s:s + chunk] = z.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
                del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.settings = (temperature, processing, chunk, dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        temperature, processing, chunk, dtype = ctx.settings
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        w = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h, g = hidden[s:s + chunk], grad_out[s:s + chunk].float()
                d, tanh = _processed_(_raw_logits(h, weight, bias, dtype), temperature, processing)
                # g * (onehot - softmax), in place over the chunk's logits, then the chain rule back to raw
                d.sub_(lse[s:s + chunk, None]).exp_().mul_(-g[:, None])
                d.scatter_add_(-1, targets[s:s + chunk, None], g[:, None])
                d.mul_(processing.scale / temperature)
                if tanh is not None:
                    d.mul_(tanh.mul_(tanh).neg_().add_(1))
                    del tanh
                if need_h:
                    grad_h[s:s + chunk] = (d.to(dtype) @ w).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(d.t(), h.float())
                if need_b:
                    grad_b += d.sum(0)
                del d
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None)


def _module_log_probs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                      processing: LogitProcessing) -> torch.Tensor:
    z = processing.apply(head(hidden).float()) / temperature
    return z.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)


def token_log_probs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    processing: LogitProcessing = LogitProcessing(), chunk_size: int | None = None) -> torch.Tensor:
    """Log-prob of ``targets`` ``(N,)`` under ``log_softmax(processing(head(hidden)) / temperature)``, fp32,
    for ``hidden`` ``(N, H)``: the rows that need a prediction, gathered by the caller. Logits exist for
    ``chunk_size`` rows at a time (default: 2^23 / V rows), in backward too."""
    parts = fused_head(head)
    vocab = head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
    chunk = _chunk_rows(chunk_size, vocab)
    if parts is not None:
        weight, bias = parts
        return _ChunkedLogProbs.apply(hidden, weight, bias, targets, float(temperature), processing, chunk)
    from torch.utils.checkpoint import checkpoint

    outs = []
    for s in range(0, hidden.shape[0], chunk):
        args = (head, hidden[s:s + chunk], targets[s:s + chunk], float(temperature), processing)
        if torch.is_grad_enabled():
            outs.append(checkpoint(_module_log_probs, *args, use_reentrant=False))
        else:
            outs.append(_module_log_probs(*args))
    return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def token_entropy(head: nn.Module, hidden: torch.Tensor, temperature: float = 1.0,
                  processing: LogitProcessing = LogitProcessing(), chunk_size: int | None = None) -> torch.Tensor:
    """Entropy ``(N,)`` of ``softmax(processing(head(hidden)) / temperature)`` per row, chunked, no grad
    (PPO logs it as ``actor/entropy``)."""
    parts = fused_head(head)
    vocab = head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
    chunk = _chunk_rows(chunk_size, vocab)
    dtype = _compute_dtype(hidden)
    out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk):
        h = hidden[s:s + chunk]
        if parts is not None:
            with torch.autocast(hidden.device.type, enabled=False):
                raw = _raw_logits(h, *parts, dtype)
        else:
            raw = head(h).float()
        z = processing.apply(raw) / temperature
        out[s:s + chunk] = torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)
    return out
