"""Pluggable strategies: naive, ddp, fsdp (torch FSDP2), colossalai_* (optional extra)."""
from __future__ import annotations

from .base import NaiveStrategy, Strategy
from .ddp import DDPStrategy

STRATEGIES = ("naive", "ddp", "fsdp", "colossalai_zero2", "colossalai_zero2_cpu", "colossalai_gemini")


def make_strategy(name: str, **kwargs) -> Strategy:
    """Build a strategy by its CLI name; heavy backends are imported only when asked for.

    ``zero_stage`` / ``cpu_offload`` / ``placement_policy`` configure the sharded strategies; naive and ddp
    refuse them when set (None / False mean unset), rather than silently not sharding; ``tp_size`` > 1 (tensor
    parallelism) is fsdp's alone.
    """
    sharding = {k: kwargs.pop(k) for k in ("zero_stage", "cpu_offload", "placement_policy") if k in kwargs}
    tp_size = kwargs.pop("tp_size", None)
    if tp_size not in (None, 1) and name != "fsdp":
        raise ValueError(f"--tp_size {tp_size} needs --strategy fsdp (tensor parallelism is composed with FSDP2), "
                         f"not {name}")
    if tp_size is not None and name == "fsdp":
        kwargs["tp_size"] = tp_size
    if "block_classes" in kwargs and name != "fsdp":
        raise ValueError(f"--fsdp_block applies only to --strategy fsdp, not {name}")
    if name in ("naive", "ddp"):
        given = [f"--{k}" for k, v in sharding.items() if v not in (None, False)]
        if given:
            raise ValueError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only to "
                             f"--strategy fsdp or colossalai_*, not {name}")
        return NaiveStrategy(**kwargs) if name == "naive" else DDPStrategy(**kwargs)
    if name == "fsdp":
        from .fsdp import FSDPStrategy

        return FSDPStrategy(**kwargs, **sharding)
    if name.startswith("colossalai_") and name in STRATEGIES:
        from .colossalai import ColossalAIStrategy

        return ColossalAIStrategy(name, **kwargs, **sharding)
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


def __getattr__(name: str):
    # FSDPStrategy / ColossalAIStrategy on demand, so importing coati never imports their backends
    if name == "FSDPStrategy":
        from .fsdp import FSDPStrategy

        return FSDPStrategy
    if name == "ColossalAIStrategy":
        from .colossalai import ColossalAIStrategy

        return ColossalAIStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Strategy", "NaiveStrategy", "DDPStrategy", "FSDPStrategy", "ColossalAIStrategy", "make_strategy",
           "STRATEGIES"]
