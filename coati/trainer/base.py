"""The supervised training loop shared by SFT and reward-model training, and checkpoint helpers.

One optimizer step = ``accumulation_steps`` micro-batches on every process. Losses are normalised by
the *global* count of the step (target tokens for SFT, pairs for RM), so a DDP run with per-process
batch B/W gives the same numbers as one process with batch B, and accumulation does not re-weight
short samples.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from torch.optim.lr_scheduler import LambdaLR

from ..dataset.packing import PackedLayout, batch_token_counts
from ..errors import CheckpointError, MissingInputError, UsageError
from ..utils.flops import device_peak_tflops
from .callbacks import MetricsLogger, logger
from .config import TrainConfig
from .optim import make_optimizer
from .strategies import Strategy
from .strategies.base import unpadded_samples

CHECKPOINTS = "checkpoints"


# ----- checkpoints ------------------------------------------------------------------------------------

def checkpoint_dir(save_path: str | os.PathLike, step: int) -> Path:
    return Path(save_path) / CHECKPOINTS / f"step_{step}"


# Files up to this size get their CRCs checked at resume (trainer state, RNG, a small model's optimizer); a
# larger optimizer state gets its zip directory checked, and a flipped byte inside it is found when it loads.
_CRC_CHECKED_BYTES = 2 ** 30


def damaged_file(checkpoint: Path) -> str | None:
    """The first file of ``checkpoint`` that cannot be read whole, with what is wrong, or None. Checks what is
    cheap to check without loading: a safetensors file's header and that its data ends where the file does, a
    torch zip file's CRCs, a JSON file's syntax. Coati writes checkpoints atomically; this catches what happens
    to them afterwards (a copy cut short, a full disk, another tool)."""
    for file in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        try:
            if file.suffix == ".safetensors":
                with open(file, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    if size > file.stat().st_size - 8:
                        return f"{file}: its header claims {size} bytes, more than the file holds"
                    header = json.loads(f.read(size))
                ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
                if 8 + size + max(ends, default=0) != file.stat().st_size:
                    return f"{file}: {file.stat().st_size} bytes where its header describes {8 + size + max(ends)}"
            elif file.suffix in (".pt", ".bin") and zipfile.is_zipfile(file):
                with zipfile.ZipFile(file) as z:  # its directory: a file cut short fails here
                    bad = z.testzip() if file.stat().st_size <= _CRC_CHECKED_BYTES else None
                if bad is not None:
                    return f"{file}: member {bad} fails its CRC"
            elif file.suffix == ".pt":
                return f"{file}: not a torch zip file"
            elif file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, zipfile.BadZipFile) as err:
            return f"{file}: {err}"
    return None


def _checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under ``root`` (temp dirs of interrupted saves are not), oldest first."""
    steps = [(int(p.name.split("_")[1]), p) for p in root.glob("step_*")
             if p.is_dir() and p.name.split("_")[1].isdigit() and (p / "trainer_state" / "state.pt").exists()]
    return [p for _, p in sorted(steps)]


def latest_checkpoint(save_path: str | os.PathLike, *, intact: bool = False) -> Path | None:
    """The complete checkpoint with the highest step (temp dirs of interrupted saves are ignored); with
    ``intact``, the highest one :func:`damaged_file` finds nothing wrong with, warning about each it skips."""
    for path in reversed(_checkpoints(Path(save_path) / CHECKPOINTS)):
        problem = damaged_file(path) if intact else None
        if problem is None:
            return path
        logger.warning("skipping damaged checkpoint %s (%s); trying the one before it", path, problem)
    return None


def resolve_resume(resume: str | os.PathLike | None, save_path: str | os.PathLike | None) -> Path | None:
    """``--resume`` alone means the newest intact checkpoint under save_path (a damaged newer one is skipped
    with a warning); a path names one checkpoint, and a damaged one is an error naming the damaged file and the
    newest intact checkpoint beside it."""
    if resume in (None, False, ""):
        return None
    if resume in (True, "latest"):
        if save_path is None:
            raise UsageError("--resume without a path needs --save_path")
        found = latest_checkpoint(save_path, intact=True)
        if found is None:
            raise MissingInputError(f"--resume: no intact checkpoint under {Path(save_path) / CHECKPOINTS}")
        return found
    path = Path(resume)
    if not (path / "trainer_state" / "state.pt").exists():
        found = latest_checkpoint(path, intact=True)
        if found is None:
            raise MissingInputError(f"--resume: {path} holds no intact trainer_state/state.pt")
        return found
    problem = damaged_file(path)
    if problem is not None:
        other = latest_checkpoint(path.parent.parent, intact=True) if path.parent.name == CHECKPOINTS else None
        hint = f"; the newest intact checkpoint is {other}" if other is not None else ""
        raise CheckpointError(f"--resume {path}: damaged, {problem}{hint}")
    return path


def save_checkpoint(strategy: Strategy, path: Path, models: dict[str, nn.Module], state: dict[str, Any],
                    tokenizer: Any = None, keep: int = 0) -> None:
    """Models (HF dirs, weights exactly as held: fp32 masters) + trainer state into ``path``, built in
    ``path.tmp`` and renamed when complete; then, with ``keep``, only the newest ``keep`` checkpoints beside it
    stay (``path`` among them: it is removed only once complete, so never the one being written)."""
    tmp = path.with_name(path.name + ".tmp")
    if strategy.is_rank0() and tmp.exists():
        shutil.rmtree(tmp)
    strategy.barrier()
    try:
        for name, model in models.items():
            strategy.save_model(model, tmp / name, tokenizer=tokenizer, exact=True)
        strategy.save_state(tmp / "trainer_state", state)
    except Exception as err:  # a full disk, a lost mount: the previous checkpoints stay as they are
        shutil.rmtree(tmp, ignore_errors=True)
        # torch.save reports a short write as RuntimeError, safetensors as its SafetensorError
        if not isinstance(err, (OSError, RuntimeError)) and type(err).__name__ != "SafetensorError":
            raise
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise CheckpointError(f"could not write checkpoint {path} ({reason}); the checkpoints before it are "
                              f"intact") from None
    strategy.barrier()
    if strategy.is_rank0():
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        for old in _checkpoints(path.parent)[:-keep] if keep else []:
            if old != path:
                shutil.rmtree(old)
    strategy.barrier()


class LRSchedule:
    """LR multiplier of optimizer step ``step`` for LambdaLR: transformers' cosine / linear / constant schedules
    after a linear warmup over ``ceil(total * warmup_ratio)`` steps, cosine and linear reaching 0 at ``total``
    (the same floats as ``get_cosine_schedule_with_warmup`` and ``get_linear_schedule_with_warmup``, without
    importing ``transformers.optimization``, which pulls in peft and bitsandbytes). ``total`` is an attribute
    because the RL trainer corrects it when an episode trains fewer steps than planned (dynamic sampling);
    LambdaLR's state_dict saves an object's attributes, so a resumed run keeps the corrected one."""

    def __init__(self, total: int, warmup_ratio: float, kind: str) -> None:
        self.total, self.warmup_ratio, self.kind = total, warmup_ratio, kind

    def __call__(self, step: int) -> float:
        warmup = math.ceil(self.total * self.warmup_ratio)
        if step < warmup:
            return float(step) / float(max(1, warmup))
        if self.kind == "constant":
            return 1.0
        progress = float(step - warmup) / float(max(1, max(1, self.total) - warmup))
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def epoch_iter(loader: DataLoader, epoch: int = 0, start_batch: int = 0) -> Iterator:
    """Batches of ``loader``'s epoch ``epoch`` from batch ``start_batch`` on, without touching the global RNG.

    Creating a DataLoader iterator draws its base seed from torch's generator; drawn after a resume restored
    that generator, it would shift every later dropout mask against the uninterrupted run.
    """
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    skip = start_batch
    if hasattr(sampler, "start_index"):
        sampler.start_index = start_batch * loader.batch_size
        skip = 0
    with torch.random.fork_rng(devices=[]):
        it = iter(loader)
    for _ in range(skip):
        next(it)
    return it


def _groups(iterable: Iterable, size: int) -> Iterable[list]:
    group: list = []
    for item in iterable:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) or isinstance(v, PackedLayout) else v)
            for k, v in batch.items()}


def accumulate_metrics(sums: dict[str, list[float]], extra: dict[str, Any], count: Any) -> None:
    """Add a micro-batch's metrics: a float is a sum over the micro-batch's ``count`` units, a
    ``(sum, count)`` tuple a sum over its own units (e.g. KTO's desirable samples only)."""
    for k, v in extra.items():
        num, den = v if isinstance(v, tuple) else (v, count)
        acc = sums.setdefault(k, [0.0, 0.0])
        acc[0] += float(num)
        acc[1] += float(den)


def reduce_metrics(strategy: Strategy, sums: dict[str, list[float]]) -> dict[str, float]:
    """Global means of accumulated metric sums (one all-reduce); a metric no process saw any unit of is left out."""
    if not sums:
        return {}
    keys = sorted(sums)  # the same order on every rank
    total = strategy.all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=strategy.device),
                                op="sum")
    return {k: float(num / den) for k, (num, den) in zip(keys, total.tolist()) if den > 0}


# ----- the loop -------------------------------------------------------------------------------------------

class SupervisedTrainer:
    """Epochs over a dataloader with accumulation, clipping, warmup+cosine, eval, logging and resume.

    Subclasses define ``compute_loss(batch) -> (loss_sum, count, metrics)`` where ``loss_sum`` is the
    summed loss of the micro-batch and ``count`` the number of units it sums over, and ``evaluate()``.
    Metrics are sums too (see :func:`accumulate_metrics`); they are logged as global means.
    ``perf/throughput`` counts real (non-pad) tokens the model ran on per second per process (a prompt a
    packed pair shares counts once), ``perf/padding_share`` the share of pad slots among all token slots the
    model ran on since the last log (0 for packed rows without a pad tail), ``perf/mfu`` (trainers that count
    :meth:`model_flops`, on a device with a known peak: :func:`coati.utils.flops.device_peak_tflops`) the
    model FLOPs per second per process over that peak.
    """

    stage = "train"
    watched = ("loss", -1.0)  # the eval metric early stopping watches, and its sign (-1: lower is better)

    def __init__(self, model: nn.Module, strategy: Strategy, train_dataloader: DataLoader,
                 eval_dataloader: DataLoader | None = None, *, train_config: TrainConfig | None = None,
                 optimizer: torch.optim.Optimizer | None = None, tokenizer: Any = None, merge_lora: bool = False,
                 run_config: dict[str, Any] | None = None, **overrides: Any) -> None:
        """``overrides``: :class:`TrainConfig` fields by name (``lr=1e-5``), replacing those of ``train_config``."""
        self.train_config = config = dataclasses.replace(train_config or TrainConfig(), **overrides)
        self.strategy = strategy
        self.train_dataloader = train_dataloader
        self.eval_dataloader = eval_dataloader
        self.steps_per_epoch = math.ceil(len(train_dataloader) / config.accumulation_steps)
        self.total_steps = self.steps_per_epoch * config.max_epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        optimizer = optimizer or make_optimizer(config.optim, model, config.lr, config.weight_decay, strategy=strategy,
                                                accumulation_steps=config.accumulation_steps)
        self.model, self.optimizer = strategy.prepare_optimizer(model, optimizer)
        self.scheduler = LambdaLR(strategy.base_optimizer(self.optimizer),
                                  LRSchedule(self.total_steps, config.warmup_ratio, config.lr_scheduler))
        self.tokenizer = tokenizer
        self.merge_lora = merge_lora
        self.global_step = 0
        self.epoch = 0
        self.micro_in_epoch = 0
        self.history: list[dict[str, float]] = []
        self.eval_history: list[dict[str, float]] = []
        self.metrics = MetricsLogger(config.log_dir or config.save_path, enabled=strategy.is_rank0(),
                                     use_tensorboard=config.use_tensorboard, use_wandb=config.use_wandb,
                                     config=run_config, console=tqdm.write)

    # ----- to be defined by subclasses ---------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def count_units(self, batch: dict[str, Any]) -> torch.Tensor:
        """How many units (tokens, pairs) the micro-batch's loss sums over; known before the forward."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    @staticmethod
    def token_counts(batch: dict[str, Any]) -> tuple[int, int]:
        """``(real tokens, token slots the model runs on)`` of a micro-batch, for the perf metrics."""
        return batch_token_counts(batch)

    def model_flops(self, batch: dict[str, Any]) -> float:
        """Model FLOPs of a micro-batch's training forward + backward, for ``perf/mfu``; 0 = not counted."""
        return 0.0

    # ----- checkpoint / resume ----------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        state = {"global_step": self.global_step, "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch,
                 "scheduler": self.scheduler.state_dict(), "history": self.history,
                 "eval_history": self.eval_history, "metrics_records": self.metrics.records}
        if self.train_config.need_optim_ckpt:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def save_checkpoint(self) -> Path:
        path = checkpoint_dir(self.train_config.save_path, self.global_step)
        save_checkpoint(self.strategy, path, {"model": self.model}, self._state(), tokenizer=self.tokenizer,
                        keep=self.train_config.save_total_limit)
        if self.strategy.is_rank0():
            logger.info("saved checkpoint %s", path)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.strategy.load_model(self.model, path / "model")
        state = self.strategy.load_state(path / "trainer_state")
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.global_step = state["global_step"]
        self.epoch = state["epoch"]
        self.micro_in_epoch = state["micro_in_epoch"]
        self.history = state.get("history", [])
        self.eval_history = state.get("eval_history", [])
        self.metrics.rewind(state.get("metrics_records"))
        if self.strategy.is_rank0():
            logger.info("resumed from %s at step %d (epoch %d)", path, self.global_step, self.epoch)

    # ----- main loop ----------------------------------------------------------------------------------
    def _train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        strategy, model = self.strategy, self.model
        device = strategy.device
        micro_batches = [to_device(b, device) for b in micro_batches]
        counts = [self.count_units(b).to(device, torch.float32) for b in micro_batches]
        global_count = strategy.all_reduce(torch.stack(counts).sum(), op="sum").clamp(min=1)
        # Gradient averaging over processes divides by world size; undo it so the step's gradient is the
        # sum over every unit in the global batch divided by the global unit count.
        scale = strategy.dp_size / global_count
        loss_total = torch.zeros((), device=device)
        sums: dict[str, list[float]] = {}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with strategy.no_sync(model) if not last else contextlib.nullcontext():
                with strategy.autocast():
                    loss_sum, count, extra = self.compute_loss(batch)
                strategy.backward(loss_sum * scale, model, self.optimizer)
            loss_total += loss_sum.detach().float()
            accumulate_metrics(sums, extra, count)
        grad_norm = strategy.optimizer_step(self.optimizer, model, self.scheduler)
        loss = strategy.all_reduce(loss_total, op="sum") / global_count
        metrics = {"loss": float(loss), "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm}
        metrics.update(reduce_metrics(strategy, sums))
        return metrics

    def fit(self, resume_from: str | os.PathLike | None = None) -> list[dict[str, float]]:
        """Train; returns the per-step metrics. ``resume_from`` is a checkpoint dir (see resolve_resume)."""
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self.model.train()
        loader, config = self.train_dataloader, self.train_config
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc=self.stage,
                   disable=not self.strategy.is_rank0(), dynamic_ncols=True)
        peak = device_peak_tflops(self.strategy.device)
        t_last, tokens_since = time.perf_counter(), torch.zeros(3, dtype=torch.float64)  # real, slots, flops
        while self.global_step < self.total_steps and not self.converged:
            for group in _groups(epoch_iter(loader, self.epoch, self.micro_in_epoch), config.accumulation_steps):
                tokens_since += torch.tensor([(*self.token_counts(b), self.model_flops(b) if peak else 0.0)
                                              for b in group], dtype=torch.float64).sum(0)
                metrics = self._train_step(group)
                self.micro_in_epoch += len(group)
                self.global_step += 1
                metrics["epoch"] = self.epoch + self.micro_in_epoch / max(1, len(loader))
                self.history.append({"step": self.global_step, **metrics})
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if self.global_step % config.log_interval == 0 or self.global_step == self.total_steps:
                    now = time.perf_counter()
                    real, slots, flops = self.strategy.all_reduce(tokens_since.to(self.strategy.device),
                                                                  op="sum").tolist()
                    per_s = 1.0 / max(now - t_last, 1e-9) / self.strategy.world_size
                    metrics["perf/throughput"] = real * per_s
                    metrics["perf/padding_share"] = 1.0 - real / max(slots, 1.0)
                    if peak and flops:
                        metrics["perf/mfu"] = flops * per_s / (peak * 1e12)
                    t_last, tokens_since = now, torch.zeros(3, dtype=torch.float64)
                    self.metrics.log(self.global_step, metrics)
                if config.eval_interval and self.global_step % config.eval_interval == 0:
                    self._run_eval()
                    if self.converged:
                        break
                if config.save_path and config.save_interval and self.global_step % config.save_interval == 0:
                    self.save_checkpoint()
                if self.global_step >= self.total_steps:
                    break
            if self.micro_in_epoch >= len(loader):
                self.epoch += 1
                self.micro_in_epoch = 0
                if not config.eval_interval:
                    self._run_eval()
        bar.close()
        if self.eval_dataloader is not None and (not self.eval_history
                                                 or self.eval_history[-1]["step"] != self.global_step):
            self._run_eval()
        if config.save_path:
            self.save_model(config.save_path)
        self.metrics.close()
        return self.history

    def eval_batches(self) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        """``(batch on the device, keep)`` over this rank's eval share; ``keep[i]`` is False for the samples the
        distributed sampler repeated to even out the ranks. Every rank still runs every batch (a sharded
        model's forward is collective); ``evaluate`` leaves the repeats out of its sums."""
        real = unpadded_samples(self.eval_dataloader.sampler)
        seen = 0
        for batch in epoch_iter(self.eval_dataloader):
            batch = to_device(batch, self.strategy.device)
            n = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
            yield batch, torch.arange(seen, seen + n, device=self.strategy.device) < real
            seen += n

    def _run_eval(self) -> None:
        if self.eval_dataloader is None:
            return
        self.model.eval()
        result = self.evaluate()
        self.model.train()
        self.eval_history.append({"step": self.global_step, **result})
        self.metrics.log(self.global_step, result, prefix="eval")
        if self.converged:
            logger.info("%s: held-out %s gained less than %g over its best in %d evaluations: stopping at step %d of "
                        "%d", self.stage, self.watched[0], self.train_config.early_stop_min_delta,
                        self.stale_evals, self.global_step, self.total_steps)

    @property
    def stale_evals(self) -> int:
        """Evaluations in a row, up to the last, whose watched metric did not beat the best before it by
        --early_stop_min_delta (read from ``eval_history``, which checkpoints keep)."""
        name, sign = self.watched
        best, stale = None, 0
        for record in self.eval_history:
            value = sign * record[name] if name in record else None
            progress = value is None or best is None or value >= best + self.train_config.early_stop_min_delta
            stale = 0 if progress else stale + 1
            best = value if best is None or (value is not None and value > best) else best
        return stale

    @property
    def converged(self) -> bool:
        """Early stopping (--early_stop_patience) has ended the run."""
        patience = self.train_config.early_stop_patience
        return bool(patience) and self.stale_evals >= patience

    def save_model(self, path: str | os.PathLike) -> None:
        """The final model as a ``save_pretrained`` dir; checkpoints under it are kept."""
        self.strategy.save_model(self.model, path, tokenizer=self.tokenizer, merge_lora=self.merge_lora)
