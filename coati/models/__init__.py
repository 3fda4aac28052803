"""Model wrappers, model families, LoRA glue, losses and tensor helpers (Coati's 2023 names: :mod:`coati.compat`)."""
from .base import Actor, Critic, RewardModel, Seq2SeqActor, packing_attention
from .families import FAMILIES, Family, get_family, lora_targets
from .generation import action_mask_from_tokens, generate_with_masks
from .loading import load_causal_lm
from .lora import LoraSettings, apply_lora, merge_lora
from .loss import GPTLMLoss, LogExpLoss, LogSigLoss
from .utils import disable_dropout, last_token_index, masked_mean, position_ids_from_mask

__all__ = [
    "Actor", "Critic", "RewardModel", "Seq2SeqActor", "load_causal_lm", "packing_attention",
    "FAMILIES", "Family", "get_family", "lora_targets",
    "LoraSettings", "apply_lora", "merge_lora",
    "GPTLMLoss", "LogSigLoss", "LogExpLoss",
    "masked_mean", "position_ids_from_mask", "last_token_index", "disable_dropout",
    "generate_with_masks", "action_mask_from_tokens",
]
