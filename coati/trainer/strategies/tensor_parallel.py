"""Tensor parallelism from a transformers config's ``base_model_tp_plan``, applied to an already-built model.

transformers names each decoder projection's sharding (``"layers.*.self_attn.q_proj": "colwise"``, ...); this
module translates those names into torch's ``ColwiseParallel`` / ``RowwiseParallel`` and applies them with
``parallelize_module`` on the tensor-parallel mesh, so FSDP2 can then shard the resulting DTensors over the
data-parallel mesh (the layout torchtitan uses). transformers' own ``apply_tensor_parallelism`` shards weights as
``from_pretrained(tp_plan=...)`` loads them and expects its own mesh manager on the model; torch's styles take a
model that is already loaded, as coati's strategies receive it.

Embeddings, the LM head, norms and value / score heads stay whole on every tensor-parallel rank (FSDP still
shards them over the data-parallel ranks), so the chunked LM head, NEFTune and tied embeddings see plain weights.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from ...errors import UsageError


class ReplicatedOnLocalShards(ParallelStyle):
    """A module with whole (replicated) weights that runs on this rank's slice of a tensor, e.g. Qwen3's per-head
    ``q_norm`` between the column-split ``q_proj`` and the row-split ``o_proj`` (transformers'
    ``replicated_with_grad_allreduce``). Its weights become Replicate DTensors and its input a DTensor sharded on
    dim 0: the norm reduces over the last dim only, so which leading dim really holds the heads does not matter,
    and the weight gradient, a sum over the sharded dim, comes back partial and is all-reduced by DTensor."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            return tuple(DTensor.from_local(x, mesh, [Shard(0)], run_check=False) if isinstance(x, torch.Tensor)
                         and not isinstance(x, DTensor) else x for x in inputs)

        def to_local(mod: nn.Module, output: Any, mesh: DeviceMesh) -> Any:
            return output.to_local() if isinstance(output, DTensor) else output

        return distribute_module(module, device_mesh, input_fn=to_dtensor, output_fn=to_local)


# transformers' style name -> the torch style doing the same
_STYLES: dict[str, Callable[[], ParallelStyle]] = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
    "replicated_with_grad_allreduce": ReplicatedOnLocalShards,
}
# styles whose module stays whole on every tensor-parallel rank (see the module docstring)
_KEEP_WHOLE = ("embedding_rowwise", "embedding_colwise", "vocab_parallel_embedding")


def tp_plan(config: Any, tp_size: int) -> dict[str, ParallelStyle]:
    """The torch plan for ``config``'s base model on ``tp_size`` ranks; a :class:`UsageError` naming the family
    where it has no plan, a style coati does not translate, or sizes the ranks cannot split evenly."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    family = getattr(config, "model_type", type(config).__name__)
    plan = getattr(config, "base_model_tp_plan", None)
    if not plan:
        raise UsageError(f"--tp_size {tp_size}: transformers has no tensor-parallel plan (base_model_tp_plan) for "
                         f"model_type {family!r}; train it with --tp_size 1")
    heads = getattr(config, "num_attention_heads", None)
    sizes = {"num_attention_heads": heads, "num_key_value_heads": getattr(config, "num_key_value_heads", heads),
             "intermediate_size": getattr(config, "intermediate_size", None)}
    uneven = [f"{k} {v}" for k, v in sizes.items() if v is not None and v % tp_size]
    if uneven:
        raise UsageError(f"--tp_size {tp_size}: {family}'s {', '.join(uneven)} must be divisible by it")
    unknown = sorted({s for s in plan.values() if s not in _STYLES and s not in _KEEP_WHOLE})
    if unknown:
        raise UsageError(f"--tp_size {tp_size}: {family}'s tensor-parallel plan uses {', '.join(unknown)}, which "
                         f"coati does not apply (it applies {', '.join(_STYLES)}); train it with --tp_size 1")
    return {name: _STYLES[style]() for name, style in plan.items() if style in _STYLES}


def check_tp_checkpoint(path: str, tp_size: int, trust_remote_code: bool = False) -> None:
    """Refuse ``--tp_size`` for the checkpoint at ``path`` before any weights load (its config only; a config
    that cannot be read is left to the model loading, which says why)."""
    if tp_size <= 1:
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return
    tp_plan(config, tp_size)


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard every transformers base model inside ``model`` (an Actor / Critic / RewardModel) over ``mesh``
    in place; returns ``model``."""
    from transformers import PreTrainedModel

    bases = [m for m in model.modules() if isinstance(m, PreTrainedModel) and m.base_model is m]
    if not bases:
        raise UsageError(f"--tp_size {mesh.size()}: {type(model).__name__} holds no transformers model to shard")
    for base in bases:
        if any(type(m).__module__.startswith("peft.") for m in base.modules()):
            raise UsageError(f"--tp_size {mesh.size()}: LoRA adapters are not tensor-parallel; use --tp_size 1 "
                             "with --lora_rank")
        parallelize_module(base, mesh, tp_plan(base.config, mesh.size()))
    return model
