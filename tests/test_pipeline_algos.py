"""The main job with --algo at reduced size: SFT -> GRPO (the task's checker is the reward) and SFT -> DPO (on the
reward model's pairs) raise the exactly-checked accuracy of sampled answers and build no reward model (nor, for
GRPO, a critic), and keep the greedy answers (within the quick preset's slack)."""
import json

import pytest

from coati.errors import UsageError
from coati.models import base
from coati.pipeline.run import main

from .test_pipeline import QUICK_GREEDY_SLACK


@pytest.fixture(scope="module", params=["grpo", "dpo"])
def run(request, tmp_path_factory):
    """One quick run per algorithm; any Critic / RewardModel constructed fails it."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} built")

    algo, out = request.param, tmp_path_factory.mktemp(request.param)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(base._ValueModel, "__init__", refuse)
        summary = main(["--quick", "--algo", algo, "--output_dir", str(out), "--seed", "0", "--threads", "1"])
    return algo, out, summary


def test_quick_algo_raises_sampled_accuracy_without_a_reward_model(run):
    algo, out, summary = run
    assert json.loads((out / "summary.json").read_text())[f"{algo}_accuracy"] == summary[f"{algo}_accuracy"]
    assert set(summary["models"]) == {"sft", algo} and not (out / "rm").exists()
    assert summary["sft_accuracy"] > 0.3
    assert summary[f"{algo}_accuracy"] > summary["sft_accuracy"] + 0.1
    assert summary[f"{algo}_reward"] == summary[f"{algo}_accuracy"]  # the checker's reward: sampled accuracy
    if algo == "dpo":  # the implicit reward ranks the held-out pairs (every kind of wrong answer)
        assert summary["dpo_pair_accuracy"] > 0.9
    else:
        assert summary["grpo_pair_accuracy"] is None and not (out / "grpo" / "critic").exists()


def test_quick_algo_keeps_greedy_answers(run):
    algo, _, summary = run
    assert summary[f"{algo}_accuracy_greedy"] >= summary["sft_accuracy_greedy"] - QUICK_GREEDY_SLACK


def test_critic_free_algo_refuses_prompts_its_checker_cannot_check(tmp_path):
    with pytest.raises(UsageError, match="checker"):
        main(["--algo", "grpo", "--prompt_dataset", str(tmp_path / "mine.jsonl"), "--output_dir", str(tmp_path)])
    assert not (tmp_path / "data").exists()  # refused before any work
