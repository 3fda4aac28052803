"""Model wrappers, model families, LoRA glue, losses and RLHF tensor helpers."""
from .base import Actor, Critic, RewardModel, packing_attention, load_causal_lm
from .families import (
    FAMILIES, BLOOMActor, BLOOMCritic, BLOOMRM, Family, GPTActor, GPTCritic, GPTNeoXActor, GPTNeoXCritic,
    GPTNeoXRM, GPTRM, LlamaActor, LlamaCritic, LlamaRM, OPTActor, OPTCritic, OPTRM, PolyglotKoActor,
    PolyglotKoCritic, PolyglotKoRM, get_family, lora_targets,
)
from .generation import action_mask_from_tokens, generate_with_masks
from .lora import LoraSettings, apply_lora, merge_lora
from .loss import GPTLMLoss, LogExpLoss, LogSigLoss, PolicyLoss, PtxLoss, ValueLoss
from .utils import (
    compute_approx_kl, compute_reward, disable_dropout, last_token_index, log_probs_from_logits, masked_mean,
    masked_whiten, position_ids_from_mask,
)

__all__ = [
    "Actor", "Critic", "RewardModel", "load_causal_lm", "packing_attention",
    "FAMILIES", "Family", "get_family", "lora_targets",
    "LlamaActor", "LlamaCritic", "LlamaRM", "GPTNeoXActor", "GPTNeoXCritic", "GPTNeoXRM",
    "PolyglotKoActor", "PolyglotKoCritic", "PolyglotKoRM", "GPTActor", "GPTCritic", "GPTRM",
    "OPTActor", "OPTCritic", "OPTRM", "BLOOMActor", "BLOOMCritic", "BLOOMRM",
    "LoraSettings", "apply_lora", "merge_lora",
    "GPTLMLoss", "PtxLoss", "LogSigLoss", "LogExpLoss", "PolicyLoss", "ValueLoss",
    "log_probs_from_logits", "masked_mean", "masked_whiten", "compute_approx_kl", "compute_reward",
    "position_ids_from_mask", "last_token_index", "disable_dropout",
    "generate_with_masks", "action_mask_from_tokens",
]
