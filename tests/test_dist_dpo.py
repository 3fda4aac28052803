"""examples/train_dpo.py on two torchrun processes (gloo, per-process batch B/2) gives the loss curve of one
process with batch B: the pair count and, for KTO, the KL baseline are reduced over both processes; FSDP2
(full and LoRA) does the same."""
import json
import math
import sys

import pytest

from tests.scripts import torchrun
from tests.test_dist_sft import _losses, _run
from tests.test_fsdp import needs_fsdp

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("loss_type,data", [("dpo", "dpo_en_demo.json"), ("kto", "kto_en_demo.json")])
def test_ddp_matches_single_process(loss_type, data, tiny_llama_dir, shared_data, tmp_path):
    common = ["examples/train_dpo.py", "--pretrain", str(tiny_llama_dir), "--model", "llama", "--dataset",
              str(shared_data / "preference" / data), "--loss_type", loss_type, "--max_datasets_size", "200",
              "--max_len", "96", "--max_steps", "5", "--lr", "1e-3", "--eval_ratio", "0", "--log_interval", "1",
              "--seed", "7"]
    _run([sys.executable, *common, "--strategy", "naive", "--batch_size", "4", "--save_path", str(tmp_path / "naive")])
    _run(torchrun(2) + [*common, "--strategy", "ddp", "--batch_size", "2", "--save_path", str(tmp_path / "ddp")])
    single, ddp = _losses(tmp_path / "naive"), _losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 5
    assert ddp == pytest.approx(single, abs=1e-5)
    assert max(abs(x - single[0]) for x in single) > 1e-3  # the policy moved off its reference


@needs_fsdp
def test_fsdp_matches_single_process(tiny_llama_dir, shared_data, tmp_path):
    """DPO under FSDP2 (ZeRO-3 sharding of policy and reference copy; with LoRA, the sharded base with the adapter
    off as the reference) on 2 processes with batch B/2 gives one process's loss curve with batch B, to 1e-4 (the
    tolerance of the FSDP SFT runs: gloo reduces in another summation order)."""
    common = ["--pretrain", str(tiny_llama_dir), "--model", "llama", "--dataset",
              str(shared_data / "preference" / "dpo_en_demo.json"), "--loss_type", "dpo", "--max_datasets_size", "200",
              "--max_len", "96", "--max_steps", "5", "--lr", "1e-3", "--eval_ratio", "0", "--log_interval", "1",
              "--seed", "7"]
    lora = ["--lora_rank", "4", "--merge_lora_weights", "false", "--lr", "1e-2"]  # an adapter starts at zero
    for name, extra in {"naive": [], "naive_lora": lora}.items():
        _run([sys.executable, "examples/train_dpo.py", *common, *extra, "--strategy", "naive", "--batch_size", "4",
              "--save_path", str(tmp_path / name)])
    runs = {"z3": ["--strategy", "fsdp", "--zero_stage", "3"], "z3_lora": ["--strategy", "fsdp", *lora]}
    _run(torchrun(2) + ["tests/fsdp_runs.py", "examples/train_dpo.py", str(tmp_path), json.dumps(runs),
                                *common, "--batch_size", "2"])
    for single, sharded in (("naive", "z3"), ("naive_lora", "z3_lora")):
        want, got = _losses(tmp_path / single), _losses(tmp_path / sharded)
        assert len(want) == len(got) == 5
        assert want[0] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as its own reference
        assert max(abs(x - want[0]) for x in want) > 1e-3, want  # and moves off it
        assert got == pytest.approx(want, abs=1e-4), sharded
