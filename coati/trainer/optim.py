"""The optimizer a trainer builds for ``--optim`` (names and refusals: :mod:`coati.utils.optim`), and the fused
backward of LOMO / AdaLomo, which the Strategy runs in place of ``loss.backward()`` + ``optimizer.step()``."""
from __future__ import annotations

import math
from typing import Any, Callable
from unittest import mock

import torch
import torch.nn as nn

from ..errors import MissingDependencyError
from ..models.lm_head import keep_head_grads
from ..utils.optim import FUSED, OPTIMIZERS, check_optimizer


def _adamw(params: list[nn.Parameter], lr: float, weight_decay: float, **_: Any) -> torch.optim.Optimizer:
    """AdamW, fused when every parameter is a plain floating tensor on CPU or CUDA (several times faster than the
    per-tensor loop on CPU); sharded (DTensor) parameters keep the default implementation."""
    fusable = bool(params) and all(
        type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fusable or None)


def _bnb(paged: bool) -> Callable[..., torch.optim.Optimizer]:
    def build(params: list[nn.Parameter], lr: float, weight_decay: float, **_: Any) -> torch.optim.Optimizer:
        try:
            from bitsandbytes.optim import AdamW8bit, PagedAdamW8bit
        except ImportError:
            raise MissingDependencyError("--optim adamw_bnb_8bit / paged_adamw_8bit need bitsandbytes: pip install "
                                         "coati[quant]") from None
        return (PagedAdamW8bit if paged else AdamW8bit)(params, lr=lr, weight_decay=weight_decay)
    return build


def _adafactor(params: list[nn.Parameter], lr: float, weight_decay: float, **_: Any) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    # the HF Trainer's `adafactor`: --lr as the step size, not Adafactor's relative step
    return Adafactor(params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False)


def _lomo(ada: bool) -> Callable[..., torch.optim.Optimizer]:
    def build(params: list[nn.Parameter], lr: float, weight_decay: float, *, model: nn.Module,
              grad_clip: float = 0.0) -> torch.optim.Optimizer:
        try:
            from lomo_optim import AdaLomo, Lomo
        except ImportError:
            raise MissingDependencyError("--optim lomo / adalomo need lomo-optim: pip install coati[lomo]") from None
        kwargs = dict(lr=lr, weight_decay=weight_decay, clip_grad_norm=grad_clip or None)
        if not ada:
            return Lomo(model, **kwargs)
        device = params[0].device
        # lomo-optim 0.1.1 allocates AdaLomo's state with .cuda(): keep it beside the weights instead
        with mock.patch.object(torch.Tensor, "cuda", lambda t, *a, **k: t.to(device)):
            optimizer = AdaLomo(model, **kwargs)
        optimizer.register_state_dict_post_hook(_save_adalomo)
        optimizer.register_load_state_dict_pre_hook(_load_adalomo)
        return optimizer
    return build


_ADALOMO_STATE = ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")


def _save_adalomo(optimizer: Any, state: dict[str, Any]) -> dict[str, Any]:
    """AdaLomo keeps its moments outside ``optimizer.state``: add them, so checkpoints resume it exactly."""
    state["adalomo"] = {"step_num": optimizer.step_num, **{k: getattr(optimizer, k) for k in _ADALOMO_STATE}}
    return state


def _load_adalomo(optimizer: Any, state: dict[str, Any]) -> dict[str, Any]:
    saved = state.pop("adalomo", None)
    if saved is not None:
        optimizer.step_num = saved["step_num"]
        for key in _ADALOMO_STATE:
            for name, tensor in getattr(optimizer, key).items():
                tensor.copy_(saved[key][name])
    return state


BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw_torch": _adamw, "adamw_bnb_8bit": _bnb(False), "paged_adamw_8bit": _bnb(True), "adafactor": _adafactor,
    "lomo": _lomo(False), "adalomo": _lomo(True)}
assert set(BUILDERS) == set(OPTIMIZERS)


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float = 0.0, *, strategy: Any = None,
                   accumulation_steps: int = 1) -> torch.optim.Optimizer:
    """The ``--optim name`` optimizer over ``model``'s trainable parameters (LOMO hooks the model itself). With
    ``strategy``, what it cannot train with that strategy and ``accumulation_steps`` is refused (UsageError), and
    LOMO / AdaLomo, which clip inside their backward, clip at the strategy's ``grad_clip``."""
    params = [p for p in model.parameters() if p.requires_grad]
    extra: dict[str, Any] = {}
    if strategy is not None:
        check_optimizer(name, accumulation_steps=accumulation_steps, strategy=strategy.name,
                        lora=getattr(strategy.unwrap(model), "lora_enabled", False),
                        precision=getattr(strategy, "mixed_precision", None))
    if name in FUSED:
        extra = {"model": model, "grad_clip": getattr(strategy, "grad_clip", 0.0)}
    return BUILDERS[name](params, lr, weight_decay, **extra)


def is_fused(optimizer: Any) -> bool:
    """LOMO / AdaLomo: the update happens inside backward."""
    return hasattr(optimizer, "fused_backward")


def fused_backward(optimizer: Any, loss: torch.Tensor) -> None:
    """One LOMO / AdaLomo step: with clipping, lomo-optim's first backward for the global gradient norm (the
    graph kept), then the backward that updates each weight with the scheduler's current lr as its gradient
    arrives, clipped by that norm."""
    if optimizer.clip_grad_norm:
        with keep_head_grads():  # the LM head's loss keeps its gradients for the second backward
            optimizer.grad_norm(loss)
    optimizer.fused_backward(loss, optimizer.param_groups[0]["lr"])
    optimizer._opt_called = True  # the step LambdaLR looks for before it steps (else it warns it came first)


def fused_grad_norm(optimizer: Any) -> float:
    """The global gradient norm of the last fused step (NaN when it ran without clipping, which skips it)."""
    norms = optimizer.grad_norms
    return float(torch.linalg.vector_norm(norms)) if torch.is_tensor(norms) else math.nan
