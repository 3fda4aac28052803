"""torch DistributedDataParallel: gloo on CPU, nccl on GPU; launched by torchrun."""
from __future__ import annotations

import atexit
import contextlib
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .base import Strategy

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class DistributedStrategy(Strategy):
    """Process-group plumbing shared by every multi-process strategy (DDP, FSDP).

    ``all_reduce`` and ``all_gather_object`` span the data-parallel replicas (``dp_group``; None = every process):
    the ranks of one tensor-parallel group hold the same values, which must count once."""

    dp_group: Any = None

    def setup_distributed(self) -> None:
        if not dist.is_initialized():
            # torchrun's rendezvous; a plain `python script.py --strategy ddp` is a world of one: an in-memory
            # store, no port
            world = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                                    timeout=timedelta(minutes=30), **world)
            # torn down before the interpreter's own teardown: a gloo group left to it can abort the process
            # after the work is done ("terminate called without an active exception")
            atexit.register(_destroy_process_group)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        tensor = tensor.detach().clone().to(self.device)
        if op == "mean":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.dp_group)
            tensor /= self.dp_size
        else:
            dist.all_reduce(tensor, op=_OPS[op], group=self.dp_group)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.dp_size
        dist.all_gather_object(out, obj, group=self.dp_group)
        return out


class DDPStrategy(DistributedStrategy):
    name = "ddp"

    def prepare_model(self, model: nn.Module, trainable: bool = True) -> nn.Module:
        model = super().prepare_model(model, trainable)
        if not trainable or not any(p.requires_grad for p in model.parameters()):
            return model
        device_ids = [self.local_rank] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
