"""Built-in verifiable rewards for ``--reward_fn`` (``coati.rewards:gsm8k``, ``coati.rewards:format``).

They follow the reward-function contract of the RL stage: ``f(prompts, responses, **record_fields) ->
list[float]``, where the record fields are the prompt dataset's other columns as lists (GSM8K's ``answer``).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"####\s*(-?\$?\d[\d,]*(?:\.\d+)?)\s*\.?\s*$")


def _to_float(text: str) -> float | None:
    try:
        return float(text.replace("$", "").replace(",", ""))
    except ValueError:
        return None


def extract_answer(text: str) -> float | None:
    """The number after the last ``####`` (GSM8K's answer marker), else the last number in the text."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return _to_float(found[0])
    found = _NUMBER.findall(text)
    return _to_float(found[-1]) if found else None


def gsm8k(prompts: Sequence[str], responses: Sequence[str], answer: Sequence[Any] | None = None,
          **_: Any) -> list[float]:
    """1.0 where the response's answer equals the record's ``answer`` numerically (GSM8K's ``#### N``
    solution text or a bare number), else 0.0."""
    if answer is None:
        raise ValueError("coati.rewards:gsm8k needs an 'answer' field in the prompt records")
    scores = []
    for response, gold in zip(responses, answer):
        want = extract_answer(str(gold)) if gold is not None else None
        got = extract_answer(response)
        scores.append(float(want is not None and got is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))))
    return scores


def format(prompts: Sequence[str], responses: Sequence[str], **_: Any) -> list[float]:  # noqa: A001
    """1.0 where the response ends with GSM8K's final-answer line ``#### N``, else 0.0 (a shaping reward to
    add to a correctness reward)."""
    return [float(_FINAL.search(r.strip()) is not None) for r in responses]
