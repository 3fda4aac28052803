"""Quantized bases for LoRA training (bitsandbytes LLM.int8 and NF4) and their full-precision export.

A quantized base is frozen by construction, so ``--quant`` always comes with LoRA: the adapters (and value
heads, which live outside the HF model and stay fp32) are what trains. Loading goes through transformers'
``BitsAndBytesConfig`` and peft's ``prepare_model_for_kbit_training``; nothing is patched. Merging an adapter
into a quantized base would round it into the quantization grid, so exports dequantize the base into a
full-precision copy first (:func:`full_precision_copy`).
"""
from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..errors import UserError
from .dtypes import auto_lm_class, dtype_kwargs, to_dtype
from .lora import is_peft_model

QUANT_MODES = ("8bit", "4bit")
# Strategies that hold a quantized base and a shared critic / reward base as they are (replicas per process).
QUANT_STRATEGIES = ("naive", "ddp")

logger = logging.getLogger(__name__)


class QuantizationUnavailable(UserError, RuntimeError):
    """The asked-for quantization backend is not installed or cannot run on this device."""


def require_bitsandbytes(quant: str) -> None:
    missing = [m for m in ("bitsandbytes", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise QuantizationUnavailable(f"--quant {quant} needs {' and '.join(missing)}: `pip install coati[quant]`")


def check_quant(quant: str | None) -> None:
    if quant is not None and quant not in QUANT_MODES:
        raise ValueError(f"unknown quant {quant!r}; choose one of {', '.join(QUANT_MODES)}")


def check_quant_lora(quant: str | None, lora: Any) -> None:
    """Quantized weights cannot take optimizer updates: refuse a quantized base without LoRA."""
    check_quant(quant)
    if quant is not None and not (lora is not None and lora.enabled):
        raise ValueError(f"--quant {quant} trains LoRA adapters on a frozen quantized base: set --lora_rank > 0")


def check_strategy_support(strategy: str, *, quant: str | None = None, share_base: bool = False,
                           model: nn.Module | None = None) -> None:
    """Refuse strategies that shard or re-cast parameters, which bitsandbytes' packed weights and a base
    shared between two models do not survive (FSDP flattens / shards them, ColossalAI casts and re-wraps).

    ``model`` lets a strategy check a model it is about to prepare: any bitsandbytes layer, or a reward model
    running on the critic's base (``shares_base``), counts.
    """
    name = str(strategy)
    if name in QUANT_STRATEGIES:
        return
    if model is not None:
        quant = quant or quant_mode(getattr(model, "model", model))
        share_base = share_base or bool(getattr(model, "shares_base", False))
    if quant is not None:
        raise ValueError(f"--quant {quant} works with --strategy naive or ddp, not {name}: bitsandbytes' quantized "
                         f"weights cannot be sharded or re-cast. Use ddp (each process holds the small quantized "
                         f"base), or drop --quant")
    if share_base:
        raise ValueError(f"--share_critic_reward_base works with --strategy naive or ddp, not {name}: the shared "
                         f"base would be sharded under the critic only")


def resolve_compute_dtype(dtype: str | torch.dtype | None = "auto",
                          device: torch.device | str | None = None) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it (else fp16), fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        if on_gpu:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return to_dtype(str(dtype).removeprefix("torch."), "compute dtype")


def cpu_4bit_skip_modules(path_or_config: Any, trust_remote_code: bool = False) -> list[str] | None:
    """Linear layers bitsandbytes' CPU NF4 kernel cannot run, to keep in full precision.

    Its packed CPU path needs in_features % 64 == 0 and out_features % 32 == 0 (e.g. LLaMA's 1376-wide MLP
    fails); the returned leaf names (plus lm_head, skipped by default) become `llm_int8_skip_modules`.
    None when every layer fits.
    """
    from transformers import AutoConfig

    config = path_or_config
    if isinstance(config, (str, Path)):
        config = AutoConfig.from_pretrained(str(config), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = auto_lm_class(config).from_config(config, trust_remote_code=trust_remote_code)
    bad = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and (m.in_features % 64 or m.out_features % 32)}
    bad.discard("lm_head")
    if not bad:
        return None
    logger.warning("4-bit on CPU: keeping %s in full precision (bitsandbytes' CPU kernel needs in_features "
                   "divisible by 64 and out_features by 32)", ", ".join(sorted(bad)))
    return sorted(bad) + ["lm_head"]


def bnb_config(quant: str, compute_dtype: torch.dtype = torch.float32,
               skip_modules: list[str] | None = None) -> Any:
    """``BitsAndBytesConfig``: LLM.int8 for ``8bit``; NF4 with double quantization for ``4bit``."""
    check_quant(quant)
    require_bitsandbytes(quant)
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip_modules)


def default_device() -> torch.device:
    """Where a quantized model is loaded: the current GPU (strategies set it per process), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def quantized_load_kwargs(path: str | Path, quant: str, compute_dtype: str | torch.dtype | None = "auto", *,
                          device: torch.device | str | None = None, trust_remote_code: bool = False,
                          ) -> dict[str, Any]:
    """``from_pretrained`` keywords that load ``path`` quantized onto ``device`` (bitsandbytes quantizes while
    loading, so the model cannot be moved to its device afterwards). Non-quantized weights (embeddings, norms,
    LM head) load in the compute dtype; peft's k-bit preparation later keeps them fp32."""
    dev = torch.device(device) if device is not None else default_device()
    dtype = resolve_compute_dtype(compute_dtype, dev)
    skips = cpu_4bit_skip_modules(path, trust_remote_code) if quant == "4bit" and dev.type == "cpu" else None
    return {"quantization_config": bnb_config(quant, dtype, skips),
            "device_map": {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"},
            "dtype": dtype}


def quant_mode(model: nn.Module) -> str | None:
    """``"4bit"`` / ``"8bit"`` when ``model`` (a HF model, PeftModel or coati wrapper) holds bitsandbytes layers."""
    modes = {"Linear4bit": "4bit", "Linear8bitLt": "8bit"}
    for m in model.modules():
        if type(m).__name__ in modes and type(m).__module__.startswith("bitsandbytes"):
            return modes[type(m).__name__]
    return None


def bnb_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(name, layer) of every bitsandbytes 4-bit / 8-bit Linear in ``model``."""
    import bitsandbytes as bnb

    return ((n, m) for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)))


def prepare_kbit_model(model: nn.Module) -> nn.Module:
    """peft's k-bit preparation (base frozen, non-quantized weights in fp32) without its gradient
    checkpointing (coati enables that itself, non-reentrant, when asked).

    bitsandbytes re-packs 4-bit weights for its AVX512-BF16 CPU kernel the first time a layer runs in eval
    mode without grad (e.g. PPO generation), and that layout has no backward: later training steps would get
    no gradient through the base layers. Training models keep the trainable layout.
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for _, layer in bnb_layers(model):
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    return model


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """A bitsandbytes Linear's weight as the full matrix its forward computes with (peft's dequantization)."""
    from peft.utils.integrations import dequantize_bnb_weight

    state = getattr(layer.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        # the CPU inference layout does not dequantize; saving restores bitsandbytes' canonical layout
        layer.state_dict()
    return dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None))


def _is_adapter_param(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def dequantized_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The base weights of a HF model (or the base under a PeftModel) in ``dtype``, quantized layers
    dequantized, keyed as the plain (non-peft, non-quantized) model names them."""
    base = model.get_base_model() if is_peft_model(model) else model
    state: dict[str, torch.Tensor] = {}
    quantized = set()
    for name, layer in bnb_layers(base) if quant_mode(base) else ():
        key = name.removesuffix(".base_layer")
        state[f"{key}.weight"] = dequantized_weight(layer).to(dtype)
        quantized.add(f"{name}.weight")
    for name, param in base.named_parameters():
        if name in quantized or _is_adapter_param(name):
            continue
        state[name.replace(".base_layer.", ".")] = param.detach().to(dtype)
    return state


def full_precision_copy(model: nn.Module, dtype: torch.dtype | None = None, adapter: str | None = None) -> nn.Module:
    """A plain HF model (no peft, no bitsandbytes) equal to ``model`` with its LoRA ``adapter`` (default: the
    active one) merged: quantized base weights are dequantized, the merge runs in fp32, the result is cast
    to ``dtype`` (default: the dtype the model was loaded in, fp32 when unknown). ``model`` is untouched."""
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    base = model.get_base_model() if is_peft_model(model) else model
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = auto_lm_class(config).from_config(config, **dtype_kwargs(torch.float32))
    state = dequantized_state_dict(model)
    result = plain.load_state_dict(state, strict=False)
    own = plain.state_dict()  # tied weights (an LM head, T5's encoder / decoder embeddings) fill through the tie
    loaded = {own[k].data_ptr() for k in state if k in own}
    if any(own[k].data_ptr() not in loaded for k in result.missing_keys) or result.unexpected_keys:
        raise ValueError(f"base weights do not fit the plain model: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    if is_peft_model(model):
        name = adapter or model.active_adapter
        peft_plain = PeftModel(plain, copy.deepcopy(model.peft_config[name]))
        set_peft_model_state_dict(peft_plain, get_peft_model_state_dict(model, adapter_name=name))
        plain = peft_plain.merge_and_unload()
    plain.to(dtype or config_dtype(config))
    return plain.eval()


def config_dtype(config: Any) -> torch.dtype:
    """The floating dtype a HF config records for its weights (fp32 when it records none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def base_weight_storages(*models: nn.Module, frozen_only: bool = True) -> set[int]:
    """Distinct storages of the weight matrices of the base Linear layers (bitsandbytes ones included; LoRA
    adapters, value heads and LM heads excluded) held by ``models``, only frozen ones unless ``frozen_only``
    is False: the number of base copies in memory is ``len(result) / layers-per-model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    ptrs: set[int] = set()
    for model in models:
        for name, m in model.named_modules():
            if isinstance(m, BaseTunerLayer) or not isinstance(m, nn.Linear) or _is_adapter_param(name):
                continue
            if name.removesuffix(".base_layer").rsplit(".", 1)[-1] in ("lm_head", "value_head", "embed_out"):
                continue
            if frozen_only and m.weight.requires_grad:
                continue
            ptrs.add(m.weight.untyped_storage().data_ptr())
    return ptrs
