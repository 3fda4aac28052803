"""stanford_alpaca's / LLM4Academic's train.py command line (Hugging Face TrainingArguments names) runs as written:
each name is an alias of coati's own flag, --fsdp / --bf16 translate to coati's strategy flags, names without a
coati meaning are one error line; --save_total_limit keeps the newest checkpoints; --lr_scheduler_type linear is
transformers' linear schedule."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coati.trainer.base import LRSchedule
from tests.scripts import load_script, torchrun

ROOT = Path(__file__).resolve().parents[1]

# stanford_alpaca's README command (LLaMA), with its paths pointed at local files and its sizes made small
HF_COMMAND = ["--bf16", "True", "--num_train_epochs", "1", "--per_device_train_batch_size", "2",
              "--gradient_accumulation_steps", "2", "--save_steps", "2", "--save_total_limit", "1",
              "--learning_rate", "2e-3", "--weight_decay", "0.", "--warmup_ratio", "0.03",
              "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--fsdp", "full_shard auto_wrap",
              "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--tf32", "True"]
COATI_COMMAND = ["--mixed_precision", "bf16", "--max_epochs", "1", "--batch_size", "2", "--accumulation_steps", "2",
                 "--save_interval", "2", "--save_total_limit", "1", "--lr", "2e-3", "--weight_decay", "0",
                 "--warmup_ratio", "0.03", "--lr_scheduler", "cosine", "--log_interval", "1", "--strategy", "fsdp",
                 "--zero_stage", "3", "--fsdp_block", "LlamaDecoderLayer", "--tf32"]


def _hf(model: str, data: str, out: str) -> list[str]:
    return ["--model_name_or_path", model, "--data_path", data, "--output_dir", out, *HF_COMMAND]


def _coati(model: str, data: str, out: str) -> list[str]:
    return ["--pretrain", model, "--dataset", data, "--save_path", out, *COATI_COMMAND]


@pytest.mark.parametrize("script", ["train_sft", "train_reward_model", "train_dpo"])
def test_hf_trainer_spellings_parse_to_coatis_flags(script):
    parser = load_script(f"examples/{script}.py").build_parser()
    hf, coati = vars(parser.parse_args(_hf("M", "D", "O"))), vars(parser.parse_args(_coati("M", "D", "O")))
    assert hf == coati
    assert coati["strategy"] == "fsdp" and coati["mixed_precision"] == "bf16" and coati["save_path"] == "O"
    # --bf16 False after a --bf16 turns it off again; offload / shard_grad_op map to the sharding options
    args = parser.parse_args(["--pretrain", "M", "--dataset", "D", "--bf16", "--bf16", "False",
                              "--fsdp", "shard_grad_op offload"])
    assert (args.mixed_precision, args.strategy, args.zero_stage, args.cpu_offload) == ("no", "fsdp", 2, True)


@pytest.mark.parametrize("flags, says", [
    (["--fsdp", "hybrid_shard auto_wrap"], "--fsdp: 'hybrid_shard' has no coati equivalent"),
    (["--fsdp", "auto_wrap"], "name full_shard or shard_grad_op"),
    (["--evaluation_strategy", "no"], "unrecognized arguments: --evaluation_strategy"),
    (["--lr_scheduler_type", "polynomial"], "--lr_scheduler_type: invalid choice"),
])
def test_hf_flags_without_a_coati_meaning_are_one_error_line(flags, says, tmp_path):
    proc = subprocess.run([sys.executable, "examples/train_sft.py", "--pretrain", str(tmp_path), "--dataset",
                           str(tmp_path / "d.json"), *flags], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr


def test_linear_schedule_equals_transformers():
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_linear_schedule_with_warmup(opt, num_warmup_steps=math.ceil(40 * 0.1), num_training_steps=40)
    ours = LRSchedule(40, 0.1, "linear")
    assert [ours(s) for s in range(45)] == pytest.approx([ref.lr_lambdas[0](s) for s in range(45)], abs=1e-12)


def test_save_total_limit_keeps_the_newest_checkpoints_and_resumes(tiny_llama_dir, tmp_path):
    from coati.trainer.base import latest_checkpoint

    data = tmp_path / "sft.json"
    data.write_text(json.dumps([{"instruction": f"say {i}", "output": f"{i} {i}"} for i in range(24)]))
    out = tmp_path / "out"
    common = [sys.executable, "examples/train_sft.py", "--pretrain", str(tiny_llama_dir), "--dataset", str(data),
              "--batch_size", "2", "--accumulation_steps", "1", "--max_epochs", "1", "--save_path", str(out),
              "--save_interval", "2", "--save_total_limit", "2", "--lr", "1e-3"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run([*common, "--max_steps", "7"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_4", "step_6"]
    resumed = subprocess.run([*common, "--max_steps", "10", "--resume"], cwd=ROOT, env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and "step_6" in resumed.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_10", "step_8"]
    assert latest_checkpoint(out).name == "step_10"


@pytest.mark.dist
def test_the_alpaca_command_on_two_processes_equals_coatis_spelling(tiny_llama_dir, shared_data, tmp_path):
    data = shared_data / "sft" / "alpaca_en_demo.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    outs = {}
    for i, (name, spell) in enumerate((("hf", _hf), ("coati", _coati))):
        out = tmp_path / name
        cmd = [*torchrun(2), "examples/train_sft.py",
               *spell(str(tiny_llama_dir), str(data), str(out)), "--max_len", "96", "--max_datasets_size", "64",
               "--max_steps", "4"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = out
    rows = {k: [json.loads(line) for line in (v / "metrics.jsonl").read_text().splitlines()] for k, v in outs.items()}
    losses = {k: [r["loss"] for r in v if r["split"] == "train"] for k, v in rows.items()}
    assert len(losses["hf"]) == 4 and losses["hf"] == losses["coati"]
    assert losses["hf"][-1] < losses["hf"][0]
    weights = {k: load_file(v / "model.safetensors") for k, v in outs.items()}
    assert all(torch.equal(weights["hf"][k], weights["coati"][k]) for k in weights["coati"])
    # --save_steps 2 with --save_total_limit 1: the newest checkpoint alone
    assert [p.name for p in (outs["hf"] / "checkpoints").iterdir()] == ["step_4"]
