"""PPO prompts, tokenized exactly like the prompt part of an SFT sample (same template, BOS and segments).

Over-long prompts (more than ``max_input_len`` tokens): ``overlong="skip"`` (default) drops them and counts
them in ``num_skipped``, because a prompt cut anywhere loses either its instruction or the template's
generation cue; ``overlong="truncate"`` keeps BOS plus the END of the prompt (the question and the
``### Response:`` cue survive, the start of a long context does not) and counts it in ``num_truncated``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from .common import as_tensor, check_choice, convert_all, finish, select_subset, source_name
from .formats import prompt_conversation
from .io import load_records
from .pretrain import PretrainDataset  # noqa: F401  (historical home of PretrainDataset)
from .templates import SegmentEncoder, join_segments, resolve_template


class PromptDataset(Dataset):
    """Items ``{"input_ids": LongTensor, "prompt": str, **extras}``; ``prompt`` is the rendered prompt text and
    extras are the record's other scalar fields (e.g. GSM8K ``answer``) for Python reward functions."""

    def __init__(self, path: Any, tokenizer, *, max_input_len: int = 256, max_datasets_size: int | None = None,
                 prompt_template: str = "auto", seed: int = 42, overlong: str = "skip", empty: str = "skip",
                 split: str = "train"):
        check_choice("overlong", overlong, ("skip", "truncate"))
        resolve_template(tokenizer, prompt_template)
        self.source = source_name(path)
        records = load_records(path, split=split)
        items, self.num_empty, first_empty = convert_all(records, lambda r: [prompt_conversation(r)], empty)
        items = select_subset(items, max_datasets_size, seed)
        segments = [conv.segments(tokenizer, prompt_template) for _, (conv, _) in items]
        encoder = SegmentEncoder(tokenizer)
        encoded = encoder.encode_many(segments, progress=len(segments) > 1000, desc="prompts")

        self.num_truncated = self.num_skipped = 0
        self.input_ids: list[torch.Tensor] = []
        self.prompts: list[str] = []
        self.extras: list[dict] = []
        eos_token = tokenizer.eos_token
        for (_, (_, extras)), segs, (ids, _) in zip(items, segments, encoded):
            if len(ids) > max_input_len:
                if overlong == "skip" or max_input_len < 2:
                    self.num_skipped += 1
                    continue
                keep_bos = encoder.bos_id is not None and ids[0] == encoder.bos_id
                ids = ids[:1] + ids[len(ids) - max_input_len + 1:] if keep_bos else ids[-max_input_len:]
                self.num_truncated += 1
            self.input_ids.append(as_tensor(ids))
            self.prompts.append(join_segments(segs, eos_token))
            self.extras.append(extras)
        finish(self, "prompt", self.source, len(self.input_ids), first_empty, max_input_len, "max_input_len")

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {**self.extras[idx], "input_ids": self.input_ids[idx], "prompt": self.prompts[idx]}
