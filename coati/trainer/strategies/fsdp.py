"""torch FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over the processes.

Layout: every decoder layer (the HF model's ``_no_split_modules``) is one FSDP unit and the wrapper (Actor,
Critic, RewardModel) is the root unit holding embeddings, final norm, LM head and value head. Under mixed
precision the fp32 value head is a unit of its own with an fp32 policy, so it is never cast to bf16.

- ``zero_stage=2``: parameters stay gathered from forward to backward (``reshard_after_forward=False``),
  gradients and optimizer state are sharded (ZeRO-2 memory, fewer all-gathers).
- ``zero_stage=3``: parameters are re-sharded after each unit's forward and gathered again for backward
  (ZeRO-3 memory).
- ``cpu_offload``: sharded parameters, gradients and optimizer state live in CPU memory and the optimizer
  steps on CPU (torch ``CPUOffloadPolicy``); units are copied to the device only while they compute.
- ``mixed_precision="bf16"``: units compute in bf16 and reduce gradients in fp32; the sharded fp32 parameters
  are the master weights the optimizer updates. (Norm weights compute in bf16 too, so losses differ from
  DDP's autocast by bf16 rounding, ~1e-4, where fp32 runs agree to ~1e-6.)

Frozen models (PPO reference and reward models) are sharded too, always re-sharded after forward, so each
process holds 1/N of them and every process must call them on the same number of batches, as the trainers
do; ``shard_frozen=False`` replicates them instead (no communication in their forward). LoRA adapters are
sharded beside their frozen base weights; only they get gradients and optimizer state.

Tensor parallelism (``tp_size`` > 1): the processes form a 2-D ``(dp, tp)`` mesh; each model's decoder layers are
first split over ``tp`` by its family's transformers plan (:mod:`.tensor_parallel`), then FSDP2 shards everything
over ``dp``. Data, reductions and sampling seeds follow the data-parallel replica (``dp_rank``, ``dp_group``).

Checkpoints: ``save_model`` writes the same consolidated ``save_pretrained`` directory as every other
strategy (gathered on rank 0); ``load_model`` reads one on rank 0 and broadcasts it into the shards.
Optimizer state is saved per rank (its shards), so ``--resume`` needs the same mesh (processes and tp_size),
recorded in ``sharding.json``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor import placement_types

# FSDP2's dp placement of a dim tensor parallelism already split (absent from older torch, which has no such case)
_StridedShard = getattr(placement_types, "_StridedShard", ())

from ...errors import UsageError
from .base import StrategyUnavailableError, atomic_dir, load_plain, rng_state, set_rng_state
from .ddp import DistributedStrategy

try:  # torch >= 2.6
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    RUNS_ON_CPU = True
except ImportError:  # torch 2.5 (ColossalAI's pinned stack): FSDP2 there needs CUDA streams
    RUNS_ON_CPU = False
    from torch.distributed._composable.fsdp import (  # type: ignore[no-redef]
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

SHARDING_FILE = "sharding.json"
MESH_DIMS = ("dp", "tp")


class FSDPStrategy(DistributedStrategy):
    """torch FSDP2 over all processes of the job (gloo on CPU, nccl on GPU); launched by torchrun."""

    name = "fsdp"

    def __init__(self, seed: int = 42, mixed_precision: str | None = None, grad_clip: float = 1.0,
                 zero_stage: int = 3, cpu_offload: bool = False, shard_frozen: bool = True,
                 placement_policy: str | None = None, block_classes: list[str] | None = None,
                 tp_size: int = 1) -> None:
        if zero_stage not in (2, 3):
            raise ValueError(f"fsdp supports --zero_stage 2 or 3, got {zero_stage}")
        if placement_policy is not None:
            raise ValueError("--placement_policy is a colossalai_gemini option; fsdp uses --cpu_offload")
        if not RUNS_ON_CPU and not torch.cuda.is_available():
            raise StrategyUnavailableError(
                f"--strategy fsdp without a GPU needs torch >= 2.6 (torch {torch.__version__}'s FSDP2 is "
                "GPU-only); use an environment with torch >= 2.6, or --strategy ddp on this machine.")
        self.zero_stage = zero_stage
        self.cpu_offload = bool(cpu_offload)
        self.shard_frozen = shard_frozen
        self.block_classes = block_classes
        self.tp_size = tp_size
        super().__init__(seed=seed, mixed_precision=mixed_precision, grad_clip=grad_clip)
        if self.world_size % tp_size:
            raise ValueError(f"--tp_size {tp_size} must divide the number of processes ({self.world_size})")
        if tp_size == 1:
            self.mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=MESH_DIMS[:1])
        else:  # ranks r = dp_rank * tp_size + tp_rank: a tensor-parallel group is tp_size consecutive ranks
            self.mesh = init_device_mesh(self.device.type, (self.dp_size, tp_size), mesh_dim_names=MESH_DIMS)
            self.dp_group = self.mesh["dp"].get_group()

    def _setup_device(self) -> None:
        super()._setup_device()
        if self.scaler is not None:
            # fp16: overflow checks must agree across ranks holding different gradient shards
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler()

    # ----- wrapping ------------------------------------------------------------------------------------
    def _policies(self, reshard: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"mesh": self.mesh["dp"], "reshard_after_forward": reshard}
        if self.mixed_precision is not None:
            dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        return kwargs

    def prepare_model(self, model: nn.Module, trainable: bool = True) -> nn.Module:
        """Shard ``model`` in place (decoder layers, value head, then the root) and return it."""
        from ...models.quant import check_strategy_support

        check_strategy_support(self.name, model=model)
        if not trainable:
            model.eval()
            model.requires_grad_(False)
            if not self.shard_frozen:
                return model.to(self.device)
        if isinstance(model, FSDPModule):
            return model
        if self.tp_size > 1:
            from .tensor_parallel import apply_tensor_parallel

            apply_tensor_parallel(model, self.mesh["tp"])
        # A frozen model has no backward that could reuse gathered parameters: always reshard it.
        reshard = self.zero_stage == 3 or not trainable
        kwargs = self._policies(reshard)
        for layer in decoder_layers(model, self.block_classes):
            fully_shard(layer, **kwargs)
        head = getattr(model, "value_head", None)
        if isinstance(head, nn.Module) and "mp_policy" in kwargs:
            fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
            fully_shard(head, **{**kwargs, "mp_policy": fp32})
        fully_shard(model, **kwargs)
        if callable(getattr(model, "generate", None)):
            # generate() runs the model outside forward(): the root's parameters must be gathered for it
            register_fsdp_forward_method(model, "generate")
        for module in model.modules():
            if hasattr(module, "can_generate") and hasattr(module, "config"):
                # transformers then passes synced_gpus=True to generate, so ranks that finish early keep
                # joining the all-gathers of ranks still generating
                module._is_fsdp_managed_module = True
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model  # fully_shard works in place

    def check_ppo(self, offload_ref_reward: bool = False) -> None:
        """``offload_ref_reward`` moves whole frozen models between devices; sharded ones cannot move."""
        if offload_ref_reward and self.shard_frozen:
            raise ValueError("--offload_ref_reward moves whole frozen models, but --strategy fsdp shards them; "
                             "drop it (--cpu_offload keeps every model's shards, with gradients and optimizer "
                             "state, in CPU memory)")

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Gradients are reduce-scattered on every micro-step and accumulate in their shards, so an
        accumulation step never holds full-size gradients (the ZeRO-2/3 memory promise)."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        """Global L2 norm over sharded (DTensor) and plain gradients; clips in place, returns the norm.

        A DTensor gradient's squared sum is reduced over the mesh dimensions it is sharded on (FSDP's dp, TP's
        tp, or both), never over those it is replicated on, so each element counts once."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros(())
        partial: dict[tuple, torch.Tensor] = {}  # (mesh, sharded dims) -> this rank's squared sum
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in grads:
            if isinstance(g, DTensor):
                sq = g.to_local().detach().float().pow(2).sum().to(self.device)
                key = (g.device_mesh, tuple(i for i, p in enumerate(g.placements) if _is_shard(p)))
                partial[key] = partial.get(key, 0) + sq
            else:
                total += g.detach().float().pow(2).sum().to(self.device)
        for (mesh, dims), sq in partial.items():  # the same keys, in the same order, on every rank
            for dim in dims:
                dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
            total += sq
        total = total.sqrt()
        if self.grad_clip and self.grad_clip > 0:
            coef = (self.grad_clip / (total + 1e-6)).clamp(max=1.0)
            for g in grads:
                local_g = g.to_local() if isinstance(g, DTensor) else g
                local_g.detach().mul_(coef.to(local_g.device, local_g.dtype))
        return total

    # ----- checkpoints ----------------------------------------------------------------------------------
    def _gather_replica(self, model: nn.Module) -> nn.Module | None:
        """All ranks: gather the full state dict. Rank 0 gets a plain CPU copy of ``model``; others None."""
        # a (dp, tp)-sharded weight is gathered in two steps, which torch warns about on every rank and save
        quiet = logging.getLogger("torch.distributed.tensor._redistribute")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        finally:
            quiet.setLevel(level)
        if not self.is_rank0():
            return None
        return plain_replica(model, state)

    def save_model(self, model: nn.Module, path: str | os.PathLike, tokenizer: Any = None,
                   merge_lora: bool = False, exact: bool = False) -> None:
        if not isinstance(model, FSDPModule):
            return super().save_model(model, path, tokenizer=tokenizer, merge_lora=merge_lora, exact=exact)
        replica = self._gather_replica(model)
        if replica is not None:
            with atomic_dir(path) as tmp:
                replica.save_pretrained(tmp, tokenizer=tokenizer, merge_lora=merge_lora, exact=exact)
        self.barrier()

    def load_model(self, model: nn.Module, path: str | os.PathLike) -> None:
        """Rank 0 reads the consolidated dir (full weights or a LoRA adapter on top of the current base) and
        broadcasts it; every rank keeps its shards."""
        if not isinstance(model, FSDPModule):
            return super().load_model(model, path)
        replica = self._gather_replica(model)
        state: dict[str, torch.Tensor] = {}
        error = None
        if replica is not None:
            try:
                replica.load_weights(path)
                state = replica.state_dict()
            except Exception as exc:  # tell every rank, so none waits in the broadcast below
                error = exc
        error = self.broadcast_object(None if error is None else repr(error))
        if error is not None:
            raise RuntimeError(f"loading {path} into the sharded model failed: {error}")
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                    broadcast_from_rank0=True))

    def save_state(self, path: str | os.PathLike, state: dict[str, Any]) -> None:
        """Every rank writes its own optimizer shards (rank 0 as ``state.pt``, others ``state_rank{r}.pt``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        name = "state.pt" if self.is_rank0() else f"state_rank{self.rank}.pt"
        torch.save(_to_local(self._with_scaler(state)), path / name)
        torch.save(rng_state(), path / f"rng_rank{self.rank}.pt")
        if self.is_rank0():
            (path / SHARDING_FILE).write_text(json.dumps({"strategy": self.name, "world_size": self.world_size,
                                                          "mesh": self.mesh_shape()}))
        self.barrier()

    def mesh_shape(self) -> dict[str, int]:
        """``{"dp": data-parallel replicas, "tp": tensor-parallel degree}``: how optimizer state is sharded."""
        return {"dp": self.dp_size, "tp": self.tp_size}

    def check_resume(self, path: str | os.PathLike) -> None:
        """Refuse trainer state written by another strategy or sharded over another mesh (its ``sharding.json``)."""
        path = Path(path)
        meta_file = path / SHARDING_FILE
        if not meta_file.is_file():
            raise UsageError(f"{path}: not written by --strategy fsdp (no {SHARDING_FILE}); resume with the "
                             "strategy that wrote it")
        meta = json.loads(meta_file.read_text())
        saved = meta.get("mesh") or {"dp": meta["world_size"], "tp": 1}
        if saved != self.mesh_shape():
            def shape(m: dict[str, int]) -> str:
                n = m["dp"] * m["tp"]
                return f"{n} process{'es' if n != 1 else ''} as dp {m['dp']} x tp {m['tp']}"

            raise UsageError(f"{path}: optimizer state is sharded over {shape(saved)}; resume with "
                             f"--nproc_per_node/--nnodes and --tp_size giving that mesh (this run has "
                             f"{shape(self.mesh_shape())})")

    def load_state(self, path: str | os.PathLike) -> dict[str, Any]:
        path = Path(path)
        self.check_resume(path)
        name = "state.pt" if self.is_rank0() else f"state_rank{self.rank}.pt"
        state = self._restore_scaler(_from_local(load_plain(path / name), self.mesh))
        set_rng_state(load_plain(path / f"rng_rank{self.rank}.pt"))
        return state


# ----- helpers shared with the ColossalAI strategy ---------------------------------------------------------

def decoder_layers(model: nn.Module, classes: list[str] | None = None) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules of the named ``classes`` (--fsdp_block), else HF
    ``_no_split_modules`` classes (outermost match only), else the entries of the longest ``nn.ModuleList``."""
    names: set[str] = set(classes or ())
    for m in model.modules() if not classes else ():
        names.update(getattr(m, "_no_split_modules", None) or [])
    found: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside:
            continue
        if type(m).__name__ in names:
            found.append(m)
            inside.update(id(sub) for sub in m.modules())
    if found:
        return found
    if classes:
        raise UsageError(f"--fsdp_block {' '.join(classes)}: the model has no module of that class (its blocks: "
                         f"{', '.join(sorted({type(m).__name__ for m in decoder_layers(model)}))})")
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def plain_replica(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unsharded, CPU) coati model with ``template``'s structure and ``state``'s weights.

    ``template`` is an Actor / Critic / RewardModel whose ``.model`` is a HF causal LM or a PeftModel. The
    copy is built on the meta device (no memory, no init) and takes ``state``'s tensors without copying them,
    so saving and loading reuse the models' own ``save_pretrained`` / ``load_weights``.
    """
    from ...models.lora import is_peft_model

    lm = template.model
    peft = is_peft_model(lm)
    base = lm.get_base_model() if peft else lm
    with torch.device("meta"):
        new = type(base)._from_config(copy.deepcopy(base.config))
        if peft:
            from peft import get_peft_model

            names = list(lm.peft_config)
            new = get_peft_model(new, copy.deepcopy(lm.peft_config[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                new.add_adapter(name, copy.deepcopy(lm.peft_config[name]))
            new.set_adapter(lm.active_adapter)
        try:
            replica = type(template)(new)
        except TypeError as exc:
            raise TypeError(f"{type(template).__name__}(model) must rebuild the wrapper for sharded saving") from exc
    replica.source_dtype = getattr(template, "source_dtype", None)  # saves keep the source checkpoint's dtype
    result = replica.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"gathered weights do not fit the model: unexpected {result.unexpected_keys[:5]}")
    base_new = new.get_base_model() if peft else new
    if getattr(base_new.config, "tie_word_embeddings", False):
        base_new.tie_weights()
    # buffers outside the state dict (e.g. rotary inv_freq) are replicated on every rank: copy them
    source_buffers = dict(template.named_buffers())
    for name, buf in list(replica.named_buffers()):
        if buf.is_meta and name in source_buffers:
            owner_name, _, leaf = name.rpartition(".")
            owner = replica.get_submodule(owner_name) if owner_name else replica
            owner._buffers[leaf] = source_buffers[name].detach().to("cpu", copy=True)
    still_meta = [n for n, p in replica.named_parameters() if p.is_meta]
    if still_meta:
        raise ValueError(f"gathered weights miss parameters {still_meta[:5]}")
    return replica


# A DTensor as one rank saves it: its local shard plus what rebuilds it on the same layout, all plain values
# (placements as ["shard", dim] / ["replicate"]), so the state file loads with weights_only=True.
_SHARD = "__coati_dtensor_local__"


def _is_shard(p: Any) -> bool:
    return p.is_shard() or isinstance(p, _StridedShard)


def _placement_to_plain(p: Any) -> list:
    if isinstance(p, _StridedShard):
        return ["strided_shard", p.dim, p.split_factor]
    if isinstance(p, Shard):
        return ["shard", p.dim]
    if isinstance(p, Replicate):
        return ["replicate"]
    raise ValueError(f"cannot checkpoint a DTensor placed as {p!r} (only Shard, _StridedShard and Replicate)")


def _plain_to_placement(p: list) -> Any:
    if p[0] == "strided_shard":
        return _StridedShard(p[1], split_factor=p[2])
    return Shard(p[1]) if p[0] == "shard" else Replicate()


def _to_local(obj: Any) -> Any:
    if isinstance(obj, DTensor):
        return {_SHARD: obj.to_local().detach().cpu(), "shape": list(obj.shape), "stride": list(obj.stride()),
                "placements": [_placement_to_plain(p) for p in obj.placements],
                "mesh": list(obj.device_mesh.mesh_dim_names or ())}
    if isinstance(obj, dict):
        return {k: _to_local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_local(v) for v in obj)
    return obj


def _from_local(obj: Any, mesh) -> Any:
    """Rebuild the DTensors :func:`_to_local` saved, each on the dims of ``mesh`` it was saved on."""
    if isinstance(obj, dict) and _SHARD in obj:
        placements = [_plain_to_placement(p) for p in obj["placements"]]
        names = tuple(obj.get("mesh") or ())
        on = mesh if not names or names == tuple(mesh.mesh_dim_names or ()) else mesh[names]
        return DTensor.from_local(obj[_SHARD], on, placements, run_check=False, shape=torch.Size(obj["shape"]),
                                  stride=tuple(obj["stride"]))
    if isinstance(obj, dict):
        return {k: _from_local(v, mesh) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_local(v, mesh) for v in obj)
    return obj
