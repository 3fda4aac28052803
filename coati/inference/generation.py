"""Batched, streaming generation over a Hugging Face causal LM, shared by the chat CLI and the server.

Prompts arrive as token ids (rendered with the training template, see `encode_chat`), are left padded into
one batch and run through `model.generate`. A per-row tracker, attached to `generate` both as its streamer
and as a stopping criterion, gives every row its own `max_new_tokens`, stop strings, cancellation and text
callback, so requests of different lengths, streaming or not, can share one batch.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from coati.inference.loading import model_device

Messages = list[dict[str, str]]


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a raw prompt (/v1/completions), with the same BOS rule as training data."""
    from coati.dataset.templates import encode_prompt

    return encode_prompt([{"role": "user", "content": text}], tokenizer, "none")


def encode_chat(messages: Messages, tokenizer: PreTrainedTokenizerBase, template: str = "auto") -> list[int]:
    """Prompt ids for a conversation, token for token what SFT / PPO saw (coati.dataset.templates)."""
    from coati.dataset.templates import encode_prompt

    return encode_prompt(messages, tokenizer, template)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request. temperature 0 means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def batch_key(self) -> tuple:
        """Requests with equal keys can run in one `generate` call (length and stops are per row)."""
        if self.greedy:
            return ("greedy", self.repetition_penalty, self.ignore_eos)
        return ("sample", self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.seed,
                self.ignore_eos)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "cancelled" (its caller left)
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


TextCallback = Callable[[str], None]


@dataclass
class Row:
    """One request's decoding state: its tokens so far, whether and why it finished, the text already sent."""
    params: SamplingParams
    prompt_tokens: int
    on_text: TextCallback | None
    cancel: threading.Event | None
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    reason: str = "length"
    stop_at: int | None = None
    emitted: str = ""


class RowTracker(BaseStreamer):
    """Sees each step's new tokens (as `generate`'s streamer), decides per row when it is finished, and
    sends finished text to the row's callback. Text that might begin a stop string, or ends inside a
    multi-byte character, is held back, so the pieces always join to the final `Completion.text`."""

    def __init__(self, rows: list[Row], eos_ids: Sequence[int], decode: Callable[[list[int]], str]):
        self.rows, self.eos, self.decode = rows, set(eos_ids), decode
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt ids
            self._prompt_seen = True
            return
        for row, tok in zip(self.rows, value.reshape(-1).tolist()):
            self.add(row, tok)

    def end(self) -> None:
        pass

    def add(self, row: Row, tok: int) -> None:
        """Row `row`'s next token; an engine that steps requests itself (vLLM) feeds them here one by one, so
        EOS, length, stop strings and streamed text follow the same rules as in `Generator.generate`."""
        if row.done:
            return
        p = row.params
        if row.cancel is not None and row.cancel.is_set():
            row.done, row.reason = True, "cancelled"
            return
        if not p.ignore_eos and tok in self.eos:
            row.done, row.reason = True, "stop"
            return
        row.tokens.append(tok)
        if len(row.tokens) >= p.max_new_tokens:
            row.done = True
        if not p.stop and row.on_text is None:
            return
        text = self.decode(row.tokens)
        cut = find_stop(text, p.stop) if p.stop else None
        if cut is not None:
            row.done, row.reason, row.stop_at = True, "stop", cut
            self._emit(row, text[:cut])
        elif not text.endswith("\ufffd"):
            hold = max((len(s) for s in p.stop), default=1) - 1
            self._emit(row, text[: len(text) - hold])

    @staticmethod
    def _emit(row: Row, text: str) -> None:
        if row.on_text is not None and len(text) > len(row.emitted) and text.startswith(row.emitted):
            row.on_text(text[len(row.emitted):])
            row.emitted = text

    def finished(self) -> list[bool]:
        return [r.done or (r.cancel is not None and r.cancel.is_set()) for r in self.rows]

    def completion(self, row: Row) -> Completion:
        text = self.decode(row.tokens)
        if row.stop_at is not None:
            text = text[: row.stop_at]
        self._emit(row, text)
        left = not row.done and row.cancel is not None and row.cancel.is_set()  # stopped before its next step
        return Completion(text=text, token_ids=list(row.tokens), finish_reason="cancelled" if left else row.reason,
                          prompt_tokens=row.prompt_tokens)


class _TrackerStop(StoppingCriteria):
    def __init__(self, tracker: RowTracker):
        self.tracker = tracker

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor(self.tracker.finished(), dtype=torch.bool, device=input_ids.device)


def eos_ids(generation_config: GenerationConfig | None, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end an answer: the model's EOS ids (a chat model may have several) and the tokenizer's."""
    eos = getattr(generation_config, "eos_token_id", None)
    eos = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """An answer's text, as every engine returns it."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class Generator:
    """Runs `generate` for batches of token-id prompts and turns each row into a `Completion`."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model, self.tokenizer = model, tokenizer
        self.device = model_device(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_ids(model.generation_config, tokenizer)
        cfg = getattr(model, "config", None)
        self.max_model_len: int | None = getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", None)
        self.lock = threading.Lock()  # one generate at a time on the device

    def decode(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids)

    def _generation_config(self, p: SamplingParams, max_new_tokens: int) -> GenerationConfig:
        """Every decoding field is set explicitly: transformers fills unset (None) fields from the model's
        saved generation_config (a top_k of 50, say), which would change what a request asked for."""
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=self.pad_id, eos_token_id=self.eos_ids or None,
                  repetition_penalty=p.repetition_penalty, do_sample=not p.greedy,
                  temperature=1.0 if p.greedy else p.temperature, top_p=1.0 if p.greedy else p.top_p,
                  top_k=50 if p.greedy else p.top_k)  # greedy: transformers' defaults, which it ignores
        if p.ignore_eos:  # EOS is masked out, so every row runs to its own limit
            kw["min_new_tokens"] = max_new_tokens
        return GenerationConfig(**kw)

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams] | SamplingParams,
                 cancels: Sequence[threading.Event | None] | None = None,
                 on_text: Sequence[TextCallback | None] | None = None) -> list[Completion]:
        """One left-padded `generate` over all prompts, which must share `SamplingParams.batch_key`.

        `on_text[i]`, when given, receives row i's text piece by piece while it is generated (called on
        this thread); `cancels[i]` set from any thread ends row i at the next step.
        """
        n = len(prompts)
        params = [params] * n if isinstance(params, SamplingParams) else list(params)
        if n == 0 or len(params) != n:
            raise ValueError("need one SamplingParams per prompt")
        if len({p.batch_key() for p in params}) != 1:
            raise ValueError("requests in one batch must share sampling settings (batch_key)")
        width = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("empty prompt")
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        cancels = list(cancels) if cancels is not None else [None] * n
        on_text = list(on_text) if on_text is not None else [None] * n
        rows = [Row(params[i], len(prompts[i]), on_text[i], cancels[i]) for i in range(n)]
        tracker = RowTracker(rows, self.eos_ids, self.decode)
        gen_cfg = self._generation_config(params[0], max(p.max_new_tokens for p in params))
        with self.lock, torch.inference_mode():
            if params[0].seed is not None and not params[0].greedy:
                torch.manual_seed(params[0].seed)
            self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                generation_config=gen_cfg, streamer=tracker,
                                stopping_criteria=StoppingCriteriaList([_TrackerStop(tracker)]))
        return [tracker.completion(r) for r in rows]
