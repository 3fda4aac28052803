"""ColossalAI Booster plugins under Coati's strategy names (optional extra: ``pip install coati[colossalai]``).

- ``colossalai_zero2``: ``LowLevelZeroPlugin(stage=2)``: optimizer state and gradients sharded, parameters
  replicated in the compute dtype, fp32 master weights sharded.
- ``colossalai_zero2_cpu``: the same with master weights, gradients and optimizer state in CPU memory.
- ``colossalai_gemini``: ``GeminiPlugin``: chunk-based ZeRO-3 with heterogeneous (GPU + CPU) memory;
  ``placement_policy="static"`` (``cpu_offload`` puts optimizer state on CPU) or ``"auto"`` (memory tracer).

ColossalAI is GPU-only and pins its own torch / transformers versions, so it is imported only when one of
these strategies is built; on a machine without CUDA or without colossalai construction fails with one
sentence saying what to install or which strategy to use instead (:class:`StrategyUnavailableError`).

ColossalAI wraps model and optimizer together (``booster.boost``): trainers train the pair
:meth:`ColossalAIStrategy.prepare_optimizer` returns. Mixed precision is the plugin's (the model is cast to
bf16 / fp16 with fp32 master weights), so :meth:`autocast` is a no-op here.

Frozen models (reference / reward) are not boosted: each process holds a full copy cast to the compute
dtype (value heads stay fp32). Checkpoints are the same consolidated ``save_pretrained`` directories as
every other strategy; optimizer state is gathered by ColossalAI's optimizers and saved once.
Gemini does not support LoRA or gradient accumulation with ``placement_policy="auto"``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ...models.dtypes import to_dtype
from .base import StrategyUnavailableError, atomic_dir
from .ddp import DistributedStrategy

PLUGIN_NAMES = ("colossalai_zero2", "colossalai_zero2_cpu", "colossalai_gemini")


def check_available(name: str) -> None:
    """Raise :class:`StrategyUnavailableError` (one sentence) when ``name`` cannot run here."""
    if not torch.cuda.is_available():
        raise StrategyUnavailableError(
            f"--strategy {name} needs a CUDA GPU (ColossalAI kernels are GPU-only); on this machine use "
            f"--strategy fsdp --zero_stage {3 if name == 'colossalai_gemini' else 2}"
            f"{' --cpu_offload' if name != 'colossalai_zero2' else ''} instead.")
    if importlib.util.find_spec("colossalai") is None:
        raise StrategyUnavailableError(
            f"--strategy {name} needs ColossalAI: run `pip install coati[colossalai]` (it pins its own torch "
            f"and transformers versions, see README), or use --strategy fsdp instead.")


class ColossalAIStrategy(DistributedStrategy):
    """One of ColossalAI's Booster plugins, chosen by Coati's strategy name."""

    def __init__(self, name: str = "colossalai_zero2", seed: int = 42, mixed_precision: str | None = None,
                 grad_clip: float = 1.0, zero_stage: int | None = None, cpu_offload: bool | None = None,
                 placement_policy: str | None = None) -> None:
        if name not in PLUGIN_NAMES:
            raise ValueError(f"unknown ColossalAI strategy {name!r}; choose one of {', '.join(PLUGIN_NAMES)}")
        check_available(name)
        gemini = name == "colossalai_gemini"
        if zero_stage is not None and zero_stage != (3 if gemini else 2):
            raise ValueError(f"{name} is ZeRO stage {3 if gemini else 2}; drop --zero_stage {zero_stage}")
        if cpu_offload and name == "colossalai_zero2":
            raise ValueError("use --strategy colossalai_zero2_cpu for ZeRO-2 with CPU offload")
        if placement_policy is not None and not gemini:
            raise ValueError("--placement_policy applies to colossalai_gemini only")
        if placement_policy not in (None, "static", "auto"):
            raise ValueError(f"placement_policy must be static or auto, got {placement_policy!r}")
        if gemini and cpu_offload and placement_policy == "auto":
            raise ValueError("--cpu_offload applies to placement_policy static; auto places chunks itself")
        self.name = name
        self.placement_policy = placement_policy or "static"
        self.cpu_offload = bool(cpu_offload) or name == "colossalai_zero2_cpu"
        if mixed_precision in (None, "no"):
            # Gemini keeps compute parameters in half precision only; bf16 is the safe default
            self.precision = "bf16" if gemini else "fp32"
        else:
            self.precision = mixed_precision
        # the plugin owns precision and loss scaling: the base class must not build an autocast / GradScaler
        super().__init__(seed=seed, mixed_precision=None, grad_clip=grad_clip)
        import colossalai.booster.plugin as plugins
        from colossalai.booster import Booster

        cls_name, kwargs = plugin_spec(name, self.precision, self.grad_clip, self.cpu_offload, self.placement_policy)
        self.booster = Booster(plugin=getattr(plugins, cls_name)(**kwargs))

    # ----- set-up ---------------------------------------------------------------------------------------
    def setup_distributed(self) -> None:
        import colossalai

        if not dist.is_initialized():
            if "RANK" not in os.environ:
                os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=os.environ.get("MASTER_PORT", "29555"))
            colossalai.launch_from_torch(seed=self.seed, verbose=False)
        super().setup_distributed()

    # ----- models and optimisation --------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, trainable: bool = True) -> nn.Module:
        """Frozen models: a full copy on this GPU in the compute dtype. Trainable ones are boosted together
        with their optimizer in :meth:`prepare_optimizer`."""
        from ...models.quant import check_strategy_support

        check_strategy_support(self.name, model=model)
        if not trainable:
            model.eval()
            model.requires_grad_(False)
            inner = getattr(model, "model", model)
            inner.to(device=self.device, dtype=to_dtype(self.precision))
            return model.to(self.device)
        if self.name == "colossalai_gemini" and getattr(model, "lora_enabled", False):
            raise ValueError("colossalai_gemini does not support LoRA; use colossalai_zero2 or fsdp")
        return model

    def prepare_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """Boost ``model`` and ``optimizer`` together; returns the wrapped pair to train with.

        Offloaded and Gemini optimizer states need ColossalAI's ``HybridAdam``: an AdamW is rebuilt as one
        with the same parameter groups and hyper-parameters.
        """
        from colossalai.interface import ModelWrapper, OptimizerWrapper

        if isinstance(model, ModelWrapper):
            if isinstance(optimizer, OptimizerWrapper):
                return model, optimizer  # boosted by the caller already
            raise ValueError(f"{self.name}: this model is boosted already; pass the optimizer boosted with it")
        if self.cpu_offload or self.name == "colossalai_gemini":
            optimizer = _as_hybrid_adam(optimizer)
        model, optimizer, *_ = self.booster.boost(model=model, optimizer=optimizer)
        return model, optimizer

    def check_ppo(self, offload_ref_reward: bool = False) -> None:
        """Gemini's ``auto`` placement records the first training iteration to plan chunk moves, and refuses
        inference before it; PPO generates first."""
        if self.name == "colossalai_gemini" and self.placement_policy == "auto":
            raise ValueError("PPO generates before its first training step, which colossalai_gemini with "
                             "--placement_policy auto cannot do; use --placement_policy static")

    @staticmethod
    def base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
        """The torch optimizer inside a boosted one (LR schedulers need a ``torch.optim.Optimizer``)."""
        return getattr(optimizer, "optim", optimizer)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.unwrap() if hasattr(model, "unwrap") else model

    @property
    def compute_precision(self) -> str | None:
        return None if self.precision == "fp32" else self.precision

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def inference_context(self, model: nn.Module):
        """Gemini keeps parameters in chunks that its parameter-op hooks gather on use: run the unwrapped
        module under those hooks and scatter afterwards, as Gemini's own no-grad forward does."""
        if not hasattr(model, "chunk_manager"):
            yield
            return
        from colossalai.tensor.param_op_hook import ColoParamOpHookManager

        if model.gemini_manager.need_warmup and model.gemini_manager.is_warmup():
            self.check_ppo()
        with ColoParamOpHookManager.use_hooks(*model.hooks):
            yield
        # only after a normal exit: chunk-state checks must not hide the error of a failed call
        if model.scatter_after_inference:
            model._post_forward()
        model.gemini_manager.reset_attributes()

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """ZeRO-2 and Gemini accumulate reduced gradient shards across micro-steps; Gemini "auto" cannot."""
        if self.name == "colossalai_gemini" and self.placement_policy == "auto":
            raise ValueError("colossalai_gemini with placement_policy auto cannot accumulate gradients; use "
                             "--accumulation_steps 1 or --placement_policy static")
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, model: nn.Module, optimizer: Any) -> None:
        if not hasattr(optimizer, "backward"):
            raise RuntimeError(f"{self.name}: the optimizer was not boosted; the trainer must call "
                               "strategy.prepare_optimizer(model, optimizer) and train the returned pair")
        self.booster.backward(loss, optimizer)

    def optimizer_step(self, optimizer: Any, model: nn.Module, scheduler: Any | None = None) -> float:
        """The plugin clips (``max_norm``) and skips overflowed fp16 steps inside ``step``."""
        optimizer.step()
        norm = optimizer.get_grad_norm() if hasattr(optimizer, "get_grad_norm") else None
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        return float("nan") if norm is None else float(norm)

    # ----- checkpoints ----------------------------------------------------------------------------------
    def _full_state(self, model: nn.Module, only_rank0: bool) -> dict[str, torch.Tensor]:
        """All ranks: the model's full fp32 state dict (gathered by the plugin)."""
        if hasattr(model, "_force_wait_all_gather"):
            model._force_wait_all_gather()
        if self.name == "colossalai_gemini" and hasattr(model, "unwrap"):
            state = model.state_dict(only_rank_0=only_rank0)
        else:
            state = self.unwrap(model).state_dict()
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        return {k: (v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu())
                for k, v in state.items()}

    def save_model(self, model: nn.Module, path: str | os.PathLike, tokenizer: Any = None,
                   merge_lora: bool = False, exact: bool = False) -> None:
        from .fsdp import plain_replica

        if not hasattr(model, "unwrap"):
            return super().save_model(model, path, tokenizer=tokenizer, merge_lora=merge_lora, exact=exact)
        state = self._full_state(model, only_rank0=True)
        if self.is_rank0():
            with atomic_dir(path) as tmp:
                plain_replica(self.unwrap(model), state).save_pretrained(tmp, tokenizer=tokenizer,
                                                                         merge_lora=merge_lora, exact=exact)
        self.barrier()

    def load_model(self, model: nn.Module, path: str | os.PathLike) -> None:
        from .fsdp import plain_replica

        if not hasattr(model, "unwrap"):
            return super().load_model(model, path)
        if self.name == "colossalai_gemini":
            replica = plain_replica(self.unwrap(model), self._full_state(model, only_rank0=False))
            replica.load_weights(path)
            model.load_state_dict(replica.state_dict(), strict=False)
            return
        if hasattr(model, "_force_wait_all_gather"):
            model._force_wait_all_gather()
        self.unwrap(model).load_weights(path)
        if hasattr(model, "update_master_params"):
            model.update_master_params()  # the fp32 masters the optimizer steps on


def plugin_spec(name: str, precision: str, grad_clip: float | None, cpu_offload: bool,
                placement_policy: str) -> tuple[str, dict[str, Any]]:
    """The Booster plugin class (by name in ``colossalai.booster.plugin``) and its arguments for a strategy."""
    if name == "colossalai_gemini":
        static = placement_policy == "static"
        kwargs: dict[str, Any] = dict(placement_policy=placement_policy, precision=precision,
                                      max_norm=grad_clip or 0.0, initial_scale=2 ** 16,
                                      enable_gradient_accumulation=static)
        if static and cpu_offload:
            kwargs["offload_optim_frac"] = 1.0
        return "GeminiPlugin", kwargs
    return "LowLevelZeroPlugin", dict(stage=2, precision=precision, max_norm=grad_clip or 0.0,
                                      initial_scale=2 ** 16, cpu_offload=cpu_offload)


def hybrid_adam_args(optimizer: torch.optim.Optimizer) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``HybridAdam(groups, **kwargs)`` arguments equal to an AdamW / Adam's parameter groups and settings."""
    if not isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)):
        raise ValueError(f"ColossalAI offload / Gemini needs an Adam optimizer, got {type(optimizer).__name__}")
    groups = [{k: v for k, v in g.items() if k in ("params", "lr", "betas", "eps", "weight_decay")}
              for g in optimizer.param_groups]
    return groups, {"adamw_mode": isinstance(optimizer, torch.optim.AdamW)}


def _as_hybrid_adam(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    from colossalai.nn.optimizer import CPUAdam, FusedAdam, HybridAdam

    if isinstance(optimizer, (HybridAdam, CPUAdam, FusedAdam)):
        return optimizer
    groups, kwargs = hybrid_adam_args(optimizer)
    return HybridAdam(groups, **kwargs)
