"""Replay buffer: holds one collection phase of experiences and serves shuffled micro-batches.

Experiences are stored per sample so micro-batches can mix samples from different generation batches
(each re-padded only to its own longest prompt/response). With ``cpu_offload`` the stored tensors live
on the CPU between the collection and update phases (Coati's default), keeping accelerator memory for
the models.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from coati.experience.experience import Experience


class ReplayBuffer:
    """``append`` experiences, iterate ``micro_batches`` (shuffled), ``clear`` after each update phase.

    ``limit`` > 0 keeps only the most recent ``limit`` samples.
    """

    def __init__(self, pad_token_id: int = 0, cpu_offload: bool = True, limit: int = 0) -> None:
        self.pad_token_id = pad_token_id
        self.cpu_offload = cpu_offload
        self.limit = limit
        self.items: list[Experience] = []

    def append(self, experience: Experience) -> None:
        if self.cpu_offload:
            experience = experience.to("cpu")
        self.items.extend(experience.split())
        if self.limit > 0 and len(self.items) > self.limit:
            del self.items[: len(self.items) - self.limit]

    def clear(self) -> None:
        self.items.clear()

    def __len__(self) -> int:
        return len(self.items)

    def num_micro_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self.items)
        return n // batch_size if drop_last else -(-n // batch_size)

    def micro_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ) -> Iterator[Experience]:
        """Yield collated micro-batches of ``batch_size`` samples (the last may be smaller)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = len(self.items)
        order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if drop_last and len(idx) < batch_size:
                break
            batch = Experience.collate([self.items[i] for i in idx], self.pad_token_id)
            yield batch.to(device) if device is not None else batch
