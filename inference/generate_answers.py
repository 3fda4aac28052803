"""Answer a file of questions with a trained coati model, for side-by-side grading of several models.

    python inference/generate_answers.py --model_path MODEL --question_file vicuna_question_80.jsonl \
        --output_file answers/MODEL.jsonl [--batch_size 8] [--max_new_tokens 512] [--temperature 0]

Questions are read as PPO prompt files are (JSON lines, a JSON array, parquet, ...; the question is the
record's first field of messages, conversations, prompt, instruction (+ input), question, text, source) and
rendered with the training template (--prompt_template), then answered in left-padded batches. A question's
id is its --id_field (auto: question_id, else id, else its number in the file, from 1). Each finished batch
is appended to --output_file (JSON lines) and to its CSV twin (same name, .csv), one row per question:
question_id, question, answer, model (the model dir's name, or --model_name), finish_reason (stop / length),
settings (the decoding settings, JSON). Files of several models join on question_id. A rerun with the same
settings skips the ids already answered, so an interrupted run goes on where it stopped; the CSV is rebuilt
from the JSON lines first. Bad input stops with one line naming file, line and field, before any model loads.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from coati import cli  # noqa: E402
from coati.dataset.formats import Conversation, get_field, prompt_conversation  # noqa: E402
from coati.dataset.io import Record, read_records  # noqa: E402
from coati.dataset.templates import SegmentEncoder, user_text  # noqa: E402
from coati.errors import UsageError  # noqa: E402
from coati.inference.generation import Generator, SamplingParams  # noqa: E402
from coati.inference.loading import (add_model_args, add_sampling_args, load_from_args,  # noqa: E402
                                     model_path_from_args)
from coati.utils.config import _HelpFormatter  # noqa: E402

COLUMNS = ("question_id", "question", "answer", "model", "finish_reason", "settings")
AUTO_ID_FIELDS = ("question_id", "id")


class Question(NamedTuple):
    qid: str | int
    text: str
    conv: Conversation


class _Help(argparse.RawDescriptionHelpFormatter, _HelpFormatter):
    """The usage lines above as written, each flag's default and range as every Parser shows them."""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description=__doc__, formatter_class=_Help)
    add_model_args(p, path_flag=True)
    p.add_argument("--question_file", required=True,
                   help="questions: any prompt file coati reads (e.g. vicuna_question_80.jsonl)")
    p.add_argument("--output_file", required=True,
                   help="answers as JSON lines (appended to; the CSV twin is the same name with .csv)")
    p.add_argument("--model_name", default=None, help="the model column (None: the model dir's name)")
    p.add_argument("--id_field", default="auto",
                   help="record field holding the question id; auto = question_id, else id, else the "
                        "question's number in the file (from 1)")
    p.add_argument("--system", default=None, help="system message before each question")
    p.add_argument("--batch_size", type=cli.Bounded(int, ">= 1"), default=8, help="questions per generate call")
    add_sampling_args(p, max_new_tokens=512, temperature=0.0, top_p=1.0, seed=42,
                      seed_help="sampling seed, set before each batch (greedy decoding ignores it)")
    return p


def _question_id(rec: Record, id_field: str, number: int) -> tuple[str | int, str | None]:
    """The id and the field it came from (None: the question's number in the file)."""
    key = next((k for k in AUTO_ID_FIELDS if rec.data.get(k) is not None), None) if id_field == "auto" else id_field
    if key is None:
        return number, None
    qid = get_field(rec, key, (str, int))
    if isinstance(qid, bool):
        raise rec.error(key, "expected a string or an integer, got bool")
    return qid, key


def read_questions(path: str, id_field: str = "auto", system: str | None = None) -> list[Question]:
    """Every question of `path` with its id and prompt conversation; a bad record raises DatasetFormatError."""
    questions: list[Question] = []
    seen: dict[str, Record] = {}
    for number, rec in enumerate(read_records(path), 1):
        conv, _ = prompt_conversation(rec)
        qid, key = _question_id(rec, id_field, number)
        if str(qid) in seen:
            raise rec.error(key, f"duplicate question id {qid!r} (first at {seen[str(qid)].location})")
        seen[str(qid)] = rec
        if conv.raw is not None:
            text = "".join(t for t, _ in conv.raw)
        else:
            text = user_text(next(m for m in reversed(conv.messages) if m["role"] == "user"))
            if system and conv.messages[0]["role"] != "system":
                conv = Conversation(messages=[{"role": "system", "content": system}] + conv.messages)
        questions.append(Question(qid, text, conv))
    return questions


def read_answers(path: Path, model: str, settings: dict) -> list[dict]:
    """The rows already in `path`. A last line cut short (the run was killed while writing it) is dropped from
    the file; rows of another model or other settings are refused, so one file never mixes runs."""
    if not path.exists():
        return []
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            data = data[:data.rfind(b"\n") + 1]
            f.truncate(len(data))
            print(f"{path}: dropped an unfinished last line", file=sys.stderr)
    if not data.strip():
        return []
    rows = []
    for rec in read_records(path):
        get_field(rec, "question_id", (str, int))
        diff = {"model": (rec.data.get("model"), model)} if rec.data.get("model") != model else {}
        had = rec.data.get("settings") if isinstance(rec.data.get("settings"), dict) else {}
        diff.update({k: (had.get(k), v) for k, v in settings.items() if had.get(k) != v})
        if diff:
            raise UsageError(f"{path}: {rec.location}: field '{'model' if 'model' in diff else 'settings'}': "
                             "answered with " + ", ".join(f"{k}={json.dumps(a)}" for k, (a, _) in diff.items())
                             + "; this run asks for " + ", ".join(f"{k}={json.dumps(b)}" for k, (_, b) in diff.items())
                             + "; give another --output_file")
        rows.append(rec.data)
    return rows


def csv_row(row: dict) -> list[Any]:
    return [json.dumps(row[c], sort_keys=True) if c == "settings" else row[c] for c in COLUMNS]


def write_csv(path: Path, rows: list[dict]) -> None:
    """All of `rows` as the CSV at `path`, replaced in one step (a crash leaves the old file or the new)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(csv_row(r) for r in rows)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> list[dict]:
    """Returns the rows this run added."""
    parser = build_parser()
    args = parser.parse_args(argv)
    model_path_from_args(parser, args)
    out = Path(args.output_file)
    csv_path = out.with_suffix(".csv")
    if csv_path == out:
        raise UsageError(f"--output_file {out}: name the JSON lines file (its CSV twin is written beside it "
                         "with .csv)")
    questions = read_questions(args.question_file, args.id_field, args.system)
    model_name = args.model_name or Path(args.model_path).resolve().name
    settings = {k: getattr(args, k) for k in ("prompt_template", "system", "max_new_tokens", "temperature", "top_p",
                                              "top_k", "repetition_penalty", "seed", "dtype", "quant")}
    done = read_answers(out, model_name, settings)
    answered = {str(r["question_id"]) for r in done}
    todo = [q for q in questions if str(q.qid) not in answered]
    model, tokenizer = load_from_args(args) if todo else (None, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(csv_path, done)
    new: list[dict] = []
    if todo:
        from tqdm.auto import tqdm

        gen = Generator(model, tokenizer)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
        prompts = [ids for ids, _ in SegmentEncoder(tokenizer).encode_many(
            [q.conv.segments(tokenizer, args.prompt_template) for q in todo])]
        with open(out, "a", encoding="utf-8") as fj, open(csv_path, "a", newline="", encoding="utf-8") as fc, \
                tqdm(total=len(questions), initial=len(questions) - len(todo), desc="answers", unit="q") as bar:
            writer = csv.writer(fc)
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start:start + args.batch_size]
                completions = gen.generate(prompts[start:start + args.batch_size], params)
                rows = [{"question_id": q.qid, "question": q.text, "answer": c.text, "model": model_name,
                         "finish_reason": c.finish_reason, "settings": settings} for q, c in zip(batch, completions)]
                fj.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))  # whole lines, then sync
                fj.flush()
                os.fsync(fj.fileno())
                writer.writerows(csv_row(r) for r in rows)
                fc.flush()
                new += rows
                bar.update(len(batch))
    print(f"{len(new)} new answers, {len(questions) - len(todo)} already there: {out}, {csv_path}")
    return new


if __name__ == "__main__":
    cli.run(main)
