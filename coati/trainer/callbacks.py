"""Where metrics go: a stdout line, ``metrics.jsonl``, and optionally tensorboard / wandb (rank 0 only)."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError

logger = logging.getLogger("coati")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


class MetricsLogger:
    """Writes one record per logged step. Non-rank-0 processes get a logger that does nothing."""

    def __init__(self, log_dir: str | os.PathLike | None, *, enabled: bool = True, use_tensorboard: bool = False,
                 use_wandb: bool = False, wandb_project: str = "coati", run_name: str | None = None,
                 config: dict[str, Any] | None = None, console: Any = None) -> None:
        self.enabled = enabled
        self.console = console  # e.g. tqdm.write, so lines don't break the progress bar
        self.jsonl = None
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(log_dir) / "metrics.jsonl", "a", encoding="utf-8")
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MissingDependencyError("--use_tensorboard needs tensorboard: pip install tensorboard") from None

            self.tb = SummaryWriter(log_dir=str(Path(log_dir or ".") / "tensorboard"))
        if use_wandb:
            try:
                import wandb
            except ImportError:  # pragma: no cover - optional dependency
                raise MissingDependencyError("--use_wandb needs wandb: pip install wandb") from None
            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config or {})

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, bool)) else v)
                 for k, v in metrics.items()}
        line = f"[{prefix}] step {step} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in clean.items())
        (self.console or print)(line)
        if self.jsonl is not None:
            record = {"step": step, "split": prefix}
            record.update({k: v for k, v in clean.items() if not (isinstance(v, float) and math.isnan(v))})
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in clean.items()}, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
