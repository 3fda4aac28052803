"""Built-in verifiable rewards: GSM8K answer matching and the final-answer format reward."""
import json

import pytest

from coati import rewards


@pytest.mark.parametrize("response, answer, expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "... #### 18", 1.0),
    ("so the profit is 70,000 dollars", "#### 70000", 1.0),
    ("#### 3.50", "#### 3.5", 1.0),
    ("18? No: the answer is 17.", "#### 18", 0.0),  # the last number counts without a marker
    ("#### 18\nwait, 19", "#### 19", 0.0),          # the marker wins over later numbers
    ("#### -4", "-4", 1.0),
    ("no number here", "#### 5", 0.0),
])
def test_gsm8k_matches_numerically(response, answer, expected):
    assert rewards.gsm8k(["q"], [response], answer=[answer]) == [expected]


def test_gsm8k_needs_the_answer_field():
    with pytest.raises(ValueError, match="answer"):
        rewards.gsm8k(["q"], ["#### 1"])


def test_format_reward():
    assert rewards.format(["q"] * 4, ["x\n#### 12", "#### 1,200.", "12", "#### twelve"]) == [1.0, 1.0, 0.0, 0.0]


def test_gsm8k_scores_every_reference_solution_right_and_an_off_by_one_wrong(shared_data):
    rows = [json.loads(line) for line in (shared_data / "eval" / "gsm8k_test.jsonl").read_text().splitlines()]
    answers = [r["answer"] for r in rows]
    assert rewards.gsm8k([r["question"] for r in rows], answers, answer=answers) == [1.0] * len(rows)
    wrong = [a.rsplit("####", 1)[0] + f"#### {rewards.extract_answer(a) + 1:g}" for a in answers]
    assert sum(rewards.gsm8k([""] * len(rows), wrong, answer=answers)) == 0.0
    assert sum(rewards.format([""] * len(rows), answers)) == len(rows)
