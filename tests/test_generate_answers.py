"""inference/generate_answers.py: batched answers equal one-by-one greedy `generate` on the training template's
prompt, an interrupted run resumes without duplicates, and the JSON lines and CSV outputs agree."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coati.dataset.io import DatasetFormatError
from coati.errors import UsageError
from coati.inference.generation import encode_chat
from tests import tiny
from tests.scripts import load_script

ga = load_script("inference/generate_answers.py")
MAX_NEW = 8


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory) -> Path:
    """A tiny fp32 LLaMA whose tokenizer has a chat template (EOS closes every turn)."""
    path = tiny.save_tiny_model("llama", tmp_path_factory.mktemp("chat_llama"))
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = tiny.CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ref(chat_model_dir):
    return AutoModelForCausalLM.from_pretrained(chat_model_dir).eval(), AutoTokenizer.from_pretrained(chat_model_dir)


def _head(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return dst


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _run(model_dir: Path, questions: Path, out: Path, *extra: str) -> list[dict]:
    return ga.main(["--model_path", str(model_dir), "--question_file", str(questions), "--output_file", str(out),
                    "--dtype", "fp32", "--device", "cpu", "--max_new_tokens", str(MAX_NEW), *extra])


def _alone(model, tok, messages: list[dict]) -> tuple[list[int], str, bool]:
    """The reference: this one prompt, unpadded, plain greedy `generate`, cut at EOS (and whether it met EOS)."""
    ids = encode_chat(messages, tok, "auto")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, len(ids):].tolist()
    stopped = tok.eos_token_id in new
    new = new[: new.index(tok.eos_token_id)] if stopped else new
    return ids, tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False), stopped


def _expected(name: str, rec: dict) -> tuple[object, str, list[dict]]:
    """(id, question text, prompt messages) of a record of the real prompt files, read here on their own terms."""
    if name == "vicuna_question_80.jsonl":
        return rec["question_id"], rec["text"], [{"role": "user", "content": rec["text"]}]
    inp = rec["instances"][0]["input"]
    return (rec["id"], f"{rec['instruction']}\n\n{inp}" if inp else rec["instruction"],
            [{"role": "user", "content": rec["instruction"], "input": inp}])


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _assert_csv_matches_jsonl(out: Path) -> None:
    rows, table = _jsonl(out), _csv_rows(out.with_suffix(".csv"))
    assert len(table) == len(rows)
    for row, line in zip(rows, table):
        assert {**line, "settings": json.loads(line["settings"])} == {
            **{k: str(v) for k, v in row.items() if k != "settings"}, "settings": row["settings"]}


@pytest.mark.parametrize("name", ["vicuna_question_80.jsonl", "user_oriented_instructions.jsonl"])
def test_batched_answers_equal_one_by_one_greedy_generate(name, shared_data, chat_model_dir, ref, tmp_path):
    model, tok = ref
    questions = _head(shared_data / "prompts" / name, tmp_path / name, 6)
    out = tmp_path / "answers" / "model.jsonl"
    returned = _run(chat_model_dir, questions, out, "--batch_size", "4")
    rows = _jsonl(out)
    assert returned == rows and len(rows) == 6

    records = [json.loads(line) for line in questions.read_text(encoding="utf-8").splitlines()]
    prompts = []
    for rec, row in zip(records, rows):
        qid, text, messages = _expected(name, rec)
        ids, answer, stopped = _alone(model, tok, messages)
        prompts.append(ids)
        assert (row["question_id"], row["question"], row["answer"]) == (qid, text, answer)
        assert row["model"] == chat_model_dir.name
        assert row["finish_reason"] == ("stop" if stopped else "length")
        assert row["settings"]["max_new_tokens"] == MAX_NEW and row["settings"]["temperature"] == 0.0
    assert "<|assistant|>" in tok.decode(prompts[0])  # the chat template, as SFT rendered it
    assert len({len(p) for p in prompts[:4]}) > 1  # the first batch was left padded
    assert len({r["answer"] for r in rows}) > 1 and any(r["answer"] for r in rows)  # answers that can differ
    _assert_csv_matches_jsonl(out)


def test_rerun_after_interruption_adds_only_missing_ids(shared_data, chat_model_dir, tmp_path, monkeypatch):
    questions = _head(shared_data / "prompts" / "vicuna_question_80.jsonl", tmp_path / "q.jsonl", 7)
    want_ids = [json.loads(line)["question_id"] for line in questions.read_text().splitlines()]
    out = tmp_path / "model.jsonl"
    _run(chat_model_dir, questions, out, "--batch_size", "3")
    full = _jsonl(out)
    assert [r["question_id"] for r in full] == want_ids

    # killed while writing the fifth line, before the CSV caught up
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2], encoding="utf-8")
    out.with_suffix(".csv").write_text("question_id,question\n1,stale\n")
    new = _run(chat_model_dir, questions, out, "--batch_size", "2")
    assert [r["question_id"] for r in new] == want_ids[4:]
    assert _jsonl(out) == full  # every id once, the same greedy answers in other batches
    _assert_csv_matches_jsonl(out)

    # nothing left to do: no model loads, the files stay as they are
    before = (out.read_bytes(), out.with_suffix(".csv").read_bytes())
    monkeypatch.setattr(ga, "load_from_args", lambda args: pytest.fail("loaded a model with nothing to answer"))
    assert _run(chat_model_dir, questions, out) == []
    assert (out.read_bytes(), out.with_suffix(".csv").read_bytes()) == before

    # one file holds one model's answers with one set of settings
    with pytest.raises(UsageError, match=r"line 1: field 'settings': answered with max_new_tokens=8; this run asks "
                                         r"for max_new_tokens=9"):
        _run(chat_model_dir, questions, out, "--max_new_tokens", "9")
    with pytest.raises(UsageError, match=r"field 'model': answered with model=\"chat_llama\d*\"; this run asks for "
                                         r"model=\"other\""):
        _run(chat_model_dir, questions, out, "--model_name", "other")
    assert out.read_bytes() == before[0]


@pytest.mark.parametrize("records, flags, message", [
    ([{"question_id": 1, "text": "Hi"}, {"question_id": 1, "text": "Yo"}], [],
     "line 2: field 'question_id': duplicate question id 1 (first at line 1)"),
    ([{"text": "Hi"}, {"question": "  "}], [], "line 2: field 'question': empty prompt"),
    ([{"key": "a", "text": "Hi"}, {"text": "Yo"}], ["--id_field", "key"], "line 2: field 'key': missing"),
])
def test_bad_questions_are_refused_before_any_model_loads(records, flags, message, tmp_path, monkeypatch):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(ga, "load_from_args", lambda args: pytest.fail("loaded a model before checking the data"))
    with pytest.raises(DatasetFormatError) as err:
        _run(tmp_path / "no_model", questions, tmp_path / "out.jsonl", *flags)
    assert str(err.value).startswith(f"{questions}: {message}")
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.csv").exists()
