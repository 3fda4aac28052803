"""Loading causal LMs as coati trains them: checkpoints (full, sharded safetensors, peft adapters), quantized
bases, the dtypes weights load in (trained weights fp32 masters, frozen ones ``frozen_dtype``), LoRA and gradient
checkpointing applied, the family checked."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import UsageError, missing_path
from .dtypes import auto_lm_class, dtype_kwargs, to_dtype
from .families import check_model_type, check_remote_code, supports_packing
from .lora import LoraSettings, apply_lora, is_peft_model
from .quant import check_quant, check_quant_lora, config_dtype, prepare_kbit_model, quant_mode, quantized_load_kwargs
from .segment_attention import use_segment_attention

VALUE_HEAD_FILE = "value_head.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"

FROZEN_DTYPES = ("auto", "fp32", "bf16", "fp16")


def resolve_frozen_dtype(choice: str | torch.dtype, source: torch.dtype,
                         device: torch.device | str | None = None) -> torch.dtype:
    """The dtype frozen weights load in. ``auto``: the checkpoint's own dtype (``source``) on a GPU, where a
    bf16 copy halves their memory, and fp32 on CPU, where bf16 / fp16 matmuls are many times slower.
    ``device`` is where the model will run (default: the GPU when there is one)."""
    if isinstance(choice, torch.dtype):
        return choice
    if choice not in FROZEN_DTYPES:
        raise ValueError(f"unknown frozen dtype {choice!r}; choose one of {', '.join(FROZEN_DTYPES)}")
    if choice != "auto":
        return to_dtype(choice)
    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return source if on_gpu else torch.float32


def _adapter_base(path: Path) -> str:
    from peft import PeftConfig

    base = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
    if not base:
        raise ValueError(f"{path}: adapter_config.json names no base model; save with merge_lora=True instead")
    return base


def checkpoint_dtype(path: str | Path, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a checkpoint's ``config.json`` records for its weights (an adapter dir: its base model's),
    fp32 when it records none: what a model loaded from ``path`` saves as again."""
    return config_dtype(_config(path, trust_remote_code))


def checkpoint_model_type(path: str | Path, trust_remote_code: bool = False) -> str:
    """``config.model_type`` of a checkpoint (an adapter dir: its base model's), read without loading weights."""
    return _config(path, trust_remote_code).model_type


def checkpoint_is_seq2seq(path: str | Path, trust_remote_code: bool = False) -> bool:
    """Whether a checkpoint (an adapter dir: its base model) is an encoder-decoder LM (T5, BART)."""
    return bool(_config(path, trust_remote_code).is_encoder_decoder)


def _config(path: str | Path, trust_remote_code: bool) -> Any:
    """The ``AutoConfig`` of a checkpoint, an adapter dir's base model's for an adapter dir."""
    from transformers import AutoConfig

    path = Path(path)
    source = _adapter_base(path) if (path / ADAPTER_CONFIG_FILE).is_file() else str(path)
    with missing_path(source, "model"):
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)


def _load_dtype(path: Path, lora: LoraSettings | None, frozen: bool, frozen_dtype: str | torch.dtype,
                trust_remote_code: bool) -> torch.dtype:
    """fp32 when any weight of the loaded model trains (full fine-tuning; LoRA with ``train_bias``, whose
    trained biases live in the base layers), else (``frozen``, or a LoRA base) ``frozen_dtype``."""
    base_frozen = frozen or (lora is not None and lora.enabled and lora.train_bias == "none")
    if not base_frozen:
        return torch.float32
    return resolve_frozen_dtype(frozen_dtype, checkpoint_dtype(path, trust_remote_code))


def cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A CPU copy of ``module`` with its floating parameters and buffers in ``dtype`` (tied weights stay
    tied), built tensor by tensor, so saving in another dtype never holds a second fp32 copy on the GPU."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device="cpu", dtype=dtype if t.is_floating_point() else t.dtype, copy=True)

    memo: dict[int, Any] = {id(p): nn.Parameter(cast(p), requires_grad=False) for p in module.parameters()}
    memo.update({id(b): cast(b) for b in module.buffers()})
    return copy.deepcopy(module, memo)


def base_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM under a PeftModel (LoRA layers live inside it), or the model itself."""
    return model.get_base_model() if is_peft_model(model) else model


def prepare_lm(model: nn.Module, family: str, lora: LoraSettings | None, grad_checkpoint: bool) -> nn.Module:
    check_model_type(family, model.config.model_type)
    if supports_packing(family, model.config.model_type):
        use_segment_attention(model)
    if quant_mode(model):
        model = prepare_kbit_model(model)
    if grad_checkpoint:
        # non-reentrant checkpointing works with frozen (LoRA) bases without forcing input grads
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return apply_lora(model, lora, family)


def load_causal_lm(path: str | Path, *, family: str = "auto", lora: LoraSettings | None = None,
                   grad_checkpoint: bool = False, torch_dtype: Any = None, quant: str | None = None,
                   quant_compute_dtype: Any = "auto", frozen: bool = False, frozen_dtype: str | torch.dtype = "auto",
                   seq2seq: bool = False, **hf_kwargs: Any) -> nn.Module:
    """Load a HF causal LM dir, or a peft adapter dir (its base + adapter, merged), then add new LoRA if asked.

    Merging a saved adapter makes it the starting point of the next stage (e.g. SFT adapter -> PPO actor and
    its reference); to continue training the same adapter, build the model and call ``load_weights``.
    ``quant`` ("8bit" / "4bit") loads the base quantized with bitsandbytes (see ``quant.py``); it needs LoRA
    unless the model is ``frozen`` (inference only, e.g. PPO's reward model).

    Weights that train load in fp32 whatever the checkpoint's dtype, so optimizer updates below bf16's
    resolution are kept (peft keeps LoRA adapters fp32 itself). Frozen weights (a ``frozen`` model, or the
    base under LoRA) load in ``frozen_dtype`` (see :func:`resolve_frozen_dtype`). A quantized base follows
    ``quant_compute_dtype`` instead; ``torch_dtype`` forces one dtype for every weight. An encoder-decoder
    checkpoint (T5, BART) loads with ``AutoModelForSeq2SeqLM`` when ``seq2seq`` (SFT's :class:`Seq2SeqActor`)
    and is refused otherwise: the other stages need a causal LM.
    """
    path = Path(path)
    check_remote_code(family, hf_kwargs.get("trust_remote_code", False))
    if frozen:
        check_quant(quant)
    else:
        check_quant_lora(quant, lora)
    config = _config(path, hf_kwargs.get("trust_remote_code", False))
    if config.is_encoder_decoder and not seq2seq:
        raise UsageError(f"{path}: {config.model_type!r} is an encoder-decoder (seq2seq) model, which coati "
                         "trains with SFT only (examples/train_sft.py); reward models, PPO / GRPO and DPO need a "
                         "causal LM")
    if quant is not None:
        if (path / ADAPTER_CONFIG_FILE).is_file():
            return _load_adapter_quantized(path, family, lora, grad_checkpoint, torch_dtype, quant,
                                           quant_compute_dtype, frozen, seq2seq, hf_kwargs)
        hf_kwargs = {**quantized_load_kwargs(path, quant, quant_compute_dtype,
                                             trust_remote_code=hf_kwargs.get("trust_remote_code", False)),
                     **hf_kwargs}
        if torch_dtype is None:
            torch_dtype = hf_kwargs.pop("dtype")
        hf_kwargs.pop("dtype", None)
    elif torch_dtype is None:
        torch_dtype = _load_dtype(path, lora, frozen, frozen_dtype, hf_kwargs.get("trust_remote_code", False))
    kwargs = {**dtype_kwargs(torch_dtype), **hf_kwargs}
    if (path / ADAPTER_CONFIG_FILE).is_file():
        from peft import PeftModel

        base = auto_lm_class(config).from_pretrained(_adapter_base(path), **kwargs)
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    else:
        with missing_path(path, "model"):
            model = auto_lm_class(config).from_pretrained(str(path), **kwargs)
    return prepare_lm(model, family, lora, grad_checkpoint)


def _load_adapter_quantized(path: Path, family: str, lora: LoraSettings | None, grad_checkpoint: bool,
                            torch_dtype: Any, quant: str, quant_compute_dtype: Any, frozen: bool, seq2seq: bool,
                            hf_kwargs: dict[str, Any]) -> nn.Module:
    """An adapter dir under ``quant``: merge it into its base in full precision, then quantize the merged
    weights (bitsandbytes quantizes while loading, so they pass through a temporary dir)."""
    import tempfile

    plain_kwargs = {k: v for k, v in hf_kwargs.items() if k == "trust_remote_code"}
    merged = load_causal_lm(path, family=family, torch_dtype=torch_dtype, seq2seq=seq2seq, **plain_kwargs)
    with tempfile.TemporaryDirectory(prefix="coati_merged_") as tmp:
        merged.save_pretrained(tmp)
        del merged
        return load_causal_lm(tmp, family=family, lora=lora, grad_checkpoint=grad_checkpoint,
                              torch_dtype=torch_dtype, quant=quant, quant_compute_dtype=quant_compute_dtype,
                              frozen=frozen, seq2seq=seq2seq, **hf_kwargs)


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu",
                                                                                      weights_only=True))
    return state


def full_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All weights of a ``save_pretrained`` dir: single file or sharded (``*.index.json``)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).is_file():
            return _read_safetensors([path / single])
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text())["weight_map"]
            return _read_safetensors([path / f for f in sorted(set(weight_map.values()))])
    raise FileNotFoundError(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def load_full(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: weights do not match the model; unexpected keys {result.unexpected_keys[:5]}")
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    # tied weights (e.g. GPT-2 lm_head) are not written by save_pretrained; they are filled through the tie
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_ptrs]
    if missing:
        raise ValueError(f"{path}: weights missing for {missing[:5]}")


def load_adapter(model: nn.Module, path: Path) -> None:
    from peft import set_peft_model_state_dict

    files = [path / "adapter_model.safetensors", path / "adapter_model.bin"]
    found = [f for f in files if f.is_file()]
    if not found:
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    result = set_peft_model_state_dict(model, _read_safetensors(found[:1]))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"{path}: adapter does not match the model; unexpected keys {unexpected[:5]}")
