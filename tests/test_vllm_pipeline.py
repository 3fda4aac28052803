"""``python -m coati.pipeline --algo grpo --rollout_engine vllm --quick``: vLLM, started from the saved SFT model,
samples every GRPO rollout; the run raises the sampled accuracy as the HF engine's does (tests/test_pipeline_algos.py)
and the synced engine's log-probs stay those of the trainer.

Needs vLLM (``pip install 'coati[vllm]'``; CI runs it in the vLLM venv, see ``.ci/run``) and skips without it; the
flag checks run everywhere.
"""
import importlib.util
import json
import sys

import pytest

from coati.errors import UsageError
from coati.pipeline.run import main

from .test_pipeline import QUICK_GREEDY_SLACK

HAS_VLLM = importlib.util.find_spec("vllm") is not None
# fp32 on both sides, as tests/test_vllm.py asserts for one update; here over every episode of the run
LOGPROB_ATOL = 1e-3


@pytest.mark.parametrize("flags, message", [
    (["--algo", "dpo", "--rollout_engine", "vllm"], "--algo dpo samples none"),
    (["--algo", "grpo", "--rollout_is", "token"], "need --rollout_engine vllm"),
    (["--algo", "grpo", "--rollout_engine", "vllm", "--hidden_size", "48"],
     "multiple of 32" if HAS_VLLM else r"coati\[vllm\]"),
])
def test_engine_flags_are_refused_before_any_work(flags, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        main([*flags, "--quick", "--output_dir", str(tmp_path)])
    assert not (tmp_path / "data").exists()


def test_without_vllm_one_line_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'coati\[vllm\]'"):
        main(["--algo", "grpo", "--rollout_engine", "vllm", "--output_dir", str(tmp_path)])


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install 'coati[vllm]')")
def test_quick_grpo_with_vllm_raises_sampled_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process on CPU
    summary = main(["--quick", "--algo", "grpo", "--rollout_engine", "vllm", "--output_dir", str(tmp_path),
                    "--seed", "0", "--threads", "1"])
    assert json.loads((tmp_path / "summary.json").read_text())["grpo_accuracy"] == summary["grpo_accuracy"]
    assert summary["sft_accuracy"] > 0.3
    assert summary["grpo_accuracy"] > summary["sft_accuracy"] + 0.1
    assert summary["grpo_accuracy_greedy"] >= summary["sft_accuracy_greedy"] - QUICK_GREEDY_SLACK
    # vLLM sampled every episode, each from the weights of the step before, and agreed with the trainer
    metrics = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    synced = [m for m in metrics if "timing_s/weight_sync" in m]
    assert len(synced) >= len(metrics) - 1 and all(m["timing_s/weight_sync"] > 0 for m in synced)
    assert max(m["rollout/logprob_diff/max"] for m in metrics) < LOGPROB_ATOL
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "rollouts.jsonl").read_text().splitlines()]
    assert rows and all(r["weight_version"] == r["step"] - 1 for r in rows)


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install 'coati[vllm]')")
def test_ppo_stage_samples_with_vllm_in_step_with_the_trainer(tmp_path, monkeypatch):
    """--algo ppo (reward model, critic) on vLLM, a few episodes: each one synced and scored alike."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    summary = main(["--quick", "--rollout_engine", "vllm", "--sft_steps", "50", "--rm_steps", "50",
                    "--ppo_episodes", "4", "--num_eval", "20", "--output_dir", str(tmp_path), "--threads", "1"])
    metrics = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and all(m["timing_s/weight_sync"] > 0 for m in metrics)
    assert max(m["rollout/logprob_diff/max"] for m in metrics) < LOGPROB_ATOL
    assert summary["models"]["ppo"] == str(tmp_path / "ppo") and (tmp_path / "ppo" / "config.json").is_file()
