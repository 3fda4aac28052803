"""Strategy plumbing that single-process tests can check: sampler order, atomic saves, step maths."""

import pytest
import torch

from coati.trainer.strategies import NaiveStrategy
from coati.trainer.strategies.base import ResumableSampler, atomic_dir


def test_sampler_shards_one_global_order():
    data = list(range(21))
    single = list(ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3, drop_last=True))
    r0 = list(ResumableSampler(data, num_replicas=2, rank=0, shuffle=True, seed=3, drop_last=True))
    r1 = list(ResumableSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True))
    # Step k of a 2-process run with per-rank batch 2 sees the same 4 samples as step k of one process, batch 4.
    for k in range(len(r0) // 2):
        assert sorted(r0[2 * k:2 * k + 2] + r1[2 * k:2 * k + 2]) == sorted(single[4 * k:4 * k + 4])


def test_sampler_resumes_mid_epoch():
    data = list(range(10))
    s = ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=False)
    s.set_epoch(2)
    full = list(s)
    s.start_index = 4
    assert len(s) == 6
    assert list(s) == full[4:]
    assert list(s) == full  # the skip applies once


def test_atomic_dir_keeps_other_entries_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "out"
    (target / "checkpoints").mkdir(parents=True)
    (target / "checkpoints" / "keep.txt").write_text("x")
    (target / "model.bin").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "model.bin").write_text("new")
    assert (target / "model.bin").read_text() == "new"
    assert (target / "checkpoints" / "keep.txt").read_text() == "x"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "model.bin").write_text("half")
            raise RuntimeError("crash while saving")
    assert (target / "model.bin").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_optimizer_step_clips_to_max_norm():
    strategy = NaiveStrategy(seed=0, grad_clip=0.5)
    layer = torch.nn.Linear(4, 1, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    before = layer.weight.detach().clone()
    layer.weight.grad = torch.tensor([[3.0, 4.0, 0.0, 0.0]])  # norm 5
    norm = strategy.optimizer_step(opt, layer)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(before - layer.weight.detach(), torch.tensor([[0.3, 0.4, 0.0, 0.0]]), atol=1e-6)
    assert layer.weight.grad is None


def test_fp16_needs_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ValueError, match="fp16"):
        NaiveStrategy(mixed_precision="fp16")
