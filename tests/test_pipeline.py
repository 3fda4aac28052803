"""The main job at reduced size: SFT -> RM -> PPO on the built-in arithmetic task, with its table asserted."""
import json
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coati.models import RewardModel
from coati.pipeline.run import main
from coati.pipeline.task import ArithmeticTask


# The quick preset's SFT policy answers a few held-out questions right by a thin margin (the tens digit at p ~0.6)
# and its reward model (2400 steps) still ranks about 3% of held-out pairs wrongly, so an RL or DPO stage may flip up
# to 7 of the 200 greedy answers there (seed 0: PPO 199 -> 193, GRPO 199 -> 197). The default run's reward model ranks every held-out pair right and PPO keeps
# every greedy answer (README's table); the quick run cannot afford that reward model's 4800 steps in the suite.
QUICK_GREEDY_SLACK = 0.035


def test_preference_pairs_check_every_digit_of_every_question():
    """A reward model that rarely sees a wrong tens digit ranks one above the right answer on about a quarter of
    the questions, and PPO learns to answer it; so every question's pairs hold a slip, a wrong tens digit and a
    malformed answer."""
    task = ArithmeticTask()
    questions = task.questions()[:200]
    records = task.preference_records(questions, 3, random.Random(0))
    kinds: dict[str, set[str]] = {}
    for r in records:
        right, wrong = r["chosen"], r["rejected"]
        assert right == task.answer(task.parse(r["prompt"])) and wrong != right
        off = abs(int(wrong) - int(right))
        kind = ("malformed" if len(wrong) != len(right) else "slip" if off <= 2 else
                "tens" if off in (10, 20) else "?")
        kinds.setdefault(r["prompt"], set()).add(kind)
    assert len(kinds) == len(questions)
    assert all(k == {"slip", "tens", "malformed"} for k in kinds.values())


def test_quick_pipeline_learns_and_ppo_improves(tmp_path):
    summary = main(["--quick", "--output_dir", str(tmp_path), "--seed", "0", "--threads", "1"])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ("sft_accuracy", "sft_accuracy_greedy", "rm_accuracy", "ppo_accuracy", "ppo_accuracy_greedy",
                "ppo_reward_start", "ppo_reward_end"):
        assert on_disk[key] == summary[key]
    # Sums of two numbers: guessing gets a few percent; the SFT policy learned the task but from noisy demos.
    assert summary["sft_accuracy"] > 0.3
    assert summary["rm_accuracy"] > 0.7
    # PPO against the reward model raises reward and the exactly-checked accuracy of sampled answers. Greedy
    # answers: see QUICK_GREEDY_SLACK (a reward-model hole or a KL too weak for the reward's scale shows here first).
    assert summary["ppo_reward_end"] > summary["ppo_reward_start"]
    assert summary["ppo_accuracy"] > summary["sft_accuracy"]
    assert summary["ppo_accuracy_greedy"] >= summary["sft_accuracy_greedy"] - QUICK_GREEDY_SLACK
    # Saved models are plain transformers dirs.
    ppo_dir = summary["models"]["ppo"]
    tok = AutoTokenizer.from_pretrained(ppo_dir)
    model = AutoModelForCausalLM.from_pretrained(ppo_dir)
    ids = torch.tensor([tok("12+7=", add_special_tokens=False).input_ids])
    assert model(ids).logits.shape[-1] == len(tok)
    rm = RewardModel.from_pretrained(str(tmp_path / "rm"))
    assert rm(ids, attention_mask=torch.ones_like(ids)).shape == (1,)
