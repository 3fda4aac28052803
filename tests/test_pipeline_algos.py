"""The main job with --algo at reduced size: SFT -> GRPO (the task's checker is the reward) and SFT -> DPO (on the
reward model's pairs) raise the exactly-checked accuracy of sampled answers, cost no greedy answer, and build no
reward model (nor, for GRPO, a critic)."""
import json

import pytest

from coati.models import base
from coati.pipeline.run import main


@pytest.fixture
def no_value_models(monkeypatch):
    """Fail on any Critic / RewardModel constructed (from a checkpoint or a config)."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} built")

    monkeypatch.setattr(base._ValueModel, "__init__", refuse)


@pytest.mark.parametrize("algo", ["grpo", "dpo"])
def test_quick_pipeline_algo_improves_without_a_reward_model(algo, no_value_models, tmp_path):
    summary = main(["--quick", "--algo", algo, "--output_dir", str(tmp_path), "--seed", "0", "--threads", "1"])
    assert json.loads((tmp_path / "summary.json").read_text())[f"{algo}_accuracy"] == summary[f"{algo}_accuracy"]
    assert set(summary["models"]) == {"sft", algo} and not (tmp_path / "rm").exists()
    assert summary["sft_accuracy"] > 0.3
    assert summary[f"{algo}_accuracy"] > summary["sft_accuracy"] + 0.05
    assert summary[f"{algo}_accuracy_greedy"] >= summary["sft_accuracy_greedy"]
    # the reward column is the checker's: the sampled accuracy
    assert summary[f"{algo}_reward"] == summary[f"{algo}_accuracy"]
    if algo == "dpo":  # the implicit reward ranks held-out pairs (every kind of wrong answer) well
        assert summary["dpo_pair_accuracy"] > 0.9
    else:
        assert summary["grpo_pair_accuracy"] is None
        assert not (tmp_path / "grpo" / "critic").exists()
