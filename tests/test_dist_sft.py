"""Two torchrun processes (gloo) with per-process batch B/2 give the loss curve and the eval numbers of one process
with batch B, on an eval set the ranks cannot split evenly (the distributed sampler pads it with a repeat)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import torchrun

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.dist


def _rows(save_path: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (save_path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def _losses(save_path: Path) -> list[float]:
    return [r["loss"] for r in _rows(save_path, "train")]


def _run(cmd: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_ddp_matches_single_process(stage, tiny_llama_dir, shared_data, tmp_path):
    if stage == "sft":
        script, data = "examples/train_sft.py", shared_data / "sft" / "alpaca_en_demo.json"
        extra, eval_keys, held_out = ["--accumulation_steps", "2", "--max_datasets_size", "64"], ["loss"], \
            slice(300, 307)  # 7 samples
    else:
        script, data = "examples/train_reward_model.py", shared_data / "preference" / "dpo_en_demo.json"
        # ~26 of the 96 pairs fit 128 tokens: 6 steps; 3 of the 10 held-out records fit (the rest exceed --max_len)
        extra, eval_keys, held_out = ["--max_datasets_size", "96"], ["loss", "acc", "margin"], slice(200, 210)
    # an odd eval set: not divisible by 2 processes x batch 2, so rank 1's share ends with a repeated sample
    eval_file = tmp_path / f"eval_{data.name}"
    eval_file.write_text(json.dumps(json.loads(data.read_text())[held_out]))
    common = ["--pretrain", str(tiny_llama_dir), "--model", "llama", "--dataset", str(data),
              "--max_len", "128", "--max_epochs", "1", "--lr", "1e-3",
              "--log_interval", "1", "--seed", "7", "--eval_dataset", str(eval_file), *extra]
    _run([sys.executable, script, *common, "--strategy", "naive", "--batch_size", "4",
          "--save_path", str(tmp_path / "naive")])
    _run(torchrun(2) + [script, *common, "--strategy", "ddp",
                                                              "--batch_size", "2", "--save_path", str(tmp_path / "ddp")])
    single, ddp = _losses(tmp_path / "naive"), _losses(tmp_path / "ddp")
    assert len(single) == len(ddp) >= 5
    assert ddp == pytest.approx(single, abs=1e-5)
    assert single[-1] < single[0]
    single_eval, ddp_eval = _rows(tmp_path / "naive", "eval"), _rows(tmp_path / "ddp", "eval")
    assert len(single_eval) == len(ddp_eval) == 1
    for key in eval_keys:
        assert ddp_eval[0][key] == pytest.approx(single_eval[0][key], abs=1e-5), key
