"""The Strategy interface: who owns devices, processes, precision, sharding and checkpoints.

Trainers never call ``torch.distributed`` themselves; they ask the strategy. ``Strategy`` implements the
single-process behaviour; subclasses override what distribution changes.
"""
from __future__ import annotations

import contextlib
import math
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ...errors import UserError
from ..optim import fused_backward, fused_grad_norm, is_fused

PRECISIONS = (None, "no", "bf16", "fp16")
SCALER_KEY = "grad_scaler"  # the fp16 GradScaler's state inside the trainer state


class StrategyUnavailableError(UserError, RuntimeError):
    """A strategy whose backend (GPU, optional package, torch release) this machine lacks."""


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start part-way through an epoch (for exact resume).

    With ``num_replicas=1`` it is the single-process sampler, so naive and DDP runs see the same global
    order: rank r takes indices r, r+W, ... of one seeded permutation.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, shuffle: bool, seed: int,
                 drop_last: bool) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start_index = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start_index = self.start_index, 0
        return iter(indices[start:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class LengthGroupedSampler(ResumableSampler):
    """:class:`ResumableSampler` whose batches hold samples of similar length (``--group_by_length``): the
    epoch's seeded permutation is cut into groups of ``GROUP_BATCHES`` global batches (``batch_size`` x
    processes) and each group is sorted by decreasing length before rank r takes every W-th index, so each
    rank's micro-batch, and the micro-batches of one step across ranks, span a narrow range of lengths.
    The order is a function of (seed, epoch) only, so ``start_index`` resumes it exactly."""

    GROUP_BATCHES = 50  # as transformers' LengthGroupedSampler: enough mixing, still a narrow length range

    def __init__(self, dataset: Dataset, lengths: list[int], batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for {len(dataset)} samples")
        self.lengths, self.batch_size = list(lengths), batch_size

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.drop_last:
            order = order[: self.total_size]
        else:  # repeat from the start, as DistributedSampler does
            order = (order * math.ceil(self.total_size / max(n, 1)))[: self.total_size]
        group = self.GROUP_BATCHES * self.batch_size * self.num_replicas
        order = [i for s in range(0, len(order), group)
                 for i in sorted(order[s:s + group], key=lambda i: -self.lengths[i])]
        start, self.start_index = self.start_index, 0
        return iter(order[self.rank::self.num_replicas][start:])


def unpadded_samples(sampler: Any) -> int:
    """How many of this rank's samples are not padding: without ``drop_last`` a DistributedSampler repeats
    the first indices so every rank gets ``num_samples``, and the repeats are the last of each rank's share.
    Evaluation counts only the rest, so N processes report the numbers of one."""
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return len(sampler)
    real = math.ceil((len(sampler.dataset) - sampler.rank) / sampler.num_replicas)
    return max(0, min(sampler.num_samples, real))


class Strategy:
    """One process on CPU or one GPU. Subclasses: DDPStrategy, FSDPStrategy, ColossalAIStrategy."""

    name = "naive"
    tp_size = 1  # ranks holding slices of one model replica (tensor parallelism); the others are data-parallel

    def __init__(self, seed: int = 42, mixed_precision: str | None = None, grad_clip: float = 1.0) -> None:
        if mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of bf16, fp16 or none, got {mixed_precision!r}")
        self.seed = seed
        self.mixed_precision = None if mixed_precision == "no" else mixed_precision
        self.grad_clip = grad_clip
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0
        self.device = torch.device("cpu")
        self.scaler: torch.amp.GradScaler | None = None
        self.setup_distributed()
        self._setup_device()
        self.set_seed(seed)

    # ----- processes and devices -------------------------------------------------------------------
    def setup_distributed(self) -> None:
        """Single process: nothing to set up."""

    def _setup_device(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        if self.mixed_precision == "fp16":
            if self.device.type != "cuda":
                raise ValueError("fp16 mixed precision needs a GPU; use --mixed_precision bf16 on CPU")
            self.scaler = torch.amp.GradScaler("cuda")

    def set_seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def set_sampling_seed(self) -> None:
        """Seed this process with ``seed + dp_rank`` once every model is built (PPO calls it before its first
        rollout): ``set_seed`` gives every rank the same seed so models built from config start identical,
        but replicas sampling from one stream would draw the same response for the same prompt; the ranks of
        one tensor-parallel group must draw the same one."""
        self.set_seed(self.seed + self.dp_rank)

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: the processes that see different data (ranks of one tensor-parallel group see
        the same batches and sample the same responses)."""
        return self.world_size // self.tp_size

    @property
    def dp_rank(self) -> int:
        """This process's data-parallel replica, in ``range(dp_size)``."""
        return self.rank // self.tp_size

    def is_rank0(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        pass

    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    # ----- models and optimisation ----------------------------------------------------------------
    def prepare_model(self, model: nn.Module, trainable: bool = True) -> nn.Module:
        """Move to the device; frozen models are put in eval mode with gradients off."""
        model = model.to(self.device)
        if not trainable:
            model.eval()
            model.requires_grad_(False)
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def inference_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Around direct calls of the unwrapped ``model`` outside its forward (``generate``, scoring); only
        engines that keep parameters in their own storage (ColossalAI Gemini) need it."""
        return contextlib.nullcontext()

    def check_ppo(self, offload_ref_reward: bool = False) -> None:
        """Raise ``ValueError`` (one sentence naming the flag to change) where this strategy cannot run PPO as
        configured; the trainer and ``train_prompts.py`` call it before any model is loaded."""

    def prepare_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """Strategies that wrap model and optimizer together (ColossalAI's Booster) do it here."""
        return model, optimizer

    def base_optimizer(self, optimizer: Any) -> torch.optim.Optimizer:
        """The torch optimizer a scheduler should drive (unwrapped where ``prepare_optimizer`` wrapped it)."""
        return optimizer

    @property
    def compute_precision(self) -> str | None:
        """``bf16`` / ``fp16`` where trained models compute in low precision, None for fp32."""
        return self.mixed_precision

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mixed_precision is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Skip gradient synchronisation on accumulation micro-steps (DDP overrides)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if is_fused(optimizer):  # LOMO / AdaLomo: the step happens here (its own clipping and loss scale)
            return fused_backward(optimizer, loss)
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip and self.grad_clip > 0 else float("inf")
        if not params:
            return torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                       scheduler: Any | None = None) -> float:
        """Unscale, clip, step, zero the gradients; returns the pre-clip gradient norm."""
        if is_fused(optimizer):  # stepped inside backward: only the schedule moves on
            if scheduler is not None:
                scheduler.step()
            return fused_grad_norm(optimizer)
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        norm = self.clip_grad_norm(model)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        return float(norm)

    def setup_dataloader(self, dataset: Dataset, batch_size: int, *, shuffle: bool = True,
                         collate_fn: Callable | None = None, drop_last: bool = False, seed: int | None = None,
                         num_workers: int = 0, lengths: list[int] | None = None) -> DataLoader:
        """A loader over this data-parallel replica's share of ``dataset``; ``batch_size`` is per replica.
        ``lengths`` (one per sample) groups batches by length (:class:`LengthGroupedSampler`)."""
        kwargs = dict(num_replicas=self.dp_size, rank=self.dp_rank, shuffle=shuffle,
                      seed=self.seed if seed is None else seed, drop_last=drop_last)
        sampler = (ResumableSampler(dataset, **kwargs) if lengths is None
                   else LengthGroupedSampler(dataset, lengths, batch_size, **kwargs))
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                          drop_last=drop_last, num_workers=num_workers)

    # ----- checkpoints -----------------------------------------------------------------------------
    def save_model(self, model: nn.Module, path: str | os.PathLike, tokenizer: Any = None,
                   merge_lora: bool = False, exact: bool = False) -> None:
        """Write a ``save_pretrained`` directory on rank 0, atomically (temp dir, then rename); weights in the
        source checkpoint's dtype, or as held with ``exact`` (training checkpoints)."""
        unwrapped = self.unwrap(model)
        if self.is_rank0():
            with atomic_dir(path) as tmp:
                unwrapped.save_pretrained(tmp, tokenizer=tokenizer, merge_lora=merge_lora, exact=exact)
        self.barrier()

    def load_model(self, model: nn.Module, path: str | os.PathLike) -> None:
        """Load weights written by ``save_model`` into ``model`` in place, on every rank."""
        self.unwrap(model).load_weights(path)

    def save_state(self, path: str | os.PathLike, state: dict[str, Any]) -> None:
        """Save optimizer / scheduler / progress state and the fp16 loss scale (rank 0) plus every rank's RNG
        state, as tensors and plain values only (``load_state`` reads them with ``weights_only=True``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.is_rank0():
            torch.save(self._with_scaler(state), path / "state.pt")
        torch.save(rng_state(), path / f"rng_rank{self.rank}.pt")
        self.barrier()

    def check_resume(self, path: str | os.PathLike) -> None:
        """Raise a UserError where the trainer state in ``path`` cannot be loaded by this strategy as configured
        (scripts call it before any model loads); states of unsharded strategies load anywhere."""

    def load_state(self, path: str | os.PathLike) -> dict[str, Any]:
        path = Path(path)
        state = self._restore_scaler(load_plain(path / "state.pt"))
        rng_file = path / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            set_rng_state(load_plain(rng_file))
        return state

    def _with_scaler(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` plus the fp16 GradScaler's scale and growth tracker, so a resumed run scales (and skips
        overflowed steps) exactly as the uninterrupted one."""
        if self.scaler is None:
            return state
        return {**state, SCALER_KEY: self.scaler.state_dict()}

    def _restore_scaler(self, state: dict[str, Any]) -> dict[str, Any]:
        saved = state.pop(SCALER_KEY, None)
        if self.scaler is not None and saved:
            self.scaler.load_state_dict(saved)
        return state


def load_plain(file: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True``: a checkpoint is tensors and plain values, never pickled objects
    (unpickling one can run any code, so a checkpoint someone hands you could)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise ValueError(f"{file}: refused: it holds a pickled Python object{what}, not only tensors and plain "
                         "values, and loading it could run code; resume from a checkpoint this version of coati "
                         "wrote") from None


def rng_state() -> dict[str, Any]:
    """This process's Python, numpy, torch (and CUDA) generator states as tensors and plain values."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": {"version": version, "keys": list(keys), "gauss": gauss},
             "numpy": {"kind": kind, "keys": np_keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["keys"]), py["gauss"]))
    np.random.set_state((npy["kind"], np.array(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp dir beside ``path`` to write into; publish it only once the writer finished.

    A new ``path`` appears by one rename. An existing ``path`` (e.g. a save dir holding checkpoints/ and
    metrics.jsonl) receives each written entry by rename, so no reader ever sees a half-written file and
    nothing else in it is touched. On error the temp dir is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        os.replace(tmp, path)
        return
    for entry in tmp.iterdir():
        dest = path / entry.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(entry, dest)
    tmp.rmdir()


class NaiveStrategy(Strategy):
    """One process on CPU or one GPU: the base Strategy as it is."""
