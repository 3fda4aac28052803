"""Actor, Critic and RewardModel: thin wrappers over a Hugging Face causal LM (optionally peft LoRA).

They add only what RLHF needs: action log-probs (Actor), a fp32 scalar value head on the transformer body
(Critic, RewardModel), padding-independent position ids, and save/load in formats plain ``transformers`` /
``peft`` read, with the value head beside them in ``value_head.safetensors``.

Precision: weights that train are fp32 masters whatever dtype the checkpoint was saved in (low-precision
compute is ``--mixed_precision``'s autocast or FSDP2 policy); frozen weights load in ``frozen_dtype``; saves
write the checkpoint's own dtype again (see :func:`load_causal_lm` and :meth:`_HFWrapper.save_pretrained`).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..errors import UsageError
from ..utils import IGNORE_INDEX
from .dtypes import dtype_kwargs, to_dtype
from .families import check_model_type, supports_packing
from .lm_head import logit_processing, token_entropy, token_log_probs
from .lora import LoraSettings, apply_lora, is_peft_model
from .segment_attention import SEGMENT_SDPA, Segments, segment_inputs, use_segment_attention
from .quant import (
    check_quant, check_quant_lora, config_dtype, full_precision_copy, prepare_kbit_model, quant_mode,
    quantized_load_kwargs,
)
from .utils import last_token_index, position_ids_from_mask

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
    from transformers import AutoConfig

    path = Path(path)
    source = _adapter_base(path) if (path / ADAPTER_CONFIG_FILE).is_file() else str(path)
    return config_dtype(AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code))


def checkpoint_model_type(path: str | Path, trust_remote_code: bool = False) -> str:
    """``config.model_type`` of a checkpoint (an adapter dir: its base model's), read without loading weights."""
    from transformers import AutoConfig

    path = Path(path)
    source = _adapter_base(path) if (path / ADAPTER_CONFIG_FILE).is_file() else str(path)
    return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).model_type


def _load_dtype(path: Path, lora: LoraSettings | None, frozen: bool, frozen_dtype: str | torch.dtype,
                trust_remote_code: bool) -> torch.dtype:
    """fp32 when any weight of the loaded model trains (full fine-tuning; LoRA with ``train_bias``, whose
    trained biases live in the base layers), else (``frozen``, or a LoRA base) ``frozen_dtype``."""
    base_frozen = frozen or (lora is not None and lora.enabled and lora.train_bias == "none")
    if not base_frozen:
        return torch.float32
    return resolve_frozen_dtype(frozen_dtype, checkpoint_dtype(path, trust_remote_code))


def _cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A CPU copy of ``module`` with its floating parameters and buffers in ``dtype`` (tied weights stay
    tied), built tensor by tensor, so saving in another dtype never holds a second fp32 copy on the GPU."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device="cpu", dtype=dtype if t.is_floating_point() else t.dtype, copy=True)

    memo: dict[int, Any] = {id(p): nn.Parameter(cast(p), requires_grad=False) for p in module.parameters()}
    memo.update({id(b): cast(b) for b in module.buffers()})
    return copy.deepcopy(module, memo)


_SIGNATURES: dict[type, frozenset[str]] = {}


def _accepts(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` takes keyword ``name`` (inspected once per class)."""
    cls = type(module)
    if cls not in _SIGNATURES:
        try:
            _SIGNATURES[cls] = frozenset(inspect.signature(module.forward).parameters)
        except (TypeError, ValueError):
            _SIGNATURES[cls] = frozenset()
    return name in _SIGNATURES[cls]


def _base_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM under a PeftModel (LoRA layers live inside it), or the model itself."""
    return model.get_base_model() if is_peft_model(model) else model


def _prepare(model: nn.Module, family: str, lora: LoraSettings | None, grad_checkpoint: bool) -> nn.Module:
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
                   **hf_kwargs: Any) -> nn.Module:
    """Load a HF causal LM dir, or a peft adapter dir (its base + adapter, merged), then add new LoRA if asked.

    Merging a saved adapter makes it the starting point of the next stage (e.g. SFT adapter -> PPO actor and
    its reference); to continue training the same adapter, build the model and call ``load_weights``.
    ``quant`` ("8bit" / "4bit") loads the base quantized with bitsandbytes (see ``quant.py``); it needs LoRA
    unless the model is ``frozen`` (inference only, e.g. PPO's reward model).

    Weights that train load in fp32 whatever the checkpoint's dtype, so optimizer updates below bf16's
    resolution are kept (peft keeps LoRA adapters fp32 itself). Frozen weights (a ``frozen`` model, or the
    base under LoRA) load in ``frozen_dtype`` (see :func:`resolve_frozen_dtype`). A quantized base follows
    ``quant_compute_dtype`` instead; ``torch_dtype`` forces one dtype for every weight.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if frozen:
        check_quant(quant)
    else:
        check_quant_lora(quant, lora)
    if quant is not None:
        if (path / ADAPTER_CONFIG_FILE).is_file():
            return _load_adapter_quantized(path, family, lora, grad_checkpoint, torch_dtype, quant,
                                           quant_compute_dtype, frozen, hf_kwargs)
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

        base = AutoModelForCausalLM.from_pretrained(_adapter_base(path), **kwargs)
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return _prepare(model, family, lora, grad_checkpoint)


def _load_adapter_quantized(path: Path, family: str, lora: LoraSettings | None, grad_checkpoint: bool,
                            torch_dtype: Any, quant: str, quant_compute_dtype: Any, frozen: bool,
                            hf_kwargs: dict[str, Any]) -> nn.Module:
    """An adapter dir under ``quant``: merge it into its base in full precision, then quantize the merged
    weights (bitsandbytes quantizes while loading, so they pass through a temporary dir)."""
    import tempfile

    plain_kwargs = {k: v for k, v in hf_kwargs.items() if k == "trust_remote_code"}
    merged = load_causal_lm(path, family=family, torch_dtype=torch_dtype, **plain_kwargs)
    with tempfile.TemporaryDirectory(prefix="coati_merged_") as tmp:
        merged.save_pretrained(tmp)
        del merged
        return load_causal_lm(tmp, family=family, lora=lora, grad_checkpoint=grad_checkpoint,
                              torch_dtype=torch_dtype, quant=quant, quant_compute_dtype=quant_compute_dtype,
                              frozen=frozen, **hf_kwargs)


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu",
                                                                                      weights_only=True))
    return state


def _full_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All weights of a ``save_pretrained`` dir: single file or sharded (``*.index.json``)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).is_file():
            return _read_safetensors([path / single])
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text())["weight_map"]
            return _read_safetensors([path / f for f in sorted(set(weight_map.values()))])
    raise FileNotFoundError(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def _load_full(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: weights do not match the model; unexpected keys {result.unexpected_keys[:5]}")
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    # tied weights (e.g. GPT-2 lm_head) are not written by save_pretrained; they are filled through the tie
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_ptrs]
    if missing:
        raise ValueError(f"{path}: weights missing for {missing[:5]}")


def _load_adapter(model: nn.Module, path: Path) -> None:
    from peft import set_peft_model_state_dict

    files = [path / "adapter_model.safetensors", path / "adapter_model.bin"]
    found = [f for f in files if f.is_file()]
    if not found:
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    result = set_peft_model_state_dict(model, _read_safetensors(found[:1]))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"{path}: adapter does not match the model; unexpected keys {unexpected[:5]}")


def _lm_inputs(module: nn.Module, attention_mask: torch.Tensor | Segments | None,
               position_ids: torch.Tensor | None) -> dict[str, Any]:
    """Model-call keywords: padding-independent position ids from the mask, or (a packed batch) the given
    position ids and no mask, from which transformers builds the block-diagonal causal mask, or the packed
    batch's own ``(R, 1, W, W)`` mask (pairs sharing a prompt), or its :class:`Segments` layout
    (:mod:`coati.dataset.packing`)."""
    if isinstance(attention_mask, Segments):
        impl = _attention(module.config)
        if impl != SEGMENT_SDPA:
            raise UsageError(f"a batch packed for attention='segments' needs coati's sdpa attention, not {impl!r}: "
                             "build the collator with attention=packing_attention(model)")
        return {**segment_inputs(attention_mask, position_ids.shape[0], position_ids.device),
                "position_ids": position_ids, "use_cache": False}
    if position_ids is not None:
        given = attention_mask is not None and attention_mask.ndim == 4 and attention_mask.dtype == torch.bool
        return {"attention_mask": _custom_mask(module.config, attention_mask, position_ids) if given else None,
                "position_ids": position_ids, "use_cache": False}
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False}
    if attention_mask is not None and _accepts(module, "position_ids"):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    return kwargs


_DENSE_ATTENTION = ("sdpa", SEGMENT_SDPA, "eager")  # the implementations that take a given 4D mask


def _attention(config: Any) -> str:
    return getattr(config, "_attn_implementation", None) or "sdpa"


def packing_attention(model: nn.Module) -> str:
    """The packing collators' ``attention`` for ``model`` (:mod:`coati.dataset.packing`): ``"segments"`` on
    coati's sdpa (each sample attends by itself), ``"dense"`` where every score of a row is computed (eager,
    plain sdpa: an explicit mask, rows no longer than the longest sample), ``"varlen"`` for flash / flex
    attention, which skip what the position ids rule out but take no explicit mask."""
    impl = _attention(model.config)
    return "segments" if impl == SEGMENT_SDPA else "dense" if impl in _DENSE_ATTENTION else "varlen"


def _custom_mask(config: Any, mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """A bool ``(R, 1, W, W)`` mask (True = attend) as the model takes it given: transformers passes a 4D mask
    through unchanged, so a sliding window it would have added is added here, from the position ids (every
    pair the mask allows lies within one sample, whose positions run on across a shared prompt); models that
    mix full and sliding layers (``layer_types``) get one mask per layer type. sdpa takes the bool mask,
    eager an additive float one."""
    impl = _attention(config)
    if impl not in _DENSE_ATTENTION:
        raise UsageError(f"packed pairs sharing a prompt need sdpa or eager attention, not {impl!r}: build the "
                         "collator with attention=packing_attention(model) (the example scripts do)")

    def as_given(m: torch.Tensor) -> torch.Tensor:
        if impl != "eager":
            return m
        return torch.zeros(m.shape, device=m.device).masked_fill(~m, torch.finfo(torch.float32).min)

    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return as_given(mask)
    windowed = mask & ((position_ids[:, :, None] - position_ids[:, None, :]) < window)[:, None]
    if types is None:
        return as_given(windowed)
    return {"full_attention": as_given(mask), "sliding_attention": as_given(windowed)}


class _HFWrapper(nn.Module):
    """Shared save/load/adapter plumbing. Subclasses set ``self.model`` (HF causal LM or PeftModel)."""

    model: nn.Module
    # dtype of the checkpoint the weights came from (set by from_pretrained); None: built from config
    source_dtype: torch.dtype | None = None

    @property
    def lora_enabled(self) -> bool:
        return is_peft_model(self.model)

    @property
    def base_lm(self) -> nn.Module:
        return _base_lm(self.model)

    @property
    def config(self) -> Any:
        return self.base_lm.config

    @property
    def body(self) -> nn.Module:
        """The transformer body (e.g. ``LlamaModel``); with LoRA it contains the injected adapter layers."""
        lm = self.base_lm
        return getattr(lm, lm.base_model_prefix)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The body's final hidden states ``(B, T, H)``, with padding-independent position ids (``position_ids``
        instead of a mask: a packed batch, :mod:`coati.dataset.packing`)."""
        out = self.body(input_ids=input_ids, **_lm_inputs(self.body, attention_mask, position_ids))
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run with LoRA adapters off (the frozen base = PPO reference policy); a no-op without LoRA."""
        if self.lora_enabled:
            with self.model.disable_adapter():
                yield
        else:
            yield

    def save_pretrained(self, path: str | Path, tokenizer: Any = None, merge_lora: bool = False,
                        exact: bool = False) -> None:
        """Write a dir that ``AutoModelForCausalLM`` (or ``PeftModel`` for an unmerged adapter) loads.

        With LoRA, ``merge_lora=False`` writes the peft adapter; ``True`` writes full merged weights, merged on
        a copy so this (live) model keeps its adapters.

        Full and merged weights are written in ``source_dtype``, the dtype of the checkpoint they came from (a
        bf16 checkpoint trained on fp32 masters saves as bf16, its config naming bf16); a model built from
        config saves as it is. ``exact`` writes them as held instead (training checkpoints, so a resume
        continues from the same fp32 values). Adapters and the value head are written as held (fp32).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        dtype = None if exact else self.source_dtype
        if self.lora_enabled and merge_lora:
            if quant_mode(self.model):
                # dequantized first: merging into the quantized base would round the adapter into its grid
                merged = full_precision_copy(self.model, dtype)
            else:
                # merged in fp32 on a copy, rounded once to the saved dtype
                merged = _cast_copy(self.model, torch.float32).merge_and_unload()
                merged.to(dtype or self.base_lm.dtype)
            merged.save_pretrained(str(path))
            del merged
        elif self.lora_enabled:
            # only this model's adapter (a critic may carry the reward model's as a second one)
            self.model.save_pretrained(str(path), selected_adapters=[self.model.active_adapter])
        elif dtype is None or dtype == self.model.dtype:
            self.model.save_pretrained(str(path))
        else:
            _cast_copy(self.model, dtype).save_pretrained(str(path))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
        self._save_extra(path)

    def load_weights(self, path: str | Path) -> None:
        """Load weights written by :meth:`save_pretrained` into this model in place (for resume)."""
        path = Path(path)
        is_adapter_dir = (path / ADAPTER_CONFIG_FILE).is_file()
        if self.lora_enabled:
            if not is_adapter_dir:
                raise ValueError(f"{path}: no LoRA adapter to load into a LoRA model (was it saved merged?)")
            _load_adapter(self.model, path)
        else:
            if is_adapter_dir:
                raise ValueError(f"{path} holds a LoRA adapter but this model has no LoRA")
            _load_full(self.model, _full_state_dict(path), path)
        self._load_extra(path)

    def _save_extra(self, path: Path) -> None:
        pass

    def _load_extra(self, path: Path) -> None:
        pass


class Actor(_HFWrapper):
    """The policy: a causal LM that scores its own actions.

    ``forward(input_ids, attention_mask)`` gives logits ``(B, T, V)``; with ``num_actions`` it gives the
    log-probs ``(B, num_actions)`` of the last ``num_actions`` tokens, with ``labels`` those of the labelled
    tokens; both compute logits only for those positions, a chunk of rows at a time.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def from_pretrained(cls, path: str | Path, *, family: str = "auto", lora: LoraSettings | None = None,
                        grad_checkpoint: bool = False, torch_dtype: Any = None, **hf_kwargs: Any) -> "Actor":
        """See :func:`load_causal_lm` for the keywords (LoRA, ``quant``, ``frozen`` / ``frozen_dtype`` ...)."""
        actor = cls(load_causal_lm(path, family=family, lora=lora, grad_checkpoint=grad_checkpoint,
                                   torch_dtype=torch_dtype, **hf_kwargs))
        actor.source_dtype = checkpoint_dtype(path, hf_kwargs.get("trust_remote_code", False))
        return actor

    @classmethod
    def from_config(cls, config: Any, *, family: str = "auto", lora: LoraSettings | None = None,
                    grad_checkpoint: bool = False) -> "Actor":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(torch.float32))  # fp32 masters
        return cls(_prepare(model, family, lora, grad_checkpoint))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                num_actions: int | None = None, temperature: float = 1.0, labels: torch.Tensor | None = None,
                entropy: bool = False, reduction: str = "none", position_ids: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits; with ``num_actions`` the action log-probs ``(B, num_actions)`` of the last ``num_actions``
        tokens under ``log_softmax(logits / temperature)``, the distribution PPO's rollouts were sampled from
        at that temperature; with ``labels`` the log-probs of :meth:`token_log_probs` (``reduction`` and
        ``entropy`` as there; ``entropy`` also goes with ``num_actions``). Log-probs run the LM head only on
        the positions scored, in chunks; they pass through ``forward`` so DDP / FSDP wrappers see them.
        ``position_ids`` instead of a mask: a packed batch (:mod:`coati.dataset.packing`)."""
        if num_actions is None and labels is None:
            return self._logits(input_ids, attention_mask, position_ids)
        if num_actions is None:
            return self.token_log_probs(input_ids, attention_mask, labels, temperature, entropy, reduction,
                                        position_ids)
        width = input_ids.shape[1]
        prompt = torch.arange(width, device=input_ids.device) < width - num_actions
        out = self.token_log_probs(input_ids, attention_mask, input_ids.masked_fill(prompt, IGNORE_INDEX),
                                   temperature, entropy)
        if entropy:
            return out[0][:, -num_actions:], out[1][:, -num_actions:]
        return out[:, -num_actions:]

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, **_lm_inputs(self.base_lm, attention_mask, position_ids)).logits

    def token_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                        temperature: float = 1.0, entropy: bool = False, reduction: str = "none",
                        position_ids: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``(B, T - 1)`` fp32: at ``t`` the log-prob of ``labels[:, t + 1]`` given the tokens up to ``t``
        (``log_softmax(logits / temperature)``), 0 where that label is ``-100``; with ``entropy`` also the
        entropy there. ``reduction="sum"``: their sum only (an LM loss, whose gradients the head computes in
        its forward pass). The head runs only on the labelled positions' hidden states (see ``lm_head``).
        Call it through ``forward(..., labels=...)`` when the model is wrapped by a strategy."""
        lm = self.base_lm
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)[:, :-1]
        targets = labels[:, 1:]
        picked = targets.ne(IGNORE_INDEX)
        head, processing = lm.get_output_embeddings(), logit_processing(lm.config)
        rows = hidden[picked]
        if reduction == "sum":
            if entropy:
                raise ValueError("entropy is per token; it does not go with reduction='sum'")
            return token_log_probs(head, rows, targets[picked], temperature, processing, reduction="sum")
        logps = hidden.new_zeros(picked.shape, dtype=torch.float32)
        logps = logps.masked_scatter(picked, token_log_probs(head, rows, targets[picked], temperature, processing))
        if not entropy:
            return logps
        ent = torch.zeros_like(logps).masked_scatter(picked, token_entropy(head, rows, temperature, processing))
        return logps, ent

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **gen_kwargs: Any) -> torch.Tensor:
        """HF ``generate`` in eval mode (so the KV cache is used even with gradient checkpointing on);
        returns the sequences (prompt + generated tokens).

        The checkpoint's ``generation_config.json`` (repetition penalties, suppressed tokens, top-k ...) does
        not apply: transformers fills every field a passed ``generation_config`` leaves unset from the
        model's own config, so that is swapped for the library defaults during the call. A policy then
        samples only what its caller asked for.
        """
        from transformers import GenerationConfig

        lm = self.base_lm
        was_training, checkpoint_config = self.training, lm.generation_config
        self.eval()
        lm.generation_config = GenerationConfig()
        try:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
        finally:
            lm.generation_config = checkpoint_config
            self.train(was_training)
        return out.sequences if hasattr(out, "sequences") else out


class _ValueModel(_HFWrapper):
    """Causal LM body (no LM head compute) + fp32 ``value_head`` ``Linear(hidden, 1)``.

    The whole causal LM is kept so ``save_pretrained`` writes a dir ``AutoModelForCausalLM`` loads; an untied
    LM head is frozen since it never receives gradients (this keeps DDP free of unused trainable params).
    """

    def __init__(self, model: nn.Module, value_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.model = model
        lm = self.base_lm
        out_emb = lm.get_output_embeddings()
        if out_emb is not None and out_emb.weight is not lm.get_input_embeddings().weight:
            out_emb.requires_grad_(False)
        if value_head is None:
            hidden = getattr(out_emb, "in_features", None) or lm.config.hidden_size
            param = next(lm.parameters())
            value_head = nn.Linear(hidden, 1, device=param.device, dtype=torch.float32)
            nn.init.normal_(value_head.weight, std=1.0 / math.sqrt(hidden + 1))
            nn.init.zeros_(value_head.bias)
        self.value_head = value_head

    @classmethod
    def from_pretrained(cls, path: str | Path, *, family: str = "auto", lora: LoraSettings | None = None,
                        grad_checkpoint: bool = False, torch_dtype: Any = None, **hf_kwargs: Any):
        """Load the LM from ``path`` and its ``value_head.safetensors`` if present (else a small random head,
        e.g. when starting a reward model or critic from an SFT model)."""
        model = cls(load_causal_lm(path, family=family, lora=lora, grad_checkpoint=grad_checkpoint,
                                   torch_dtype=torch_dtype, **hf_kwargs))
        model.source_dtype = checkpoint_dtype(path, hf_kwargs.get("trust_remote_code", False))
        model._load_extra(Path(path))
        return model

    @classmethod
    def from_config(cls, config: Any, *, family: str = "auto", lora: LoraSettings | None = None,
                    grad_checkpoint: bool = False):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(torch.float32))  # fp32 masters
        return cls(_prepare(model, family, lora, grad_checkpoint))

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Value at every position, ``(B, T)``, fp32 (``position_ids`` instead of a mask: a packed batch)."""
        return self.value_head(self.hidden_states(input_ids, attention_mask, position_ids).float()).squeeze(-1)

    def _save_extra(self, path: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().float().contiguous().cpu() for k, v in self.value_head.state_dict().items()}
        save_file(state, str(path / VALUE_HEAD_FILE))

    def _load_extra(self, path: Path) -> None:
        from safetensors.torch import load_file

        f = path / VALUE_HEAD_FILE
        if f.is_file():
            self.value_head.load_state_dict(load_file(str(f)))


class Critic(_ValueModel):
    """Value function for PPO. ``forward(..., num_actions)`` returns the values aligned with the Actor's action
    log-probs: the value of the state before each action token (positions ``[-num_actions-1:-1]``)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                num_actions: int | None = None) -> torch.Tensor:
        values = self.values(input_ids, attention_mask)
        if num_actions is None:
            return values
        return values[:, -(num_actions + 1):-1]


class RewardModel(_ValueModel):
    """Scalar reward per sequence: the value at the last token whose attention mask is 1 (any padding side)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, last_index: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` rewards; for a packed batch pass ``position_ids`` and ``last_index``, each sample's last
        token as an index into the flattened rows (:func:`coati.dataset.packing.last_token_flat_index`),
        and get one reward per sample (``attention_mask`` then is the packed batch's own 4D mask or None)."""
        if position_ids is not None:
            hidden = self.hidden_states(input_ids, attention_mask, position_ids).flatten(0, 1)[last_index]
            return self.value_head(hidden.float()).squeeze(-1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.hidden_states(input_ids, attention_mask)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        return self.value_head(last.float()).squeeze(-1)  # the head on the scored positions only
