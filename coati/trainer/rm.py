"""Stage 2: reward-model training on (chosen, rejected) pairs."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..dataset.packing import is_packed, last_token_flat_index, model_inputs
from ..models.loss import LogExpLoss, LogSigLoss
from .base import SupervisedTrainer

LOSSES = {"log_sig": LogSigLoss, "log_exp": LogExpLoss}


def _pad_to(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value)


class RewardModelTrainer(SupervisedTrainer):
    """``model`` is a ``RewardModel``; batches come from ``RewardDataset`` + ``RewardCollator`` (or
    ``PackingRewardCollator``: the 2B sequences packed into rows, each scored at its own last token).

    Chosen and rejected sequences go through the model as one concatenated batch (one forward, not two).
    Eval reports pairwise accuracy (chosen scored above rejected) and the mean margin.
    """

    stage = "rm"
    watched = ("acc", 1.0)

    def __init__(self, model, strategy, train_dataloader, eval_dataloader=None, *, loss_fn: str = "log_sig",
                 margin: float = 0.0, **kwargs: Any) -> None:
        super().__init__(model, strategy, train_dataloader, eval_dataloader, **kwargs)
        if loss_fn not in LOSSES:
            raise ValueError(f"loss_fn must be one of {sorted(LOSSES)}, got {loss_fn!r}")
        self.loss_fn = LOSSES[loss_fn](margin=margin)

    @staticmethod
    def count_units(batch: dict[str, Any]) -> torch.Tensor:
        if is_packed(batch):
            return torch.tensor(batch["packed"].num_samples // 2)
        return torch.tensor(batch["chosen_input_ids"].shape[0])

    @staticmethod
    def token_counts(batch: dict[str, Any]) -> tuple[int, int]:
        if is_packed(batch):
            return SupervisedTrainer.token_counts(batch)
        # both sides run padded to the longer of the two
        width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        real = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
        return real, 2 * batch["chosen_input_ids"].shape[0] * width

    def rewards(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if is_packed(batch):
            n = batch["packed"].num_samples // 2
            last = last_token_flat_index(batch["packed"].sample_ids, 2 * n)
            reward = self.model(batch["input_ids"], **model_inputs(batch), last_index=last).float()
            return reward[:n], reward[n:]
        n = batch["chosen_input_ids"].shape[0]
        length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        ids = torch.cat([_pad_to(batch["chosen_input_ids"], length, 0),
                         _pad_to(batch["rejected_input_ids"], length, 0)])
        mask = torch.cat([_pad_to(batch["chosen_attention_mask"], length, 0),
                          _pad_to(batch["rejected_attention_mask"], length, 0)])
        reward = self.model(ids, attention_mask=mask).float()
        return reward[:n], reward[n:]

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        chosen, rejected = self.rewards(batch)
        n = chosen.shape[0]
        loss_sum = self.loss_fn(chosen, rejected) * n
        metrics = {"acc": float((chosen > rejected).float().sum()),
                   "margin": float((chosen - rejected).detach().sum())}
        return loss_sum, torch.tensor(n), metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        device = self.strategy.device
        sums = torch.zeros(4, device=device)  # loss_sum, correct, margin_sum, pairs
        for batch, keep in self.eval_batches():
            with self.strategy.autocast():
                chosen, rejected = self.rewards(batch)
            chosen, rejected = chosen[keep], rejected[keep]  # without the repeated samples
            n = chosen.shape[0]
            if n == 0:
                continue
            sums += torch.stack([self.loss_fn(chosen, rejected).detach() * n,
                                 (chosen > rejected).float().sum(), (chosen - rejected).sum(),
                                 torch.tensor(float(n), device=device)])
        sums = self.strategy.all_reduce(sums, op="sum")
        pairs = sums[3].clamp(min=1)
        return {"loss": float(sums[0] / pairs), "acc": float(sums[1] / pairs), "margin": float(sums[2] / pairs)}
