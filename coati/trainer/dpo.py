"""Direct preference optimisation on the supervised loop: DPO (and conservative DPO), IPO, KTO, ORPO, SimPO.

The policy is an :class:`~coati.models.Actor`. Paired batches (:class:`~coati.dataset.PreferenceCollator`)
put chosen and rejected rows in one concatenated forward; KTO batches
(:class:`~coati.dataset.UnpairedPreferenceCollator`) add a no-grad forward of the mismatched KL samples.
Log-probs are per-sequence sums over the labelled (response) tokens, computed only from the first labelled
position of the batch on.

The reference policy is, in this order: ``ref_model`` when given; precomputed log-probs
(``precompute_ref_logps``: one pass before training stored on the datasets, so training holds one model);
the policy with its LoRA adapter switched off; a frozen copy of the policy made at construction. ORPO and
SimPO use none and hold none. Dropout is off in policy and reference (as TRL does), so at step 0 the policy
equals its reference exactly.

Units: a pair for paired losses, a sample for KTO; each micro-batch's loss is a sum over its units and the
step divides by the global count (see :class:`~coati.trainer.base.SupervisedTrainer`). Metrics carry TRL's
names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected`` (summed log-probs), plus ``kl`` for KTO.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..dataset.packing import is_packed, model_inputs, sample_sums
from ..errors import UsageError
from ..models import preference_loss as pl
from ..models.lora import lora_train_bias
from ..models.utils import disable_dropout
from ..utils import IGNORE_INDEX
from ..utils.config import check_bounds, option
from .base import SupervisedTrainer, accumulate_metrics, reduce_metrics, to_device
from .strategies import Strategy

_GROUP = "preference loss"


# beta when none is given, per loss type, and where the value comes from
DEFAULT_BETA: dict[str, tuple[float, str]] = {
    "dpo": (0.1, "TRL default"),
    "ipo": (0.1, "TRL default"),
    "kto": (0.1, "TRL default"),
    "orpo": (0.1, "unused: --lambda_orpo weighs ORPO"),
    "simpo": (2.0, "SimPO paper, Llama-3-Base"),
}
SIMPO_GAMMA = 1.0  # SimPO paper, Llama-3-Base (gamma / beta = 0.5)


@dataclass(frozen=True)
class PreferenceConfig:
    """The loss and its hyper-parameters; each field is a ``train_dpo.py`` flag of the same name. ``beta`` and
    ``gamma`` left None take the loss type's own (:data:`DEFAULT_BETA`, :data:`SIMPO_GAMMA`): SimPO's reward is
    a per-token average log-prob, and its paper trains with a far larger beta than DPO's."""

    loss_type: str = option(
        "dpo", "dpo: sigmoid DPO (with --label_smoothing: conservative DPO); ipo: squared loss on token-averaged "
               "log-ratios; kto: unpaired desirable / undesirable samples (paired data is split); orpo: NLL + "
               "odds-ratio term; simpo: length-normalised margin. orpo and simpo load no reference model",
        choices=pl.LOSS_TYPES, group=_GROUP)
    beta: float | None = option(
        None, "inverse temperature of the implicit reward (IPO: its tau); unset: the loss type's own, "
              + ", ".join(f"{k} {v} ({source})" for k, (v, source) in DEFAULT_BETA.items()), bounds="> 0",
        group=_GROUP)
    label_smoothing: float = option(0.0, "assumed share of flipped labels (conservative DPO / SimPO)",
                                    bounds="[0, 0.5)", group=_GROUP)
    gamma: float | None = option(None, f"SimPO target reward margin; unset: {SIMPO_GAMMA} (SimPO paper, "
                                       "Llama-3-Base)", bounds=">= 0", group=_GROUP)
    lambda_orpo: float = option(0.1, "weight of ORPO's odds-ratio term", bounds=">= 0", group=_GROUP)
    sft_coef: float = option(0.0, "weight of an NLL term on chosen (KTO: desirable) responses, mean per token of "
                                  "each sequence (RPO); ORPO has its own NLL", bounds=">= 0", group=_GROUP)
    desirable_weight: float = option(1.0, "KTO weight of desirable samples", bounds=">= 0", group=_GROUP)
    undesirable_weight: float = option(1.0, "KTO weight of undesirable samples", bounds=">= 0", group=_GROUP)
    precompute_ref_logps: bool = option(False, "score every sample with the reference once before training and "
                                               "keep only the policy", group=_GROUP)

    def __post_init__(self) -> None:
        if self.loss_type not in pl.LOSS_TYPES:
            raise UsageError(f"loss_type={self.loss_type!r}; choose one of {pl.LOSS_TYPES}")
        if self.beta is None:
            object.__setattr__(self, "beta", DEFAULT_BETA[self.loss_type][0])
        if self.gamma is None:
            object.__setattr__(self, "gamma", SIMPO_GAMMA)
        check_bounds(self)

    @property
    def uses_reference(self) -> bool:
        return self.loss_type not in pl.REFERENCE_FREE


def _base_dataset(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> tuple[int, Any]:
        return idx, self.dataset[idx]


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed log-probs of the labelled tokens, their count)`` per row, fp32. The LM head runs only on the
    labelled positions (``Actor``'s ``labels``)."""
    logps = model(input_ids, attention_mask=attention_mask, labels=labels)
    return logps.sum(-1), labels[:, 1:].ne(IGNORE_INDEX).sum(-1).float()


def packed_sequence_logps(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_logps` of a packed batch (:class:`~coati.dataset.packing.PackingPreferenceCollator`):
    per-sample sums, in batch order, over the labelled tokens (a sample's first token carries no label, so
    no sample is scored on a token predicted from the one before it)."""
    ids, labels, layout = batch["input_ids"], batch["labels"], batch["packed"]
    sample_ids, n = layout.sample_ids[:, 1:], layout.num_samples
    logps = model(ids, labels=labels, **model_inputs(batch))  # 0 where unlabelled
    return sample_sums(logps, sample_ids, n), sample_sums(labels[:, 1:].ne(IGNORE_INDEX).float(), sample_ids, n)


def batch_logps(model: nn.Module, batch: dict[str, Any], prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-probs and label counts of a padded or (no prefix) packed batch."""
    if not prefix and is_packed(batch):
        return packed_sequence_logps(model, batch)
    return sequence_logps(model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
                          batch[f"{prefix}labels"])


class DPOTrainer(SupervisedTrainer):
    """``model`` is an ``Actor`` (prepared by the strategy); ``config`` picks the loss. See the module doc."""

    stage = "dpo"
    watched = ("rewards/accuracies", 1.0)

    def __init__(self, model: nn.Module, strategy: Strategy, train_dataloader: DataLoader,
                 eval_dataloader: DataLoader | None = None, *, ref_model: nn.Module | None = None,
                 config: PreferenceConfig | None = None, **kwargs: Any) -> None:
        self.config = config = config or PreferenceConfig()
        self.paired = config.loss_type != "kto"
        self.strategy = strategy
        self.model = model
        plain = strategy.unwrap(model)
        disable_dropout(plain)
        self.ref_model: nn.Module | None = None
        self.reference = "none"
        if not config.uses_reference:
            if ref_model is not None:
                raise ValueError(f"loss_type={config.loss_type} uses no reference model; pass none")
        else:
            if ref_model is not None:
                self.ref_model, self.reference = disable_dropout(ref_model), "model"
            elif getattr(plain, "lora_enabled", False):
                if lora_train_bias(plain.model) != "none":
                    raise ValueError("--lora_train_bias trains the base model's own biases, and the base with the "
                                     "adapter off is the DPO reference; use --lora_train_bias none, a separate "
                                     "reference model or --precompute_ref_logps")
                self.reference = "adapter_off"
            elif not config.precompute_ref_logps:
                self.ref_model = strategy.prepare_model(copy.deepcopy(plain), trainable=False)
                self.reference = "copy"
            else:
                self.reference = "policy"  # the policy itself, before it trains
            if config.precompute_ref_logps:
                for loader in (train_dataloader, eval_dataloader):
                    if loader is not None:
                        self.precompute_reference(loader)
                self.ref_model, self.reference = None, "precomputed"
        super().__init__(model, strategy, train_dataloader, eval_dataloader, **kwargs)

    # ----- reference ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _reference_logps(self, batch: dict[str, Any], prefix: str = "") -> torch.Tensor:
        key = f"ref_{prefix}logps"
        if key in batch:
            return batch[key].float()
        if self.reference == "precomputed":
            raise ValueError("precompute_ref_logps: the batch carries no reference log-probs")
        if self.ref_model is not None:
            return batch_logps(self.ref_model, batch, prefix)[0]
        if self.reference == "adapter_off":
            with self.strategy.unwrap(self.model).disable_adapter():
                return batch_logps(self.model, batch, prefix)[0]
        return batch_logps(self.model, batch, prefix)[0]  # "policy": only before training

    @torch.no_grad()
    def precompute_reference(self, loader: DataLoader) -> None:
        """Score every sample of ``loader``'s dataset with the reference once and store the log-probs on it;
        processes split the samples and share the results."""
        dataset = _base_dataset(loader.dataset)
        if getattr(dataset, "ref_logps", None) is not None:
            return
        collate = loader.collate_fn

        def indexed_collate(items):
            return torch.tensor([i for i, _ in items]), collate([item for _, item in items])

        scoring = self.strategy.setup_dataloader(_Indexed(dataset), loader.batch_size, shuffle=False,
                                                 collate_fn=indexed_collate)
        was_training = self.model.training
        self.model.eval()
        indices, values = [], []
        for idx, batch in scoring:
            batch = to_device(batch, self.strategy.device)
            with self.strategy.autocast():
                if self.paired:
                    logps = self._reference_logps(batch)
                    cols = torch.stack(logps.view(2, -1).unbind(0), dim=1)  # (B, [chosen, rejected])
                else:
                    cols = torch.stack([self._reference_logps(batch), self._reference_logps(batch, "kl_")], dim=1)
            indices += idx.tolist()
            values += cols.float().cpu().tolist()
        self.model.train(was_training)
        table = torch.zeros(len(dataset), 2)
        for part_idx, part_values in self.strategy.all_gather_object((indices, values)):
            table[torch.tensor(part_idx, dtype=torch.long)] = torch.tensor(part_values)
        dataset.set_ref_logps(table)

    # ----- loss -----------------------------------------------------------------------------------------
    def count_units(self, batch: dict[str, Any]) -> torch.Tensor:
        n = batch["packed"].num_samples if is_packed(batch) else batch["input_ids"].shape[0]
        return torch.tensor(n // 2 if self.paired else n)

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        logps, lengths = batch_logps(self.model, batch)
        if self.paired:
            return self._paired_loss(batch, logps, lengths)
        return self._kto_loss(batch, logps, lengths)

    def _paired_loss(self, batch, logps, lengths):
        cfg = self.config
        n = logps.shape[0] // 2
        (c, r), (lc, lr) = logps.split(n), lengths.split(n)
        if cfg.loss_type in ("dpo", "ipo"):
            rc, rr = self._reference_logps(batch).split(n)
            if cfg.loss_type == "dpo":
                losses = pl.dpo_loss(c, r, rc, rr, cfg.beta, cfg.label_smoothing)
            else:
                losses = pl.ipo_loss(c, r, rc, rr, lc, lr, cfg.beta)
            reward_c, reward_r = cfg.beta * (c - rc).detach(), cfg.beta * (r - rr).detach()
        elif cfg.loss_type == "orpo":
            losses = pl.orpo_loss(c / lc.clamp(min=1), r / lr.clamp(min=1), cfg.lambda_orpo)
            reward_c, reward_r = (cfg.lambda_orpo * (x / n_.clamp(min=1)).detach() for x, n_ in ((c, lc), (r, lr)))
        else:  # simpo
            losses = pl.simpo_loss(c / lc.clamp(min=1), r / lr.clamp(min=1), cfg.beta, cfg.gamma, cfg.label_smoothing)
            reward_c, reward_r = (cfg.beta * (x / n_.clamp(min=1)).detach() for x, n_ in ((c, lc), (r, lr)))
        if cfg.sft_coef:
            losses = losses + cfg.sft_coef * pl.sft_nll(c, lc)
        metrics = {"rewards/chosen": reward_c.sum(), "rewards/rejected": reward_r.sum(),
                   "rewards/accuracies": (reward_c > reward_r).float().sum(),
                   "rewards/margins": (reward_c - reward_r).sum(),
                   "logps/chosen": c.detach().sum(), "logps/rejected": r.detach().sum()}
        return losses.sum(), torch.tensor(n), metrics

    def _kto_loss(self, batch, logps, lengths):
        cfg = self.config
        with torch.no_grad():
            kl_logps = sequence_logps(self.model, batch["kl_input_ids"], batch["kl_attention_mask"],
                                      batch["kl_labels"])[0]
            ref_kl = self._reference_logps(batch, "kl_")
            # z0 over the micro-batch of every process (TRL: the mean over processes' batches), clamped at 0
            sums = self.strategy.all_reduce(torch.stack([(kl_logps - ref_kl).float().sum(),
                                                         torch.tensor(float(len(kl_logps)), device=kl_logps.device)]),
                                            op="sum")
            kl = (sums[0] / sums[1].clamp(min=1)).clamp(min=0)
        ref = self._reference_logps(batch)
        desirable = batch["desirable"].bool()
        losses = pl.kto_loss(logps, ref, desirable, kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
        if cfg.sft_coef:
            losses = losses + cfg.sft_coef * pl.sft_nll(logps, lengths) * desirable
        rewards = cfg.beta * (logps - ref).detach()
        good, bad = desirable.float(), (~desirable).float()
        metrics = {"rewards/chosen": ((rewards * good).sum(), good.sum()),
                   "rewards/rejected": ((rewards * bad).sum(), bad.sum()),
                   "logps/chosen": ((logps.detach() * good).sum(), good.sum()),
                   "logps/rejected": ((logps.detach() * bad).sum(), bad.sum()),
                   # every process holds the same z0: the mean over micro-batches
                   "kl": (kl / self.strategy.dp_size, 1.0 / self.strategy.dp_size)}
        return losses.sum(), torch.tensor(len(logps)), metrics

    def _train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        metrics = super()._train_step(micro_batches)
        _add_margin(metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and TRL's reward metrics over the eval set; ``rewards/accuracies`` is the share of held-out pairs
        whose chosen response gains more implicit reward than the rejected one."""
        sums: dict[str, list[float]] = {}
        loss_sum = count = 0.0
        for batch in self.eval_dataloader:
            batch = to_device(batch, self.strategy.device)
            with self.strategy.autocast():
                loss, n, extra = self.compute_loss(batch)
            loss_sum, count = loss_sum + float(loss), count + float(n)
            accumulate_metrics(sums, extra, n)
        sums["loss"] = [loss_sum, count]
        result = reduce_metrics(self.strategy, sums)
        _add_margin(result)
        return result


def _add_margin(metrics: dict[str, float]) -> None:
    """KTO's margin as TRL logs it: mean desirable reward minus mean undesirable reward."""
    if "kl" in metrics and "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
