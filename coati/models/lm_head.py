"""The LM head only where it is needed, in chunks: per-token log-probs without ``(B, T, V)`` logits.

Losses and log-probs need the logits of a few positions (labelled tokens for SFT / PTX / DPO, action tokens
for PPO / GRPO), one row at a time. :func:`token_log_probs` takes the final hidden states of just those rows
and computes ``log_softmax(process(h W^T + b) / T)[target]`` ``chunk_size`` rows at a time, so peak logits
memory is O(chunk x V) in forward *and* backward: the fused path is an autograd function that recomputes each
chunk's logits in backward instead of keeping them. A summed log-prob (an LM loss, where every row weighs the
same) gets its gradients in the forward pass instead, with no recomputation, or from liger-kernel's fused
linear cross-entropy on CUDA when that is installed. ``process`` is the family's own logit processing
(:class:`LogitProcessing`: Gemma 2/3 final soft-capping, Cohere / Granite logit scaling), applied exactly as
the model's forward applies it.

A head that is not a plain ``nn.Linear`` over a plain tensor (peft LoRA on the head, a bitsandbytes layer, a
tensor-parallel DTensor weight, a custom module) runs as its own module on the same chunks, each chunk under
activation checkpointing so backward again holds one chunk's logits at a time (:func:`fused_head` decides).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

# elements of one chunk of logits (32 MiB in fp32): chunk_size = this // V rows when not given
_CHUNK_ELEMENTS = 1 << 23
_KEEP_GRADS = [False]  # inside keep_head_grads()


@contextlib.contextmanager
def keep_head_grads() -> Iterator[None]:
    """A backward in here keeps the fused head's precomputed gradients for a second backward over the same graph
    (LOMO's gradient-norm pass, :func:`coati.trainer.optim.fused_backward`); otherwise they are freed."""
    _KEEP_GRADS[0] = True
    try:
        yield
    finally:
        _KEEP_GRADS[0] = False


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


# model_type -> (config field, True: logits are multiplied by it / False: divided), as each family's forward does
LOGIT_SCALES: dict[str, tuple[str, bool]] = {
    **{t: ("logit_scale", True) for t in ("cohere", "cohere2", "cohere2_moe", "cohere_compass")},
    **{t: ("logits_scaling", False) for t in ("granite", "granite_swa", "granitemoe", "granitemoe_swa",
                                              "granitemoeshared", "granitemoehybrid", "minicpm3")},
    "hyperclovax": ("logits_scaling", True),
    **{t: ("output_multiplier", True) for t in ("muse_spark", "muse_glimmer")},
}


def logit_processing(config: Any) -> LogitProcessing:
    """The logit processing a transformers config's family applies after ``lm_head``: its scaling
    (:data:`LOGIT_SCALES`; MiniCPM3 divides the hidden states, the same for its bias-free head), then
    ``final_logit_softcapping`` (Gemma 2/3/3n and look-alikes), read from the text config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    field, multiply = LOGIT_SCALES.get(config.model_type, (None, True))
    value = getattr(text, field, None) if field else None
    if value is not None:
        scale = float(value) if multiply else 1.0 / float(value)
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


def _chunk_rows(chunk_size: int | None, head: nn.Module) -> int:
    vocab = head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
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


def _raw_grad_(z: torch.Tensor, tanh: torch.Tensor | None, lse: torch.Tensor, targets: torch.Tensor,
               g: torch.Tensor, temperature: float, processing: LogitProcessing) -> torch.Tensor:
    """In place over a chunk's processed logits ``z``: the gradient of ``sum(g * log p[y])`` wrt the raw
    logits. With ``l = scale * raw``, ``z = s(l) / T`` and ``s`` the soft-cap, a row's is
    ``g (onehot(y) - softmax(z)) s'(l) scale / T`` with ``s'(l) = 1 - tanh(l / c)^2``."""
    d = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])
    d.scatter_add_(-1, targets[:, None], g[:, None])
    d.mul_(processing.scale / temperature)
    if tanh is not None:
        d.mul_(tanh.mul_(tanh).neg_().add_(1))
    return d


class _Grads:
    """Hidden / weight / bias gradients accumulated chunk by chunk (weight and bias in fp32)."""

    def __init__(self, hidden, weight, bias, needs, dtype):
        self.hidden, self.w, self.dtype = hidden, weight.to(dtype), dtype
        need_h, need_w, need_b = needs
        self.h = torch.empty_like(hidden) if need_h else None
        self.weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        self.bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None

    def add(self, s: int, d: torch.Tensor) -> None:
        h = self.hidden[s:s + d.shape[0]]
        if self.h is not None:
            self.h[s:s + d.shape[0]] = (d.to(self.dtype) @ self.w).to(self.hidden.dtype)
        if self.weight is not None:
            self.weight.addmm_(d.t(), h.float())
        if self.bias is not None:
            self.bias += d.sum(0)

    def result(self, weight, bias, scale=None):
        out = [self.h, self.weight, self.bias]
        if scale is not None:
            out = [None if t is None else t * scale.to(t.dtype) for t in out]
        return (out[0], None if out[1] is None else out[1].to(weight.dtype),
                None if out[2] is None else out[2].to(bias.dtype))


class _ChunkedLogProbs(torch.autograd.Function):
    """``log_softmax(process(h W^T + b) / T)[y]`` per row; backward recomputes each chunk's logits, since the
    rows' gradients are only known then (see :func:`_raw_grad_` for the formula)."""

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
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3], dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                z, tanh = _processed_(_raw_logits(hidden[s:s + chunk], weight, bias, dtype), temperature,
                                      processing)
                grads.add(s, _raw_grad_(z, tanh, lse[s:s + chunk], targets[s:s + chunk],
                                        grad_out[s:s + chunk].float(), temperature, processing))
                del z, tanh
        return (*grads.result(weight, bias), None, None, None, None)


class _ChunkedLogProbSum(torch.autograd.Function):
    """``sum_i log_softmax(process(h_i W^T + b) / T)[y_i]``: every row weighs the same, so the gradients are
    computed in the forward pass from the logits it already holds (no recomputation: one matmul per chunk
    fewer) and backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, processing, chunk, with_grad):
        dtype = _compute_dtype(hidden)
        needs = [with_grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
        grads = _Grads(hidden, weight, bias, needs, dtype) if any(needs) else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                y = targets[s:s + chunk]
                z, tanh = _processed_(_raw_logits(hidden[s:s + chunk], weight, bias, dtype), temperature,
                                      processing)
                lse = torch.logsumexp(z, dim=-1)
                total += (z.gather(-1, y[:, None]).squeeze(-1) - lse).sum()
                if grads is not None:
                    ones = torch.ones_like(lse)
                    grads.add(s, _raw_grad_(z, tanh, lse, y, ones, temperature, processing))
                del z, tanh
        ctx.grads = grads
        ctx.weight_bias = (weight, bias)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads, (weight, bias) = ctx.grads, ctx.weight_bias
        if not _KEEP_GRADS[0]:  # freed after the last backward: they are the size of the head's weight
            ctx.grads = None
        return (*grads.result(weight, bias, grad_out.float()), None, None, None, None, None)


def _module_log_probs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                      processing: LogitProcessing) -> torch.Tensor:
    z = processing.apply(head(hidden).float()) / temperature
    return z.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)


def _liger_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
               temperature: float, processing: LogitProcessing) -> torch.Tensor | None:
    """``sum log p`` by liger-kernel's fused linear cross-entropy (Triton, CUDA only) where it applies: the
    package is installed (the ``kernels`` extra), the tensors are on a GPU, no temperature and no scaling
    (it knows only soft-capping). None where it does not."""
    if not hidden.is_cuda or temperature != 1.0 or processing.scale != 1.0:
        return None
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    dtype = _compute_dtype(hidden)  # autocast's, as the model's own head would run under it
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=processing.softcap)(
        weight.to(dtype), hidden.to(dtype), targets, None if bias is None else bias.to(dtype))
    return -(loss[0] if isinstance(loss, tuple) else loss).float()


def token_log_probs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    processing: LogitProcessing = LogitProcessing(), chunk_size: int | None = None,
                    reduction: str = "none") -> torch.Tensor:
    """Log-prob of ``targets`` ``(N,)`` under ``log_softmax(processing(head(hidden)) / temperature)``, fp32,
    for ``hidden`` ``(N, H)``: the rows that need a prediction, gathered by the caller. Logits exist for
    ``chunk_size`` rows at a time (default: 2^23 / V rows), in backward too.

    ``reduction="sum"`` returns their sum (an LM loss is minus it): its gradients come out of the forward
    pass without recomputing the logits, through liger-kernel where that is installed and applies."""
    if reduction not in ("none", "sum"):
        raise ValueError(f"reduction must be 'none' or 'sum', got {reduction!r}")
    parts = fused_head(head)
    chunk = _chunk_rows(chunk_size, head)
    if parts is not None and reduction == "sum":
        fast = _liger_sum(hidden, *parts, targets, temperature, processing)
        if fast is not None:
            return fast
        with_grad = torch.is_grad_enabled()
        return _ChunkedLogProbSum.apply(hidden, *parts, targets, float(temperature), processing, chunk, with_grad)
    if parts is not None:
        return _ChunkedLogProbs.apply(hidden, *parts, targets, float(temperature), processing, chunk)
    from torch.utils.checkpoint import checkpoint

    outs = []
    for s in range(0, hidden.shape[0], chunk):
        args = (head, hidden[s:s + chunk], targets[s:s + chunk], float(temperature), processing)
        if torch.is_grad_enabled():
            outs.append(checkpoint(_module_log_probs, *args, use_reentrant=False))
        else:
            outs.append(_module_log_probs(*args))
    out = torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)
    return out.sum() if reduction == "sum" else out


@torch.no_grad()
def token_entropy(head: nn.Module, hidden: torch.Tensor, temperature: float = 1.0,
                  processing: LogitProcessing = LogitProcessing(), chunk_size: int | None = None) -> torch.Tensor:
    """Entropy ``(N,)`` of ``softmax(processing(head(hidden)) / temperature)`` per row, chunked, no grad
    (PPO logs it as ``actor/entropy``)."""
    parts = fused_head(head)
    chunk = _chunk_rows(chunk_size, head)
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
