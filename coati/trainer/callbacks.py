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
    """Writes one record per logged step. Non-rank-0 processes get a logger that does nothing.

    ``records`` counts the lines of ``metrics.jsonl``, those of earlier runs appended to included; a checkpoint
    stores it and a run resumed from that checkpoint calls :meth:`rewind`, so the records a killed run wrote after
    its last checkpoint are not followed by the resumed run's records of the same steps."""

    def __init__(self, log_dir: str | os.PathLike | None, *, enabled: bool = True, use_tensorboard: bool = False,
                 use_wandb: bool = False, wandb_project: str = "coati", run_name: str | None = None,
                 config: dict[str, Any] | None = None, console: Any = None) -> None:
        self.enabled = enabled
        self.console = console  # e.g. tqdm.write, so lines don't break the progress bar
        self.jsonl = None
        self.path: Path | None = None
        self.records = 0
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(log_dir) / "metrics.jsonl"
            if self.path.is_file():
                with open(self.path, "rb") as f:
                    self.records = sum(1 for _ in f)
            self.jsonl = open(self.path, "a", encoding="utf-8")
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
            self.records += 1
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in clean.items()}, step=step)

    def rewind(self, records: int | None) -> None:
        """Keep only the first ``records`` lines of metrics.jsonl (those written up to the checkpoint a run
        resumes from; None: a checkpoint from before it was counted, keep all). A line cut short by a kill is
        after them, so it goes too."""
        if self.jsonl is None or records is None or records >= self.records:
            return
        self.jsonl.close()
        with open(self.path, "rb") as f:
            kept = [line for _, line in zip(range(records), f)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, self.path)
        self.records = len(kept)
        self.jsonl = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
