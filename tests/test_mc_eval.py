"""First-token multiple-choice evaluation (coati.eval.mc, examples/colossal_llama/eval_mc.py)."""
from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from coati.dataset import pad_sequences
from coati.eval import LETTERS, answer_token_ids, build_prompt, evaluate_mc, load_mc_items
from coati.eval.mc import MCItem, _encode
from coati.models import Actor, position_ids_from_mask
from tests import tiny
from tests.scripts import load_script

FACTS = [("Which colour is the sky?", ("red", "blue", "green", "black"), "B"),
         ("How many legs has a cat?", ("four", "two", "six", "eight"), "A"),
         ("Which is a fruit?", ("stone", "chair", "road", "apple"), "D"),
         ("What do fish live in?", ("sand", "fire", "water", "air"), "C")]


def _items(subject: str) -> list[MCItem]:
    return [MCItem(subject, q, c, a) for q, c, a in FACTS]


@pytest.fixture(scope="module")
def tok(shared_data):
    return tiny.tokenizer("llama")


@pytest.fixture(scope="module")
def trained(tok):
    """A tiny LLaMA trained to answer the FACTS (in two subjects' prompts)."""
    torch.manual_seed(0)
    model = Actor(AutoModelForCausalLM.from_config(tiny.llama_config()))
    items = _items("nature") + _items("common_sense")
    letters = answer_token_ids(tok)
    ids, mask = pad_sequences([torch.tensor(_encode(tok, build_prompt(it))) for it in items], 0, side="left")
    targets = torch.tensor([letters[it.answer][0] for it in items])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    positions = position_ids_from_mask(mask)
    for _ in range(30):
        last = model.base_lm(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
        loss = torch.nn.functional.cross_entropy(last[:, -1], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), items


def test_answer_tokens_are_both_spellings(llama2_tokenizer):
    """On LLaMA-2's vocabulary, where both "▁A" and "A" are pieces."""
    tok = llama2_tokenizer
    ids = answer_token_ids(tok)
    assert ids == {x: sorted({tok.convert_tokens_to_ids("▁" + x), tok.convert_tokens_to_ids(x)}) for x in LETTERS}


def test_known_answers_score_one_and_match_a_hand_count(trained, tok):
    model, items = trained
    report = evaluate_mc(model, tok, items, batch_size=3, max_new_tokens=2)
    assert report["overall"] == {"n": 8, "first_token": 1.0, "combined": 1.0}
    assert set(report["subjects"]) == {"nature", "common_sense"}
    # the batched (left-padded) scores are the unpadded ones
    letters = answer_token_ids(tok)
    for it, row in zip(items[:3], report["items"]):
        with torch.no_grad():
            last = model(torch.tensor([_encode(tok, build_prompt(it))]))[0, -1]
        by_hand = [max(float(last[i]) for i in letters[x]) for x in LETTERS]
        assert row["scores"] == pytest.approx(by_hand, abs=1e-4)
        assert row["first_token"] == LETTERS[by_hand.index(max(by_hand))]


def test_random_letters_score_about_a_quarter_and_metrics_are_a_hand_count(tok):
    torch.manual_seed(1)
    model = Actor(AutoModelForCausalLM.from_config(tiny.llama_config())).eval()
    rng = random.Random(0)
    items = [MCItem(f"s{i % 3}", f"Question {i}: pick one.", ("w", "x", "y", "z"), rng.choice(LETTERS))
             for i in range(160)]
    report = evaluate_mc(model, tok, items, batch_size=32, combined=False)
    assert 0.15 <= report["overall"]["first_token"] <= 0.35
    for subject, acc in report["subjects"].items():
        rows = [r for r in report["items"] if r["subject"] == subject]
        assert acc["n"] == len(rows)
        assert acc["first_token"] == sum(r["first_token"] == r["answer"] for r in rows) / len(rows)
        assert acc["combined"] == sum(r["first_token"] == r["answer"] or r["generated"] == r["answer"]
                                      for r in rows) / len(rows)


def test_files_k_shot_prompt_and_script(trained, tmp_path):
    model, _ = trained
    (tmp_path / "test").mkdir()
    (tmp_path / "dev").mkdir()
    rows = [{"question": q, **dict(zip(LETTERS, c)), "answer": a} for q, c, a in FACTS]
    (tmp_path / "test" / "nature_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev" / "nature_dev.csv").write_text("".join(f"{q},{','.join(c)},{a}\n" for q, c, a in FACTS[:2]))
    dev = load_mc_items(tmp_path / "dev")
    assert [d.subject for d in dev] == ["nature", "nature"] and dev[1].answer == "A"
    prompt = build_prompt(load_mc_items(tmp_path / "test")[2], dev)
    assert prompt.startswith("The following are multiple choice questions (with answers) about nature.\n\n"
                             "Which colour is the sky?\nA. red\nB. blue\nC. green\nD. black\nAnswer: B\n\n")
    assert prompt.endswith("Which is a fruit?\nA. stone\nB. chair\nC. road\nD. apple\nAnswer:")
    tok = tiny.tokenizer("llama")
    model.base_lm.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    report = load_script("examples/colossal_llama/eval_mc.py").main([
        "--model_path", str(tmp_path / "model"), "--data", str(tmp_path / "test"), "--k_shot", "0",
        "--output", str(tmp_path / "report.json")])
    assert report["overall"]["first_token"] == 1.0
    assert json.loads((tmp_path / "report.json").read_text())["subjects"]["nature"]["n"] == 4
