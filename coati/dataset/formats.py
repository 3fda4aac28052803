"""Record shapes coati understands, turned into conversations (or raw text segments) for each task.

SFT (detected from the first record's keys; every record must then have that shape):
    ``{messages: [{role, content}]}`` (OpenAI chat), ``{messages: [{from, content}]}`` (Colossal-LLaMA),
    ``{conversations: [{from, value}]}`` (ShareGPT; from human / gpt / system; optional top-level
    ``system``), ``{instruction, input?, output, system?, history?: [[q, a], ...]}`` (Alpaca / LIMA),
    ``{source, target}`` (raw text, loss on target), ``{text}`` (raw text, loss on every token).
Reward (``format=`` or detected): "hh-rlhf" ``{chosen, rejected}`` transcripts, "rm-static"
    ``{prompt, chosen, rejected}``, "sharegpt" ``{conversations, chosen: {from, value}, rejected}``,
    "ranked" ``{instruction, input, output: [best, ..., worst]}`` (every better/worse pair) or
    ``{instruction, input, chosen, rejected}``, "chat" ``{chosen: [messages], rejected: [messages]}``.
Unpaired (KTO): ``{messages: [...], label: bool}`` (the last assistant turn is judged), ``{prompt, completion,
    label}`` (prompt text or messages; completion text or ``[assistant message]``), or any reward format split
    into a desirable chosen and an undesirable rejected sample.
Prompts (per record, first field found): ``messages`` / ``conversations`` (a trailing assistant turn is
    dropped), ``prompt`` (an hh-style ``\\n\\nHuman: ... \\n\\nAssistant:`` transcript is parsed into turns),
    ``instruction`` (+ ``input``, or the first ``instances[].input``), ``question``, ``text``, ``source``
    (raw, no template). The record's other scalar fields are returned as extras.
PPO-ptx pretraining data: any SFT shape, converted as for SFT.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any, Callable

from .io import DatasetFormatError, EmptyFieldError, Record
from .templates import Segments, render_segments

ROLE_ALIASES = {
    "user": "user", "human": "user", "system": "system",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
}
REWARD_FORMATS = ("hh-rlhf", "rm-static", "sharegpt", "ranked", "chat")
SCALARS = (str, int, float, bool)


@dataclass
class Conversation:
    """A chat rendered through the prompt template, or raw segments that bypass it."""

    messages: list[dict] | None = None
    raw: Segments | None = None

    def segments(self, tokenizer, template: str, add_generation_prompt: bool = True) -> Segments:
        if self.raw is not None:
            return self.raw
        return render_segments(self.messages, tokenizer, template, add_generation_prompt=add_generation_prompt)


def _type_name(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {str: "a string", list: "a list", dict: "an object"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def get_field(rec: Record, key: str, types=str, *, required: bool = True, default: Any = None) -> Any:
    """``rec.data[key]`` checked for presence and type (``None`` counts as missing)."""
    value = rec.data.get(key)
    if value is None:
        if required:
            raise rec.error(key, f"missing (keys seen: {sorted(rec.data)})")
        return default
    if not isinstance(value, types):
        raise rec.error(key, f"expected {_type_name(types)}, got {type(value).__name__}")
    return value


def require_text(rec: Record, field: str, text: str, what: str = "response", location: str | None = None) -> str:
    if not text.strip():
        raise EmptyFieldError(rec.path, location or rec.location, field, f"empty {what}")
    return text


def _content(value: Any) -> Any:
    """OpenAI content may be a list of parts; keep its text parts."""
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return "".join(str(p.get("text", "")) for p in value if p.get("type", "text") == "text")
    return value


def parse_messages(rec: Record, key: str, *, items: list | None = None, check_responses: bool = True) -> list[dict]:
    """Validate a chat list (role/from + content/value) into ``[{role, content}]`` with alternating turns."""
    items = get_field(rec, key, list) if items is None else items
    turn_lines = rec.meta.get("turn_lines")
    messages: list[dict] = []
    for i, item in enumerate(items):
        name = f"{key}[{i}]"
        loc = f"line {turn_lines[i]}" if turn_lines else None
        where = loc or rec.location
        if not isinstance(item, dict):
            raise DatasetFormatError(rec.path, where, name, f"expected an object, got {type(item).__name__}")
        role_key = "role" if "role" in item else "from" if "from" in item else None
        text_key = "content" if "content" in item else "value" if "value" in item else None
        if role_key is None or text_key is None:
            missing = "role" if role_key is None else "content"
            raise DatasetFormatError(rec.path, where, f"{name}.{missing}", f"missing (keys seen: {sorted(item)})")
        role = ROLE_ALIASES.get(str(item[role_key]).lower())
        if role is None:
            raise DatasetFormatError(rec.path, where, f"{name}.{role_key}",
                                     f"unknown role {item[role_key]!r} (expected one of {sorted(ROLE_ALIASES)})")
        content = _content(item[text_key])
        if not isinstance(content, str):
            raise DatasetFormatError(rec.path, where, f"{name}.{text_key}",
                                     f"expected a string, got {type(content).__name__}")
        expected = "user" if not messages or messages[-1]["role"] != "user" else "assistant"
        if role == "system":
            if messages:
                raise DatasetFormatError(rec.path, where, f"{name}.{role_key}", "a system message may only come first")
        elif role != expected:
            raise DatasetFormatError(rec.path, where, f"{name}.{role_key}",
                                     f"expected role '{expected}' here: turns must alternate user/assistant "
                                     "after an optional system message")
        if role == "user" or (role == "assistant" and check_responses):
            require_text(rec, f"{name}.{text_key}", content, "response" if role == "assistant" else "prompt", loc)
        messages.append({"role": role, "content": content})
    return messages


def _with_system(rec: Record, messages: list[dict]) -> list[dict]:
    system = get_field(rec, "system", str, required=False)
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


def _history(rec: Record) -> list[dict]:
    history = get_field(rec, "history", list, required=False, default=[])
    out = []
    for i, pair in enumerate(history):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(x, str) for x in pair)):
            raise rec.error(f"history[{i}]", "expected a [instruction, response] pair of strings")
        require_text(rec, f"history[{i}][1]", pair[1])
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def alpaca_prompt(rec: Record, *, input_fallback: bool = False) -> list[dict]:
    """System + history + the user turn of an Alpaca-style record (instruction with optional input)."""
    instruction = get_field(rec, "instruction")
    inp = get_field(rec, "input", str, required=False, default="")
    if not inp and input_fallback and isinstance(rec.data.get("instances"), list):
        first = rec.data["instances"][0] if rec.data["instances"] else None
        if isinstance(first, dict) and isinstance(first.get("input"), str):
            inp = first["input"]
    require_text(rec, "instruction", instruction + inp, "prompt")
    user = {"role": "user", "content": instruction}
    if inp:
        user["input"] = inp
    return _with_system(rec, _history(rec) + [user])


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def parse_hh(text: str) -> list[dict] | None:
    """``\\n\\nHuman: ...\\n\\nAssistant: ...`` into messages (consecutive turns of one speaker merged);
    None when the text is not such a transcript."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    messages: list[dict] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    return messages


def _prompt_from_text(rec: Record, key: str) -> list[dict]:
    text = get_field(rec, key)
    require_text(rec, key, text, "prompt")
    messages = parse_hh(text)
    if messages is None:
        return [{"role": "user", "content": text}]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages = messages[:-1]  # "... \n\nAssistant:" is the generation point
    if not messages or messages[-1]["role"] != "user" or messages[0]["role"] != "user":
        raise rec.error(key, "an hh-style prompt must start with 'Human:' and end with a Human turn "
                             "(optionally followed by an empty 'Assistant:')")
    return messages


def _hh_transcript(rec: Record, key: str) -> list[dict]:
    text = get_field(rec, key)
    messages = parse_hh(text)
    if messages is None:
        raise rec.error(key, "expected a transcript of '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    if messages[-1]["role"] != "assistant" or len(messages) < 2 or messages[0]["role"] != "user":
        raise rec.error(key, "the transcript must start with a Human turn and end with an Assistant turn")
    require_text(rec, key, messages[-1]["content"])
    return messages


# ---------------------------------------------------------------- SFT

def _sft_chat(key: str) -> Callable[[Record], list[Conversation]]:
    def convert(rec: Record) -> list[Conversation]:
        messages = _with_system(rec, parse_messages(rec, key))
        while messages and messages[-1]["role"] != "assistant":
            messages = messages[:-1]
        if not messages:
            raise rec.error(key, "no assistant turn to learn from")
        return [Conversation(messages=messages)]
    return convert


def _sft_alpaca(rec: Record) -> list[Conversation]:
    output = require_text(rec, "output", get_field(rec, "output"))
    return [Conversation(messages=alpaca_prompt(rec) + [{"role": "assistant", "content": output}])]


def _sft_source_target(rec: Record) -> list[Conversation]:
    source = get_field(rec, "source", str, required=False, default="")
    target = require_text(rec, "target", get_field(rec, "target"))
    return [Conversation(raw=[(source, False), (target, True)])]


def _sft_text(rec: Record) -> list[Conversation]:
    return [Conversation(raw=[(require_text(rec, "text", get_field(rec, "text"), "text"), True)])]


def _unknown(rec: Record, kind: str, expected: str) -> DatasetFormatError:
    return rec.error(None, f"unknown {kind} format; keys seen: {sorted(rec.data)}; expected {expected}")


def sft_converter(first: Record) -> Callable[[Record], list[Conversation]]:
    keys = first.data
    if "messages" in keys:
        return _sft_chat("messages")
    if "conversations" in keys:
        return _sft_chat("conversations")
    if "instruction" in keys:
        return _sft_alpaca
    if "source" in keys or "target" in keys:
        return _sft_source_target
    if "text" in keys:
        return _sft_text
    raise _unknown(first, "SFT", "messages, conversations, instruction/input/output, source/target or text")


# ---------------------------------------------------------------- reward

Pair = tuple[list[dict], list[dict]]


def _reply(rec: Record, key: str) -> str:
    value = rec.data.get(key)
    if isinstance(value, dict):
        role = ROLE_ALIASES.get(str(value.get("from", value.get("role", "assistant"))).lower())
        text_key = "value" if "value" in value else "content"
        if role != "assistant":
            raise rec.error(f"{key}.from", f"expected an assistant reply, got {value.get('from')!r}")
        if not isinstance(value.get(text_key), str):
            raise rec.error(f"{key}.{text_key}", f"expected a string, got {type(value.get(text_key)).__name__}")
        return require_text(rec, f"{key}.{text_key}", value[text_key])
    return require_text(rec, key, get_field(rec, key, str))


def _pairs(prompt: list[dict], replies: list[str]) -> list[Pair]:
    """Every (better, worse) pair of a ranked list of replies."""
    return [(prompt + [{"role": "assistant", "content": better}], prompt + [{"role": "assistant", "content": worse}])
            for better, worse in itertools.combinations(replies, 2)]


def _rm_hh(rec: Record) -> list[Pair]:
    return [(_hh_transcript(rec, "chosen"), _hh_transcript(rec, "rejected"))]


def _rm_static(rec: Record) -> list[Pair]:
    prompt = _prompt_from_text(rec, "prompt")
    return _pairs(prompt, [_reply(rec, "chosen").strip(), _reply(rec, "rejected").strip()])


def _rm_sharegpt(rec: Record) -> list[Pair]:
    prompt = _with_system(rec, parse_messages(rec, "conversations"))
    if prompt[-1]["role"] != "user":
        raise rec.error("conversations", "must end with a human turn (the replies are in chosen/rejected)")
    return _pairs(prompt, [_reply(rec, "chosen"), _reply(rec, "rejected")])


def _rm_ranked(rec: Record) -> list[Pair]:
    prompt = alpaca_prompt(rec)
    if "output" not in rec.data and "chosen" in rec.data:
        return _pairs(prompt, [_reply(rec, "chosen"), _reply(rec, "rejected")])
    outputs = get_field(rec, "output", list)
    if len(outputs) < 2:
        raise rec.error("output", f"a ranked list needs at least 2 responses, got {len(outputs)}")
    for i, out in enumerate(outputs):
        if not isinstance(out, str):
            raise rec.error(f"output[{i}]", f"expected a string, got {type(out).__name__}")
        require_text(rec, f"output[{i}]", out)
    return _pairs(prompt, outputs)


def _rm_chat(rec: Record) -> list[Pair]:
    prefix = parse_messages(rec, "prompt") if isinstance(rec.data.get("prompt"), list) else []
    sides = []
    for key in ("chosen", "rejected"):
        messages = parse_messages(rec, key, items=prefix + get_field(rec, key, list) if prefix else None)
        if messages[-1]["role"] != "assistant":
            raise rec.error(key, "must end with an assistant turn")
        sides.append(_with_system(rec, messages))
    return [tuple(sides)]


_REWARD = {"hh-rlhf": _rm_hh, "rm-static": _rm_static, "sharegpt": _rm_sharegpt, "ranked": _rm_ranked,
           "chat": _rm_chat}


def format_from_name(name: Any) -> str | None:
    """A reward format from a dataset name or path (``"Anthropic/hh-rlhf"``, ``"/data/Dahoas/rm-static"``);
    None when the name says nothing and the records' keys must decide."""
    n = str(name).lower().replace("\\", "/").replace("_", "-")
    if any(k in n for k in ("rm-static", "dahoas/", "synthetic-instruct-gptj-pairwise")):
        return "rm-static"
    if "hh-rlhf" in n:
        return "hh-rlhf"
    if "oaast-rm" in n or "oasst-rm" in n:
        return "ranked"
    return None


def detect_reward_format(first: Record) -> str:
    keys = first.data
    if "chosen" in keys and "rejected" in keys:
        if "conversations" in keys:
            return "sharegpt"
        if "instruction" in keys:
            return "ranked"
        if isinstance(keys.get("chosen"), list):
            return "chat"
        if "prompt" in keys:
            return "rm-static"
        return "hh-rlhf"
    if "instruction" in keys and isinstance(keys.get("output"), list):
        return "ranked"
    raise _unknown(first, "reward", "{chosen, rejected} (hh-rlhf), {prompt, chosen, rejected} (rm-static), "
                                    "{conversations, chosen, rejected} (sharegpt) or "
                                    "{instruction, input, output: [ranked]} (ranked)")


def reward_converter(first: Record, fmt: str | None) -> Callable[[Record], list[Pair]]:
    if fmt is None or fmt == "auto":
        fmt = detect_reward_format(first)
    if fmt not in _REWARD:
        raise ValueError(f"unknown reward format {fmt!r}; choose one of {REWARD_FORMATS}")
    return _REWARD[fmt]


# ---------------------------------------------------------------- unpaired (KTO)

Labelled = tuple[list[dict], bool]


def _label(rec: Record) -> bool:
    value = rec.data.get("label")
    if not isinstance(value, bool):
        raise rec.error("label", f"expected true or false, got {type(value).__name__}")
    return value


def _ends_with_reply(rec: Record, key: str, messages: list[dict]) -> list[dict]:
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise rec.error(key, "must end with the assistant completion that 'label' judges")
    return messages


def _kto_messages(rec: Record) -> list[Labelled]:
    return [(_ends_with_reply(rec, "messages", _with_system(rec, parse_messages(rec, "messages"))), _label(rec))]


def _kto_prompt_completion(rec: Record) -> list[Labelled]:
    prompt, completion = rec.data.get("prompt"), rec.data.get("completion")
    if isinstance(prompt, list):  # conversational: prompt messages + [assistant message]
        items = prompt + (completion if isinstance(completion, list) else [{"role": "assistant", "content":
                                                                             _reply(rec, "completion")}])
        messages = _with_system(rec, parse_messages(rec, "prompt", items=items))
        return [(_ends_with_reply(rec, "completion", messages), _label(rec))]
    return [(_prompt_from_text(rec, "prompt") + [{"role": "assistant", "content": _reply(rec, "completion")}],
             _label(rec))]


def unpaired_converter(first: Record, fmt: str | None) -> Callable[[Record], list[Labelled]]:
    """KTO records ``{messages, label}`` / ``{prompt, completion, label}``, or any pair format split into a
    desirable chosen and an undesirable rejected sample (as TRL's ``unpair_preference_dataset``)."""
    keys = first.data
    if "label" in keys and "messages" in keys:
        return _kto_messages
    if "label" in keys and "completion" in keys:
        return _kto_prompt_completion
    pairs = reward_converter(first, fmt)

    def convert(rec: Record) -> list[Labelled]:
        return [item for chosen, rejected in pairs(rec) for item in ((chosen, True), (rejected, False))]
    return convert


# ---------------------------------------------------------------- prompts

PROMPT_KEYS = ("messages", "conversations", "prompt", "instruction", "question", "text", "source")
RESERVED = ("input_ids", "attention_mask", "prompt", "prompts")


def prompt_conversation(rec: Record) -> tuple[Conversation, dict]:
    """The prompt conversation of a record and its extras (the other scalar fields)."""
    key = next((k for k in PROMPT_KEYS if rec.data.get(k) is not None), None)
    if key is None:
        raise _unknown(rec, "prompt", f"one of the fields {list(PROMPT_KEYS)}")
    used = {key}
    if key in ("messages", "conversations"):
        messages = _with_system(rec, parse_messages(rec, key, check_responses=False))
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise rec.error(key, "no user turn to prompt with")
        conv, used = Conversation(messages=messages), used | {"system"}
    elif key == "prompt":
        conv = Conversation(messages=_prompt_from_text(rec, "prompt"))
    elif key == "instruction":
        conv = Conversation(messages=alpaca_prompt(rec, input_fallback=True))
        used |= {"input", "system", "history", "instances"}
    elif key == "source":
        text = require_text(rec, "source", get_field(rec, "source"), "prompt")
        conv = Conversation(raw=[(text, False)])
    else:
        text = require_text(rec, key, get_field(rec, key), "prompt")
        conv = Conversation(messages=[{"role": "user", "content": text}])
    extras = {k: v for k, v in rec.data.items()
              if k not in used and k not in RESERVED and isinstance(v, SCALARS)}
    return conv, extras
