"""examples/train_dpo.py on two torchrun processes (gloo, per-process batch B/2) gives the loss curve of one
process with batch B: the pair count and, for KTO, the KL baseline are reduced over both processes."""
import sys

import pytest

from tests.test_dist_sft import _losses, _run, _torchrun

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("loss_type,data,port", [("dpo", "dpo_en_demo.json", 29621), ("kto", "kto_en_demo.json", 29622)])
def test_ddp_matches_single_process(loss_type, data, port, tiny_llama_dir, shared_data, tmp_path):
    common = ["examples/train_dpo.py", "--pretrain", str(tiny_llama_dir), "--model", "llama", "--dataset",
              str(shared_data / "preference" / data), "--loss_type", loss_type, "--max_datasets_size", "200",
              "--max_len", "96", "--max_steps", "5", "--lr", "1e-3", "--eval_ratio", "0", "--log_interval", "1",
              "--seed", "7"]
    _run([sys.executable, *common, "--strategy", "naive", "--batch_size", "4", "--save_path", str(tmp_path / "naive")])
    _run(_torchrun(2, port) + [*common, "--strategy", "ddp", "--batch_size", "2", "--save_path", str(tmp_path / "ddp")])
    single, ddp = _losses(tmp_path / "naive"), _losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 5
    assert ddp == pytest.approx(single, abs=1e-5)
    assert max(abs(x - single[0]) for x in single) > 1e-3  # the policy moved off its reference
