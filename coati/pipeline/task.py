"""The pipeline's built-in task: two-number addition whose answers are checked exactly.

Questions are ``"23+45="`` with both numbers in ``[low, high]`` (default 10..49, so every prompt and answer
has the same layout and a tiny model learns it in a minute). The story RLHF tells here:

* **imperfect demonstrations**: a share ``slip_rate`` of the SFT answers has a slipped last digit (off by 1
  or 2), so the SFT policy sampled at temperature 1 is right only about 70% of the time;
* **preferences**: pairs (correct answer, wrong answer) teach a reward model to check answers. Each
  question's wrong answers are in turn a slip, a wrong tens digit and a malformed answer (a digit dropped
  or added): a reward model checks only the kinds of error it was shown, and PPO finds the holes quickly
  (reward hacking). With slips in 60% of the pairs and a wrong tens digit in 15%, the reward model ranked
  the answer +-10 above the right one on 20-27% of the questions, and PPO taught the policy to answer
  "39" to "13+16=";
* **PPO** against that reward model moves the policy's probability mass onto the correct answers.

Everything is generated from a seed; held-out questions never appear in SFT, reward or PPO data.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

Question = tuple[int, int]
_PROMPT = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")
# The wrong answers a preference pair rejects (see ArithmeticTask.rejected).
WRONG_KINDS = ("slip", "tens", "malformed")


@dataclass(frozen=True)
class ArithmeticTask:
    """Addition questions, the correct answer, and the demonstrators' typical slips."""

    low: int = 10
    high: int = 49
    slip_rate: float = 0.3
    slips: tuple[int, ...] = (-2, -1, 1, 2)

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high:
            raise ValueError(f"need 0 <= low <= high, got {self.low}..{self.high}")
        if not 0.0 <= self.slip_rate < 1.0:
            raise ValueError(f"slip_rate must be in [0, 1), got {self.slip_rate}")
        if not self.slips or 0 in self.slips:
            raise ValueError(f"slips must be non-zero offsets, got {self.slips}")

    # ----- questions and answers ------------------------------------------------------------------
    def questions(self) -> list[Question]:
        span = range(self.low, self.high + 1)
        return [(a, b) for a in span for b in span]

    def split(self, seed: int, num_eval: int) -> tuple[list[Question], list[Question]]:
        """Seeded ``(train, held_out)`` split of every question."""
        qs = self.questions()
        if not 0 < num_eval < len(qs):
            raise ValueError(f"num_eval must be in 1..{len(qs) - 1} for {len(qs)} questions, got {num_eval}")
        random.Random(seed).shuffle(qs)
        return qs[num_eval:], qs[:num_eval]

    @staticmethod
    def prompt(q: Question) -> str:
        return f"{q[0]}+{q[1]}="

    @staticmethod
    def answer(q: Question) -> str:
        return str(q[0] + q[1])

    def slipped(self, q: Question, rng: random.Random) -> str:
        """A wrong answer of the kind the demonstrators write: the right sum off by a small amount."""
        right = q[0] + q[1]
        offsets = [d for d in self.slips if right + d >= 0]
        return str(right + rng.choice(offsets))

    def rejected(self, q: Question, rng: random.Random, kind: str) -> str:
        """A wrong answer of one of :data:`WRONG_KINDS`: ``slip`` (last digit off by 1 or 2), ``tens`` (tens
        digit off: the sum +-10 or +-20; a slip for a one-digit sum) or ``malformed`` (a digit dropped or
        added)."""
        right = self.answer(q)
        if kind == "slip":
            return self.slipped(q, rng)
        if kind == "tens":  # the same number of digits, so only the tens digit differs
            offsets = [d for d in (-20, -10, 10, 20) if 0 <= int(right) + d and len(str(int(right) + d)) == len(right)]
            return str(int(right) + rng.choice(offsets)) if offsets else self.slipped(q, rng)
        if kind != "malformed":
            raise ValueError(f"kind must be one of {WRONG_KINDS}, got {kind!r}")
        if len(right) > 1 and rng.random() < 0.5:
            cut = rng.choice([right[:-1], right[-1:]])
            if cut != right:
                return cut
        return right + str(rng.randrange(10))

    @staticmethod
    def parse(prompt: str) -> Question | None:
        """The question in a prompt text, or None when the text is not one."""
        m = _PROMPT.match(prompt)
        return (int(m.group(1)), int(m.group(2))) if m else None

    @classmethod
    def is_correct(cls, prompt: str, response: str) -> bool:
        """Exact check: the response (surrounding spaces ignored) is the sum the prompt asks for."""
        q = cls.parse(prompt)
        return q is not None and response.strip() == cls.answer(q)

    # ----- records in coati's dataset formats ----------------------------------------------------------
    def sft_records(self, questions: Sequence[Question], per_question: int, rng: random.Random) -> list[dict]:
        """Alpaca-style ``{instruction, output}`` demonstrations, ``slip_rate`` of them wrong, shuffled."""
        out = []
        for q in questions:
            for _ in range(per_question):
                wrong = rng.random() < self.slip_rate
                out.append({"instruction": self.prompt(q),
                            "output": self.slipped(q, rng) if wrong else self.answer(q)})
        rng.shuffle(out)
        return out

    def preference_records(self, questions: Sequence[Question], per_question: int,
                           rng: random.Random) -> list[dict]:
        """rm-static ``{prompt, chosen, rejected}`` pairs: the correct answer against distinct wrong ones.

        Each question's wrong answers take the kinds of :data:`WRONG_KINDS` in turn (from a random start), so
        ``per_question >= 3`` checks every digit of every question's answer. A reward model trained mostly on
        slips checks only the last digit and ranks a wrong tens digit above the right answer on about a
        quarter of the questions, which PPO then learns to answer."""
        out = []
        for q in questions:
            wrongs: list[str] = []
            start = rng.randrange(len(WRONG_KINDS))
            for i in range(per_question):
                kind = WRONG_KINDS[(start + i) % len(WRONG_KINDS)]
                w = self.rejected(q, rng, kind)
                for _ in range(10):  # prefer a wrong answer this question has not used yet
                    if w not in wrongs:
                        break
                    w = self.rejected(q, rng, kind)
                wrongs.append(w)
                out.append({"prompt": self.prompt(q), "chosen": self.answer(q), "rejected": w})
        rng.shuffle(out)
        return out

    def prompt_records(self, questions: Sequence[Question]) -> list[dict]:
        """PPO prompts ``{prompt, answer}``; ``answer`` reaches Python reward functions as an extra field."""
        return [{"prompt": self.prompt(q), "answer": self.answer(q)} for q in questions]


def exact_match_reward(prompts: list[str], responses: list[str], answer: list[Any] | None = None,
                       **_: Any) -> list[float]:
    """A Python reward for ``train_prompts.py --reward_fn coati.pipeline.task:exact_match_reward``: 1.0 for a
    correct sum, 0.0 otherwise (uses the prompt records' ``answer`` field when given, else the prompt)."""
    answers = answer if answer is not None else [None] * len(prompts)
    return [float(r.strip() == str(a).strip() if a is not None else ArithmeticTask.is_correct(p, r))
            for p, r, a in zip(prompts, responses, answers)]


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(rec) + "\n" for rec in records), encoding="utf-8")
    return path
