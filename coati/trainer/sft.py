"""Stage 1: supervised fine-tuning with the LM loss on response tokens only."""
from __future__ import annotations

from typing import Any

import torch

from ..dataset.packing import model_inputs
from ..models.loss import GPTLMLoss
from ..utils import IGNORE_INDEX
from ..utils.flops import DecoderShape
from .base import SupervisedTrainer


class SFTTrainer(SupervisedTrainer):
    """``model`` is an ``Actor``; batches come from ``SFTDataset`` + ``SFTCollator`` (or ``PackingCollator``:
    packed rows, whose labels already leave out each sample's first token, so the token count is the same).

    The step loss is the mean over every target token of the global batch (see ``SupervisedTrainer``).
    """

    stage = "sft"

    def __init__(self, model, strategy, train_dataloader, eval_dataloader=None, **kwargs: Any) -> None:
        super().__init__(model, strategy, train_dataloader, eval_dataloader, **kwargs)
        self.loss_fn = GPTLMLoss()
        self._shape: DecoderShape | None = None  # read from the model when perf/mfu first needs it

    @staticmethod
    def count_units(batch: dict[str, Any]) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def model_flops(self, batch: dict[str, Any]) -> float:
        if self.strategy.unwrap(self.model).config.is_encoder_decoder:
            return 0.0  # DecoderShape counts a decoder-only LM: no MFU for T5 / BART
        if self._shape is None:
            self._shape = DecoderShape.of(self.strategy.unwrap(self.model))
        return self._shape.batch_flops(batch)

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        log_probs = self.model(batch["input_ids"], labels=batch["labels"], reduction="sum",
                               **model_inputs(batch))
        loss_sum = self.loss_fn.from_log_probs(log_probs, batch["labels"], reduction="sum")
        return loss_sum, self.count_units(batch), {}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        total = torch.zeros((), device=self.strategy.device)
        count = torch.zeros((), device=self.strategy.device)
        for batch, keep in self.eval_batches():
            batch["labels"] = batch["labels"].masked_fill(~keep[:, None], IGNORE_INDEX)  # repeats count no tokens
            with self.strategy.autocast():
                loss_sum, n, _ = self.compute_loss(batch)
            total += loss_sum.float()
            count += n
        total = self.strategy.all_reduce(total, op="sum")
        count = self.strategy.all_reduce(count, op="sum").clamp(min=1)
        loss = float(total / count)
        return {"loss": loss, "ppl": float(torch.exp(torch.tensor(min(loss, 50.0))))}
