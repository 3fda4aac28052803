"""Multiple-choice evaluation scored on the first predicted token (Colossal-LLaMA's MMLU / CMMLU protocol).

Items: JSON lines / JSON arrays ``{question, A, B, C, D, answer[, subject]}`` or CSV rows (MMLU's header-less
``question,A,B,C,D,answer`` or a header naming those columns); a file's subject defaults to its name. The
prompt is MMLU's: a header naming the subject, ``k`` exemplars of that subject from the dev split (with their
answers), then the question and ``Answer:``.

* first-token metric: one forward pass; the answer is the letter whose token scores the highest logit at the
  next position, each letter counting both its spellings (``"A"`` and ``" A"``: SentencePiece and byte-level
  BPE tokenizers put the space in different places);
* combined metric: an item counts as correct when the greedily generated answer's first letter A-D matches,
  or, failing that, when the first-token answer does.

Why not lm-eval: its MMLU tasks rank each choice's log-likelihood (for one-token letters, the first-token
metric) but have no combined metric nor the two-spellings rule, need a task YAML per local dataset and bring a
large dependency tree; this module reuses coati's model loading and padding rules.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..dataset.collators import pad_sequences
from ..errors import MissingInputError, UsageError

LETTERS = ("A", "B", "C", "D")
_LETTER_RE = re.compile(r"[ABCD]")


@dataclass(frozen=True)
class MCItem:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str


def _item(row: dict, subject: str, where: str) -> MCItem:
    missing = [k for k in ("question", *LETTERS, "answer") if k not in row]
    if missing:
        raise UsageError(f"{where}: missing field(s) {missing} (expected question, A, B, C, D, answer)")
    answer = str(row["answer"]).strip().upper()
    if answer not in LETTERS:
        raise UsageError(f"{where}: answer {row['answer']!r} is not one of A, B, C, D")
    return MCItem(str(row.get("subject") or subject), str(row["question"]),
                  tuple(str(row[k]) for k in LETTERS), answer)


def _read_file(path: Path) -> list[MCItem]:
    subject = path.stem.removesuffix("_test").removesuffix("_dev").removesuffix("_val")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        rows = list(csv.reader(text.splitlines()))
        fields = ("question", *LETTERS, "answer")
        header = [c.strip() for c in rows[0]] if rows else []
        if set(fields) <= set(header):
            rows = [dict(zip(header, r)) for r in rows[1:]]
        else:
            rows = [dict(zip(fields, r[-6:])) for r in rows if len(r) >= 6]
    elif text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [_item(r, subject, f"{path}, item {i + 1}") for i, r in enumerate(rows)]


def load_mc_items(source: str | Path) -> list[MCItem]:
    """Items of a file, or of every ``.jsonl`` / ``.json`` / ``.csv`` file in a dir (sorted)."""
    path = Path(source)
    if not path.exists():
        raise MissingInputError(f"{path}: no such multiple-choice data file or dir")
    files = sorted(f for f in path.rglob("*") if f.suffix in (".jsonl", ".json", ".csv")) if path.is_dir() else [path]
    items = [item for f in files for item in _read_file(f)]
    if not items:
        raise UsageError(f"{path}: no multiple-choice items")
    return items


def _block(item: MCItem, with_answer: bool) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, item.choices))
    return f"{item.question}{options}\nAnswer:" + (f" {item.answer}\n\n" if with_answer else "")


def build_prompt(item: MCItem, shots: Sequence[MCItem] = ()) -> str:
    """MMLU's prompt: subject header, exemplars with answers, then the question ending in ``Answer:``."""
    header = f"The following are multiple choice questions (with answers) about {item.subject.replace('_', ' ')}.\n\n"
    return header + "".join(_block(s, True) for s in shots) + _block(item, False)


def answer_token_ids(tokenizer) -> dict[str, list[int]]:
    """For each letter, the first token the tokenizer adds after ``Answer:`` for ``" X"`` and for ``"X"``."""
    context = "Answer:"
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids: dict[str, list[int]] = {}
    for letter in LETTERS:
        found = []
        for text in (f" {letter}", letter):
            full = tokenizer(context + text, add_special_tokens=False)["input_ids"]
            if full[: len(base)] == base and len(full) > len(base):
                found.append(full[len(base)])
        if not found:
            raise UsageError(f"the tokenizer gives no token for the answer letter {letter!r} after {context!r}")
        ids[letter] = sorted(set(found))
    return ids


def _encode(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and bos != tokenizer.eos_token_id:
        ids = [bos] + ids
    return ids


@torch.no_grad()
def evaluate_mc(model, tokenizer, items: Sequence[MCItem], *, dev: Sequence[MCItem] = (), k_shot: int = 0,
                batch_size: int = 8, combined: bool = True, max_new_tokens: int = 4,
                device: str | torch.device = "cpu") -> dict[str, Any]:
    """Score ``items`` with an Actor; returns per-item predictions and per-subject / overall accuracies."""
    model.eval()
    letter_ids = answer_token_ids(tokenizer)
    shots_by_subject: dict[str, list[MCItem]] = {}
    for item in dev:
        shots_by_subject.setdefault(item.subject, []).append(item)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    for start in range(0, len(items), batch_size):
        batch = items[start: start + batch_size]
        prompts = [_encode(tokenizer, build_prompt(it, shots_by_subject.get(it.subject, [])[:k_shot]))
                   for it in batch]
        ids, mask = pad_sequences([torch.tensor(p) for p in prompts], pad, side="left")
        ids, mask = ids.to(device), mask.to(device)
        last = model(ids, attention_mask=mask)[:, -1].float()
        scores = torch.stack([last[:, letter_ids[x]].max(-1).values for x in LETTERS], -1)
        first = [LETTERS[i] for i in scores.argmax(-1).tolist()]
        generated: list[str | None] = [None] * len(batch)
        if combined:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad)
            for i, seq in enumerate(out[:, ids.shape[1]:]):
                match = _LETTER_RE.search(tokenizer.decode(seq, skip_special_tokens=True))
                generated[i] = match.group(0) if match else None
        for it, f, g, s in zip(batch, first, generated, scores.tolist()):
            results.append({"subject": it.subject, "answer": it.answer, "first_token": f, "generated": g,
                            "scores": s, "first_token_correct": f == it.answer,
                            "combined_correct": g == it.answer or f == it.answer})
    return {"items": results, **summarize(results)}


def summarize(results: Sequence[dict]) -> dict[str, Any]:
    """Per-subject and overall (micro-averaged) accuracies of both metrics."""
    subjects: dict[str, list[dict]] = {}
    for r in results:
        subjects.setdefault(r["subject"], []).append(r)

    def accuracy(rows: Sequence[dict]) -> dict[str, float]:
        return {"n": len(rows),
                "first_token": sum(r["first_token_correct"] for r in rows) / len(rows),
                "combined": sum(r["combined_correct"] for r in rows) / len(rows)}

    return {"subjects": {s: accuracy(rows) for s, rows in sorted(subjects.items())},
            "overall": accuracy(results)}


def format_table(report: dict[str, Any]) -> str:
    lines = ["| subject | n | first-token | combined |", "| --- | --- | --- | --- |"]
    for name, acc in [*report["subjects"].items(), ("overall", report["overall"])]:
        lines.append(f"| {name} | {acc['n']} | {acc['first_token']:.4f} | {acc['combined']:.4f} |")
    return "\n".join(lines)
