"""The main job at reduced size: SFT -> RM -> PPO on the built-in arithmetic task, with its table asserted."""
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coati.models import RewardModel
from coati.pipeline.run import main


def test_quick_pipeline_learns_and_ppo_improves(tmp_path):
    summary = main(["--quick", "--output_dir", str(tmp_path), "--seed", "0", "--threads", "1"])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ("sft_accuracy", "rm_accuracy", "ppo_accuracy", "ppo_reward_start", "ppo_reward_end"):
        assert on_disk[key] == summary[key]
    # Sums of two numbers: guessing gets a few percent; the SFT policy learned the task but from noisy demos.
    assert summary["sft_accuracy"] > 0.3
    assert summary["rm_accuracy"] > 0.7
    # PPO against the reward model raises reward and the exactly-checked accuracy of sampled answers.
    assert summary["ppo_reward_end"] > summary["ppo_reward_start"]
    assert summary["ppo_accuracy"] > summary["sft_accuracy"]
    # Saved models are plain transformers dirs.
    ppo_dir = summary["models"]["ppo"]
    tok = AutoTokenizer.from_pretrained(ppo_dir)
    model = AutoModelForCausalLM.from_pretrained(ppo_dir)
    ids = torch.tensor([tok("12+7=", add_special_tokens=False).input_ids])
    assert model(ids).logits.shape[-1] == len(tok)
    rm = RewardModel.from_pretrained(str(tmp_path / "rm"))
    assert rm(ids, attention_mask=torch.ones_like(ids)).shape == (1,)
