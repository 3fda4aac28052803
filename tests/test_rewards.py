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


# ----- how a reward function is called: per batch or per group, sync or async -----------------------------
def test_a_batch_function_gets_the_whole_batch_once():
    calls = []

    def lengths(prompts, responses, answer=None):
        calls.append((list(prompts), list(responses), list(answer)))
        return [len(r) for r in responses]

    got = rewards.call_reward_fn(lengths, ["p", "p", "q", "q"], ["a", "bbb", "cc", ""], 2, answer=["1", "1", "2", "2"])
    assert got == [1.0, 3.0, 2.0, 0.0]
    assert calls == [(["p", "p", "q", "q"], ["a", "bbb", "cc", ""], ["1", "1", "2", "2"])]


def test_a_group_function_is_called_once_per_prompt_with_its_samples():
    calls = []

    @rewards.per_group
    def shortest_correct(prompts, responses, answer=None):
        """1 for the shortest response of the group that contains the answer, 0.5 for other correct ones."""
        calls.append((list(prompts), list(answer)))
        correct = [len(r) if a in r else None for r, a in zip(responses, answer)]
        best = min((n for n in correct if n is not None), default=None)
        return [0.0 if n is None else 1.0 if n == best else 0.5 for n in correct]

    assert shortest_correct.reward_per_group is True
    responses = ["it is 4", "4", "5", "six", "6", "the answer: 6"]
    got = rewards.call_reward_fn(shortest_correct, ["a"] * 3 + ["b"] * 3, responses, 3, answer=["4"] * 3 + ["6"] * 3)
    assert got == [0.5, 1.0, 0.0, 0.0, 1.0, 0.5]
    assert calls == [(["a"] * 3, ["4"] * 3), (["b"] * 3, ["6"] * 3)]


def test_async_group_calls_of_a_batch_run_concurrently():
    import asyncio

    started, groups = [], 3

    @rewards.per_group
    async def judged(prompts, responses, **_):
        started.append(prompts[0])
        # every group's call waits until all have started: run one after another this would never finish
        for _ in range(100):
            if len(started) == groups:
                break
            await asyncio.sleep(0.01)
        assert len(started) == groups, "group calls were not awaited concurrently"
        return [float(r == "yes") for r in responses]

    got = rewards.call_reward_fn(judged, ["a", "a", "b", "b", "c", "c"], ["yes", "no", "no", "no", "yes", "yes"], 2)
    assert got == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0] and started == ["a", "b", "c"]

    async def batch(prompts, responses):
        await asyncio.sleep(0)
        return [0.25] * len(responses)

    assert rewards.call_reward_fn(batch, ["a", "a"], ["x", "y"], 2) == [0.25, 0.25]


def test_an_async_reward_is_awaited_where_an_event_loop_already_runs():
    """A notebook runs its cells inside an event loop, where ``asyncio.run`` refuses to start another."""
    import asyncio

    async def judged(prompts, responses):
        await asyncio.sleep(0)
        return [float(len(r)) for r in responses]

    async def notebook_cell():
        return rewards.call_reward_fn(judged, ["a", "b"], ["xy", "xyz"], 1)

    assert asyncio.run(notebook_cell()) == [2.0, 3.0]


def test_a_wrong_number_of_scores_is_an_error():
    with pytest.raises(ValueError, match="2 scores for 3 responses"):
        rewards.call_reward_fn(rewards.per_group(lambda p, r: [1.0, 1.0]), ["a"] * 6, ["x"] * 6, 3)
