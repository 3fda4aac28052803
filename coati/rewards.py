"""Reward functions for ``--reward_fn``: the contract, and the built-in verifiable rewards
(``coati.rewards:gsm8k``, ``coati.rewards:format``).

A reward function is called as ``f(prompts, responses, **record_fields) -> list[float]`` (one float per
response), the record fields being the prompt dataset's other columns as lists (GSM8K's ``answer``). Two
properties of the function say how it is called, and the experience maker reads both:

* **batch or group**: by default it gets a whole rollout batch at once. Decorated with :func:`per_group` (which
  sets ``fn.reward_per_group = True``) it is called once per group: the ``n_samples_per_prompt`` responses of
  one prompt (``prompts`` and every record field then hold that prompt's entry ``n`` times), and returns their
  ``n`` floats, so it can compare the samples of a prompt (rank them, reward the shortest correct one...).
* **sync or async**: an ``async def`` function is awaited; the calls of one batch (one per group, or the one
  batch call) run concurrently on one event loop (``asyncio.gather``), so a reward that waits on a sandbox or a
  judge server does not wait group after group.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import re
from typing import Any, Callable, Sequence

RewardFn = Callable[..., Any]


def per_group(fn: RewardFn) -> RewardFn:
    """Mark ``fn`` as a group reward: called once per prompt with that prompt's samples (see the module doc)."""
    fn.reward_per_group = True
    return fn


def _slice(value: Any, start: int, stop: int) -> Any:
    return value[start:stop] if hasattr(value, "__getitem__") and not isinstance(value, (str, bytes)) else value


def _run(coroutine: Any) -> Any:
    """``asyncio.run``, also where this thread already runs an event loop (a Jupyter notebook), which
    ``asyncio.run`` refuses: then the coroutine gets a loop of its own in a worker thread (so a reward should
    open its clients, sessions and locks inside the call, not bind them to the notebook's loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def call_reward_fn(fn: RewardFn, prompts: Sequence[str], responses: Sequence[str], group_size: int = 1,
                   **fields: Any) -> list[float]:
    """Score ``responses`` (consecutive runs of ``group_size`` answer one prompt) with ``fn`` as its kind asks:
    one batch call or one call per group, sync or async (the calls of the batch gathered). Checks that every call
    returns one number per response it was given."""
    if getattr(fn, "reward_per_group", False):
        bounds = [(i, min(i + group_size, len(responses))) for i in range(0, len(responses), max(1, group_size))]
    else:
        bounds = [(0, len(responses))]
    calls = [(fn(list(prompts[a:b]), list(responses[a:b]), **{k: _slice(v, a, b) for k, v in fields.items()}),
              b - a) for a, b in bounds]
    if any(inspect.isawaitable(c) for c, _ in calls):  # async def (or a callable returning awaitables)
        async def gather() -> list:
            return await asyncio.gather(*(c for c, _ in calls))

        results = _run(gather())
    else:
        results = [c for c, _ in calls]
    scores: list[float] = []
    for result, (_, n) in zip(results, calls):
        result = list(result)
        if len(result) != n:
            raise ValueError(f"reward_fn returned {len(result)} scores for {n} responses")
        scores += [float(x) for x in result]
    return scores

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
