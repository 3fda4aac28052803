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
import inspect
import math
from pathlib import Path
from typing import Any, Iterator, TypeVar

import torch
import torch.nn as nn

from ..errors import UsageError
from ..utils import IGNORE_INDEX
from .dtypes import dtype_kwargs
from .lm_head import logit_processing, token_entropy, token_log_probs
from .loading import (ADAPTER_CONFIG_FILE, VALUE_HEAD_FILE, base_lm, cast_copy, checkpoint_dtype, full_state_dict,
                      load_adapter, load_causal_lm, load_full, prepare_lm)
from .lora import LoraSettings, is_peft_model
from .quant import full_precision_copy, quant_mode
from .segment_attention import SEGMENT_SDPA, Segments, segment_inputs
from .utils import last_token_index, position_ids_from_mask

_SIGNATURES: dict[type, frozenset[str]] = {}
_Wrapper = TypeVar("_Wrapper", bound="_HFWrapper")


def _accepts(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` takes keyword ``name`` (inspected once per class)."""
    cls = type(module)
    if cls not in _SIGNATURES:
        try:
            _SIGNATURES[cls] = frozenset(inspect.signature(module.forward).parameters)
        except (TypeError, ValueError):
            _SIGNATURES[cls] = frozenset()
    return name in _SIGNATURES[cls]


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
    seq2seq = False  # an encoder-decoder LM (:class:`Seq2SeqActor`)

    @classmethod
    def from_pretrained(cls: type[_Wrapper], path: str | Path, *, family: str = "auto",
                        lora: LoraSettings | None = None, grad_checkpoint: bool = False, torch_dtype: Any = None,
                        **hf_kwargs: Any) -> _Wrapper:
        """See :func:`load_causal_lm` for the keywords (LoRA, ``quant``, ``frozen`` / ``frozen_dtype`` ...). A value
        model also loads ``value_head.safetensors`` if present (else it keeps a small random head, e.g. when
        starting a reward model or critic from an SFT model)."""
        model = cls(load_causal_lm(path, family=family, lora=lora, grad_checkpoint=grad_checkpoint,
                                   torch_dtype=torch_dtype, seq2seq=cls.seq2seq, **hf_kwargs))
        model.source_dtype = checkpoint_dtype(path, hf_kwargs.get("trust_remote_code", False))
        model._load_extra(Path(path))
        return model

    @classmethod
    def from_config(cls: type[_Wrapper], config: Any, *, family: str = "auto", lora: LoraSettings | None = None,
                    grad_checkpoint: bool = False) -> _Wrapper:
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        auto = AutoModelForSeq2SeqLM if cls.seq2seq else AutoModelForCausalLM
        model = auto.from_config(config, **dtype_kwargs(torch.float32))  # fp32 masters
        return cls(prepare_lm(model, family, lora, grad_checkpoint))

    @property
    def lora_enabled(self) -> bool:
        return is_peft_model(self.model)

    @property
    def base_lm(self) -> nn.Module:
        return base_lm(self.model)

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
        with self.model.disable_adapter() if self.lora_enabled else contextlib.nullcontext():
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
                merged = cast_copy(self.model, torch.float32).merge_and_unload()
                merged.to(dtype or self.base_lm.dtype)
            merged.save_pretrained(str(path))
            del merged
        elif self.lora_enabled:
            # only this model's adapter (a critic may carry the reward model's as a second one)
            self.model.save_pretrained(str(path), selected_adapters=[self.model.active_adapter])
        elif dtype is None or dtype == self.model.dtype:
            self.model.save_pretrained(str(path))
        else:
            cast_copy(self.model, dtype).save_pretrained(str(path))
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
            load_adapter(self.model, path)
        else:
            if is_adapter_dir:
                raise ValueError(f"{path} holds a LoRA adapter but this model has no LoRA")
            load_full(self.model, full_state_dict(path), path)
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


class Seq2SeqActor(Actor):
    """An encoder-decoder LM (T5, BART) for SFT, in the causal batch convention: ``input_ids`` (the rendered
    prompt) feed the encoder and ``labels`` are the decoder's sequence ``[start] + response + [EOS]``, -100 at
    the start and on padding (``SFTDataset(seq2seq=True)``), so SFT's loss and token count hold unchanged.
    ``generate`` returns the decoder's tokens only (the start token, then the answer). Only SFT loads one:
    :func:`load_causal_lm` refuses encoder-decoder checkpoints for every other model."""

    seq2seq = True

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, temperature: float = 1.0, reduction: str = "none",
                ) -> torch.Tensor:
        """``(B, L - 1)`` fp32: at ``t`` the log-prob of ``labels[:, t + 1]`` given the prompt and the labels
        before it, 0 where that label is -100; their sum with ``reduction="sum"`` (as
        :meth:`Actor.token_log_probs`). The decoder reads the labels shifted right, as transformers' own loss."""
        if labels is None:
            raise ValueError("Seq2SeqActor scores labels: pass labels (the decoder sequence)")
        targets = labels[:, 1:]
        decoder_ids = self.base_lm.prepare_decoder_input_ids_from_labels(labels=targets)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_ids,
                            use_cache=False).logits
        picked = targets.ne(IGNORE_INDEX)
        logps = -nn.functional.cross_entropy(logits[picked].float() / temperature, targets[picked],
                                             reduction="none")
        if reduction == "sum":
            return logps.sum()
        return logps.new_zeros(picked.shape).masked_scatter(picked, logps)


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
