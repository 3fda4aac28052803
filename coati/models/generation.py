"""HF ``generate`` with exact sampling settings and response masks (what :class:`~coati.rollout.HFRolloutEngine`
samples with)."""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from transformers import DynamicCache, GenerationConfig, GenerationMixin

try:  # cache layers whose per-row state is their keys and values only: dropping rows is indexing them
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    _ROW_DROPPABLE_LAYERS: tuple[type, ...] = (DynamicLayer, DynamicSlidingWindowLayer)
except ImportError:  # transformers < 4.54
    _ROW_DROPPABLE_LAYERS = ()


def _runs_custom_loops() -> bool:
    """Whether this transformers takes a callable ``custom_generate`` and has the pieces of ``_sample`` that
    :func:`sample_dropping_finished` calls (transformers 5); elsewhere generate_with_masks keeps its own loop."""
    custom = inspect.signature(GenerationMixin.generate).parameters.get("custom_generate")
    prepare = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return (bool(_ROW_DROPPABLE_LAYERS) and custom is not None and "Callable" in str(custom.annotation)
            and "next_sequence_length" in prepare
            and all(hasattr(GenerationMixin, name) for name in ("_prefill", "_optimize_model_for_decode")))


DROPS_FINISHED_ROWS = _runs_custom_loops()


def action_mask_from_tokens(generated: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """``(B, A)`` mask: 1 up to and including the first EOS of each row, 0 after (all 1 without EOS).

    Counting EOS tokens strictly before each position works whether the tokens after EOS are pad or EOS.
    """
    eos = torch.as_tensor(eos_token_id, device=generated.device).reshape(-1)
    is_eos = torch.isin(generated, eos).long()
    eos_before = is_eos.cumsum(-1) - is_eos
    return eos_before.eq(0)


@torch.no_grad()
def sample_dropping_finished(model: Any, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
                             generation_config: GenerationConfig, synced_gpus: bool = False, streamer: Any = None,
                             **model_kwargs: Any) -> torch.Tensor:
    """transformers' sampling / greedy loop (``GenerationMixin._sample``) as a ``generate(custom_generate=...)``
    decoding method that runs the model only on the rows still generating: a row that has ended costs no
    forward and no KV cache any more. The scores are laid out for the whole batch before the logits processors,
    the softmax and ``torch.multinomial`` run, so every random draw and every processed row is what ``_sample``
    gives: the same tokens for the same seed. Outputs other than the sequences, a streamer, synced GPUs,
    chunked prefill or a cache other than a :class:`~transformers.DynamicCache` of key / value layers (which
    can drop rows) go to ``_sample`` itself."""
    if (synced_gpus or streamer is not None or generation_config.return_dict_in_generate
            or generation_config.prefill_chunk_size is not None or model.config.is_encoder_decoder
            or type(model_kwargs.get("cache")) is not DynamicCache
            or any(type(layer) not in _ROW_DROPPABLE_LAYERS for layer in model_kwargs["cache"].layers)):
        return type(model)._sample(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    with model._optimize_model_for_decode():  # as _sample decodes (MoE experts' kernel on GPUs)
        return _decode(model, input_ids, outputs, logits_processor, stopping_criteria, generation_config,
                       model_kwargs)


def _decode(model: Any, input_ids: torch.Tensor, outputs: Any, logits_processor: Any, stopping_criteria: Any,
            generation_config: GenerationConfig, model_kwargs: dict[str, Any]) -> torch.Tensor:
    """:func:`sample_dropping_finished` after the prefill (``outputs``): one token per step for every row, the
    model run on the unfinished ones only."""
    pad_token_id = generation_config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    batch_size = input_ids.size(0)
    unfinished = torch.ones(batch_size, dtype=torch.long, device=input_ids.device)
    active = torch.arange(batch_size, device=input_ids.device)  # the rows model_kwargs and the cache hold
    while True:
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
        del outputs
        if len(active) < batch_size:  # ended rows: zeros, whose draws are thrown away as _sample's are
            next_token_logits = logits.new_zeros(batch_size, logits.size(-1)).index_copy_(0, active, logits)
        else:
            next_token_logits = logits
        next_token_scores = logits_processor(input_ids, next_token_logits)
        if generation_config.do_sample:
            probs = torch.nn.functional.softmax(next_token_scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_token_scores, dim=-1)
        if has_eos_stopping_criteria:
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, None)  # scores: None, as _sample without output_scores
        if unfinished.max() == 0:
            return input_ids
        keep = unfinished[active].bool()
        if not keep.all():
            kept = keep.nonzero().squeeze(1)
            active = active[kept]
            model_kwargs["cache"].batch_select_indices(kept)
            for key in ("attention_mask", "position_ids", "token_type_ids"):
                if model_kwargs.get(key) is not None:
                    model_kwargs[key] = model_kwargs[key][kept]
        model_inputs = model.prepare_inputs_for_generation(input_ids[active], next_sequence_length=1,
                                                           **model_kwargs)
        outputs = model(**model_inputs, return_dict=True)


@torch.no_grad()
def generate_with_masks(actor: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                        eos_token_id: int | Sequence[int], pad_token_id: int,
                        **sampling: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample continuations of left-padded prompts with exactly the settings given.

    ``actor`` is an :class:`~coati.models.Actor`, whose ``generate`` ignores the checkpoint's
    ``generation_config.json``; ``sampling`` (``do_sample``, ``temperature``, ``top_k``, ``top_p``,
    ``max_new_tokens`` ...) makes the whole :class:`~transformers.GenerationConfig`, unset fields keeping
    transformers' library defaults, and entries that are no config field (``logits_processor`` ...) go to
    ``generate`` as they are. On transformers 5 it decodes with :func:`sample_dropping_finished` (the same
    tokens as transformers' own loop, faster once rows end); ``custom_generate=None`` in ``sampling`` gives
    that loop.
    Returns ``sequences`` (prompt + generated, ``(B, P + A)``), ``attention_mask`` (prompt mask + valid
    actions) and ``action_mask`` (``(B, A)``, 1 up to and including the first EOS), masks in the dtype of
    the prompt mask.
    """
    if input_ids.size(0) > 1 and attention_mask[:, -1].eq(0).any():
        raise ValueError("generate_with_masks needs left-padded prompts (a row ends with padding)")
    config = GenerationConfig(eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    extra = config.update(**sampling)
    if DROPS_FINISHED_ROWS:
        extra = {"custom_generate": sample_dropping_finished, **extra}
    sequences = actor.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                               **extra)
    generated = sequences[:, input_ids.size(1):]
    action_mask = action_mask_from_tokens(generated, eos_token_id).to(attention_mask.dtype)
    full_mask = torch.cat([attention_mask, action_mask], dim=1)
    return sequences, full_mask, action_mask
