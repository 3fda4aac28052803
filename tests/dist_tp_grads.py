"""Every family with a TP plan, under ``--tp_size 2`` on 2 or 4 gloo processes (``torchrun --nproc_per_node=N
tests/dist_tp_grads.py``): the gradients of one batch, gathered, equal the whole model's on one process, and the
clipped-norm computation over the (dp, tp) shards gives the exact (float64) global norm. A family whose plan is
applied wrongly (a dim split the attention reshapes wrongly, a replicated weight whose gradient is partial) fails
here by name."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coati.models import Actor  # noqa: E402
from coati.trainer.strategies import make_strategy  # noqa: E402
from tests import tiny  # noqa: E402
from tests.test_families import PUBLISHED  # noqa: E402

CONFIGS = {"llama": tiny.llama_config, "gpt_neox": tiny.gpt_neox_config,
           **{name: PUBLISHED[name] for name in ("qwen2", "qwen3", "gemma3", "phi3")}}


def _loss(model: Actor, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1))


def check(strategy, name: str) -> None:
    config = CONFIGS[name]()
    config.dtype = torch.float32
    ids = torch.randint(3, 1000, (2 * strategy.dp_size, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    whole = Actor.from_config(config)
    _loss(whole, ids).backward()
    want = {n: p.grad for n, p in whole.named_parameters() if p.grad is not None}
    torch.manual_seed(0)
    sharded = strategy.prepare_model(Actor.from_config(config))
    _loss(sharded, ids[2 * strategy.dp_rank: 2 * strategy.dp_rank + 2]).backward()
    for n, p in sharded.named_parameters():
        got = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        err = float((got - want[n]).abs().max() / want[n].abs().max().clamp(min=1e-12))
        if err > 1e-5:
            raise AssertionError(f"{name}: {n}'s gradient under tp is {err:.2e} (relative) off the whole model's")
    exact = float(sum(g.double().pow(2).sum() for g in want.values()).sqrt())
    norm = float(strategy.clip_grad_norm(sharded))
    if abs(norm - exact) > 1e-6 * exact:
        raise AssertionError(f"{name}: gradient norm under tp {norm} != {exact}")


if __name__ == "__main__":
    strategy = make_strategy("fsdp", seed=0, tp_size=2)
    for family in CONFIGS:
        check(strategy, family)
    if strategy.is_rank0():
        Path(sys.argv[1]).write_text(" ".join(CONFIGS))
