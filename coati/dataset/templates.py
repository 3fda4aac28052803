"""Prompt templates and the one tokenization rule shared by SFT, reward, PPO prompts and inference.

A conversation is ``list[{"role": "system" | "user" | "assistant", "content": str}]``; a user message from
an Alpaca record may also carry ``"input"`` (rendered as ``### Input:`` by "alpaca", appended to the content
after a blank line by the other templates). A template turns a conversation into segments
``(text, is_response)``; responses are the assistant turns, everything between them is prompt text.

Templates (the conversation ``[user "Add 2 and 3.", assistant "5"]``):

* ``"alpaca"``: the Stanford Alpaca prompt; multi-turn = more Instruction/Response blocks, each after a
  blank line; a system message replaces the first sentence::

      Below is an instruction that describes a task. Write a response that appropriately completes the request.

      ### Instruction:
      Add 2 and 3.

      ### Response:
      5</s>

  (with an input: "... paired with an input that provides further context. ..." and an ``### Input:`` block).
* ``"chatml"``: ``<|im_start|>user\\nAdd 2 and 3.<|im_end|>\\n<|im_start|>assistant\\n5<|im_end|></s>``; the
  response is ``content<|im_end|>`` and the ``\\n`` after it opens the next prompt segment.
* ``"auto"``: ``tokenizer.chat_template`` through ``apply_chat_template`` when the tokenizer has one, else
  "alpaca". Each assistant segment is the text that rendering ``messages[:i+1]`` adds to rendering
  ``messages[:i]`` with ``add_generation_prompt=True``; a template without that prefix property raises
  :class:`ChatTemplateError`.
* ``"none"``: raw text, contents concatenated with nothing added: ``Add 2 and 3.`` then ``5</s>``
  (coati's arithmetic pipeline writes its own prompt text).

Tokenization (:func:`encode_segments`), identical for every dataset and for :func:`encode_prompt`:

* each segment is tokenized on its own with ``add_special_tokens=False`` and the pieces are concatenated, so
  the prompt tokens of an SFT / reward sample equal the PPO / inference prompt tokens exactly;
* SentencePiece tokenizers (LLaMA) prepend a word-start marker to every call; segments after the first are
  tokenized as if preceded by a newline and that newline is cut off again, so ``"### Response:\\n"`` +
  ``"5"`` gives the same pieces as the joined text instead of an extra space;
* BOS rule: ``bos_token_id`` is prepended when the tokenizer defines a BOS token that differs from its EOS
  token and the first segment does not already start with it (chat templates that write ``<s>`` /
  ``<|begin_of_text|>`` themselves). GPT-2 / GPT-NeoX style tokenizers, whose BOS is the ``<|endoftext|>``
  EOS (and often the pad token), get no BOS. transformers 5's ``LlamaTokenizer`` adds no BOS on its own, so
  coati adds it here, once;
* ``eos_token_id`` is appended after every response unless the response tokens already contain it (chat
  templates that end turns with the EOS token); response tokens and that EOS carry labels, all other
  labels are -100.
"""
from __future__ import annotations

from typing import Sequence

from ..errors import UserError
from ..utils import IGNORE_INDEX

TEMPLATES = ("auto", "alpaca", "chatml", "none")

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.")

Messages = Sequence[dict]
Segments = list[tuple[str, bool]]


class ChatTemplateError(UserError, ValueError):
    """The tokenizer's chat template cannot be split into prompt / response segments."""


def resolve_template(tokenizer, template: str = "auto") -> str:
    """"auto" -> "chat_template" when the tokenizer has one, else "alpaca"; other names are checked."""
    if template == "auto":
        return "chat_template" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose one of {TEMPLATES}")
    return template


def user_text(message: dict) -> str:
    """User content with an Alpaca ``input`` appended after a blank line (templates without an input slot)."""
    extra = message.get("input") or ""
    return f"{message['content']}\n\n{extra}" if extra else message["content"]


def _alpaca_parts(messages: Messages):
    first_user = next((m for m in messages if m["role"] == "user"), {})
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    start = (system if system is not None else
             ALPACA_PREAMBLE_INPUT if first_user.get("input") else ALPACA_PREAMBLE) + "\n\n"

    def user(m: dict) -> str:
        block = f"### Instruction:\n{m['content']}\n\n"
        if m.get("input"):
            block += f"### Input:\n{m['input']}\n\n"
        return block

    return start, user, "### Response:\n", "\n\n"


def _generic_segments(messages: Messages, template: str, add_generation_prompt: bool) -> Segments:
    """alpaca / chatml / none: prompt text accumulates until an assistant turn closes it."""
    if template == "alpaca":
        start, user, gen, after = _alpaca_parts(messages)
        system = lambda m: ""  # noqa: E731 - already in the preamble
        close = ""
    elif template == "chatml":
        start, gen, after, close = "", "<|im_start|>assistant\n", "\n", "<|im_end|>"
        user = lambda m: f"<|im_start|>user\n{user_text(m)}<|im_end|>\n"  # noqa: E731
        system = lambda m: f"<|im_start|>system\n{m['content']}<|im_end|>\n"  # noqa: E731
    else:  # none
        start, user, gen, after, close = "", user_text, "", "", ""
        system = lambda m: m["content"]  # noqa: E731
    segments: Segments = []
    pending = start
    for m in messages:
        role = m["role"]
        if role == "system":
            pending += system(m)
        elif role == "user":
            pending += user(m)
        elif role == "assistant":
            segments.append((pending + gen, False))
            segments.append((m["content"] + close, True))
            pending = after
        else:
            raise ValueError(f"unknown role {role!r}")
    if messages and messages[-1]["role"] != "assistant":
        segments.append((pending + (gen if add_generation_prompt else ""), False))
    return segments


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(out, str):
        raise ChatTemplateError(f"apply_chat_template returned {type(out).__name__}, expected str")
    return out


def _chat_template_segments(messages: Messages, tokenizer, add_generation_prompt: bool) -> Segments:
    msgs = [{"role": m["role"], "content": user_text(m) if m["role"] == "user" else m["content"]} for m in messages]
    segments: Segments = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = _render_chat(tokenizer, msgs[:i], True)
        full = _render_chat(tokenizer, msgs[: i + 1], False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise ChatTemplateError(
                f"the chat template is not prefix-stable at message {i}: rendering messages[:{i + 1}] does not "
                f"extend rendering messages[:{i}] with add_generation_prompt=True, so the response tokens "
                "cannot be found; use prompt_template='chatml' or 'alpaca', or fix the template")
        segments.append((prefix[len(done):], False))
        segments.append((full[len(prefix):], True))
        done = full
    if msgs and msgs[-1]["role"] != "assistant":
        prefix = _render_chat(tokenizer, msgs, add_generation_prompt)
        if not prefix.startswith(done):
            raise ChatTemplateError("the chat template is not prefix-stable at the final prompt turn")
        segments.append((prefix[len(done):], False))
    return segments


def render_segments(messages: Messages, tokenizer, template: str = "auto", *,
                    add_generation_prompt: bool = True) -> Segments:
    """``[(text, is_response)]`` for a conversation; a trailing non-assistant turn ends with the generation
    prompt (e.g. ``### Response:\\n``) when ``add_generation_prompt``. Texts carry no BOS/EOS tokens."""
    if not messages:
        raise ValueError("empty conversation")
    name = resolve_template(tokenizer, template)
    if name == "chat_template":
        return _chat_template_segments(messages, tokenizer, add_generation_prompt)
    return _generic_segments(messages, name, add_generation_prompt)


def _check_prompt(messages: Messages) -> None:
    if not messages or messages[-1]["role"] == "assistant":
        raise ValueError("a prompt conversation must end with a user (or system) message")


def render_prompt(messages: Messages, tokenizer, template: str = "auto") -> str:
    """The text a model should continue. Earlier responses are followed by ``tokenizer.eos_token`` where
    training appended one; the BOS token is not included (see :func:`encode_prompt` for exact tokens)."""
    _check_prompt(messages)
    return join_segments(render_segments(messages, tokenizer, template), tokenizer.eos_token)


def join_segments(segments: Segments, eos_token: str) -> str:
    """Segment texts joined, with ``eos_token`` after each response that does not contain it (as the EOS id is
    appended after responses whose tokens lack it)."""
    return "".join(text + eos_token if is_response and eos_token not in text else text
                   for text, is_response in segments)


def encode_prompt(messages: Messages, tokenizer, template: str = "auto") -> list[int]:
    """Prompt token ids exactly as SFT/reward samples contain them (BOS, segments, EOS after responses)."""
    _check_prompt(messages)
    return SegmentEncoder(tokenizer).encode(render_segments(messages, tokenizer, template))[0]


def encode_segments(segments: Segments, tokenizer) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for segments, following the rules in this module's docstring."""
    return SegmentEncoder(tokenizer).encode(segments)


class SegmentEncoder:
    """Tokenizes segments (in batches for whole datasets) with the BOS / EOS / word-start rules above."""

    _SENTINEL = "\n"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token before building datasets")
        bos = tokenizer.bos_token_id
        self.bos_id = bos if bos is not None and bos != self.eos_id else None
        self._sentinel_ids = self._raw([self._SENTINEL])[0]
        with_sentinel = self._raw([self._SENTINEL + "a"])[0]
        # SentencePiece-style tokenizers add a word-start marker to each call; strip it on later segments.
        self.strip_sentinel = (with_sentinel[: len(self._sentinel_ids)] == self._sentinel_ids
                               and with_sentinel[len(self._sentinel_ids):] != self._raw(["a"])[0])

    def _raw(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def encode_texts(self, texts: list[str], first: list[bool]) -> list[list[int]]:
        """Token ids of each text; ``first`` marks texts that open a sequence (no word-start stripping)."""
        if not self.strip_sentinel:
            return self._raw(texts)
        inputs = [t if f else self._SENTINEL + t for t, f in zip(texts, first)]
        out = self._raw(inputs)
        n = len(self._sentinel_ids)
        for k, (ids, f) in enumerate(zip(out, first)):
            if not f:
                out[k] = ids[n:] if ids[:n] == self._sentinel_ids else self._raw([texts[k]])[0]
        return out

    def assemble(self, segments: Segments, pieces: list[list[int]]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        first = next((piece for piece in pieces if piece), [])
        if self.bos_id is not None and first[:1] != [self.bos_id]:
            ids.append(self.bos_id)
            labels.append(IGNORE_INDEX)
        for (_, is_response), piece in zip(segments, pieces):
            ids.extend(piece)
            if is_response:
                labels.extend(piece)
                if self.eos_id not in piece:
                    ids.append(self.eos_id)
                    labels.append(self.eos_id)
            else:
                labels.extend([IGNORE_INDEX] * len(piece))
        return ids, labels

    def _first_flags(self, segments: Segments) -> list[bool]:
        flags, seen = [], False
        for text, _ in segments:
            flags.append(not seen)
            seen = seen or bool(text)
        return flags

    def encode(self, segments: Segments) -> tuple[list[int], list[int]]:
        return self.encode_many([segments])[0]

    def encode_many(self, batch: list[Segments], *, progress: bool = False,
                    desc: str = "tokenizing") -> list[tuple[list[int], list[int]]]:
        """Encode many segment lists with batched tokenizer calls (a tqdm bar when ``progress``)."""
        keys: dict[tuple[str, bool], int] = {}
        for segments in batch:
            for (text, _), f in zip(segments, self._first_flags(segments)):
                if text:
                    keys.setdefault((text, f), len(keys))
        items = list(keys)
        ids: list[list[int]] = []
        chunk = 2048
        starts = range(0, len(items), chunk)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, unit="chunk", leave=False)
        for s in starts:
            part = items[s: s + chunk]
            ids.extend(self.encode_texts([t for t, _ in part], [f for _, f in part]))
        out = []
        for segments in batch:
            pieces = [ids[keys[(text, f)]] if text else []
                      for (text, _), f in zip(segments, self._first_flags(segments))]
            out.append(self.assemble(segments, pieces))
        return out
