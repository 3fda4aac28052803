"""Coati's 2023 names, for code written against it: the per-family constructors (``LlamaActor(pretrained=...)``,
``GPTNeoXRM(config=...)``, ...), ``PtxLoss``, ``PolicyLoss`` and the tensor helpers of ``coati.models.utils``;
and the flag spellings of commands written for Coati or for Hugging Face's Trainer (stanford_alpaca's
``train.py``), which the example scripts accept.

Nothing in coati imports this module (an import-linter contract says so): the library has one way to do each
thing, and these are the old spellings of it.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import torch
import torch.nn as nn

from .models import base
from .utils.config import str2bool
from .models.lora import LoraSettings
from .models.loss import GPTLMLoss
from .models.utils import masked_mean
from .rl.kl import kl_estimate
from .rl.losses import ppo_clip_loss


def _coati_constructor(kind: str, family: str) -> Callable[..., Any]:
    def build(pretrained: str | None = None, config: Any = None, checkpoint: bool = False,
              lora_rank: int = 0, lora_train_bias: str = "none", **kwargs: Any):
        cls = getattr(base, kind)
        lora = LoraSettings(rank=lora_rank, train_bias=lora_train_bias)
        if pretrained is not None:
            return cls.from_pretrained(pretrained, family=family, lora=lora, grad_checkpoint=checkpoint, **kwargs)
        if config is not None:
            return cls.from_config(config, family=family, lora=lora, grad_checkpoint=checkpoint)
        raise ValueError(f"{build.__name__} needs `pretrained` (a path) or `config` (a transformers config)")

    prefix = {"llama": "Llama", "gpt_neox": "GPTNeoX", "polyglot_ko": "PolyglotKo", "gpt2": "GPT",
              "opt": "OPT", "bloom": "BLOOM"}[family]
    suffix = {"Actor": "Actor", "Critic": "Critic", "RewardModel": "RM"}[kind]
    build.__name__ = build.__qualname__ = prefix + suffix
    build.__doc__ = (f"Coati-compatible constructor: a :class:`coati.models.{kind}` of family {family!r} from "
                     f"``pretrained`` (path) or ``config``; ``checkpoint`` enables gradient checkpointing; "
                     f"``lora_rank`` > 0 adds LoRA (alpha = rank) with peft ``bias=lora_train_bias``.")
    return build


LlamaActor = _coati_constructor("Actor", "llama")
LlamaCritic = _coati_constructor("Critic", "llama")
LlamaRM = _coati_constructor("RewardModel", "llama")
GPTNeoXActor = _coati_constructor("Actor", "gpt_neox")
GPTNeoXCritic = _coati_constructor("Critic", "gpt_neox")
GPTNeoXRM = _coati_constructor("RewardModel", "gpt_neox")
PolyglotKoActor = _coati_constructor("Actor", "polyglot_ko")
PolyglotKoCritic = _coati_constructor("Critic", "polyglot_ko")
PolyglotKoRM = _coati_constructor("RewardModel", "polyglot_ko")
GPTActor = _coati_constructor("Actor", "gpt2")
GPTCritic = _coati_constructor("Critic", "gpt2")
GPTRM = _coati_constructor("RewardModel", "gpt2")
OPTActor = _coati_constructor("Actor", "opt")
OPTCritic = _coati_constructor("Critic", "opt")
OPTRM = _coati_constructor("RewardModel", "opt")
BLOOMActor = _coati_constructor("Actor", "bloom")
BLOOMCritic = _coati_constructor("Critic", "bloom")
BLOOMRM = _coati_constructor("RewardModel", "bloom")

COATI_CONSTRUCTORS: dict[str, Callable[..., Any]] = {
    f.__name__: f for f in [
        LlamaActor, LlamaCritic, LlamaRM, GPTNeoXActor, GPTNeoXCritic, GPTNeoXRM,
        PolyglotKoActor, PolyglotKoCritic, PolyglotKoRM, GPTActor, GPTCritic, GPTRM,
        OPTActor, OPTCritic, OPTRM, BLOOMActor, BLOOMCritic, BLOOMRM,
    ]
}


class PtxLoss(GPTLMLoss):
    """PPO-ptx's language-modelling loss: :class:`~coati.models.loss.GPTLMLoss`."""


class PolicyLoss(nn.Module):
    """PPO clipped surrogate, per-sequence token mean then batch mean (:func:`coati.rl.losses.ppo_clip_loss`).
    Metrics as Coati named them: ``clip_frac`` and ``approx_kl`` (``ratio - 1 - log ratio``)."""

    def __init__(self, clip_eps: float = 0.2) -> None:
        super().__init__()
        self.clip_eps = clip_eps

    def forward(self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = torch.ones_like(log_probs) if action_mask is None else action_mask
        loss, metrics = ppo_clip_loss(log_probs, old_log_probs, advantages, mask, clip_low=self.clip_eps)
        return loss, {"clip_frac": metrics["pg_clipfrac"], "approx_kl": metrics["ppo_kl"]}


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under ``logits`` (``(..., V)`` and ``(...)`` -> ``(...)``), in fp32.

    Computed as ``logit[label] - logsumexp(logits)`` so the full ``log_softmax`` tensor is never kept
    for backward beyond what ``logsumexp`` needs.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor | None, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to zero mean / unit variance using only masked entries (used for advantages).

    With ``shift_mean=False`` the mean is added back (scale-only whitening, e.g. for rewards).
    Entries outside the mask are transformed too; callers mask them afterwards.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def compute_approx_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
                      action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Non-negative, unbiased KL(pi || ref) estimate ``exp(r) - 1 - r`` with ``r = ref - logp`` ("k3").

    Returns per-token values ``(B, A)`` without a mask, or the per-sequence masked mean ``(B,)`` with one
    (the form logged as ``kl``).
    """
    kl = kl_estimate(log_probs, ref_log_probs, "k3")
    if action_mask is None:
        return kl
    return masked_mean(kl, action_mask, dim=-1)


# Coati's flag spellings: a misspelling its README used and the June-2023 names of two PPO loop sizes.
FLAG_ALIASES = {"--accimulation_steps": "--accumulation_steps", "--max_timesteps": "--num_collect_steps",
                "--update_timesteps": "--num_update_steps"}


# transformers.TrainingArguments' names (stanford_alpaca's train.py and the commands copied from it) for coati's
# own flags: shown in --help beside them.
HF_TRAINER_ALIASES = {
    "--model_name_or_path": "--pretrain", "--data_path": "--dataset", "--output_dir": "--save_path",
    "--num_train_epochs": "--max_epochs", "--per_device_train_batch_size": "--batch_size",
    "--gradient_accumulation_steps": "--accumulation_steps", "--learning_rate": "--lr",
    "--lr_scheduler_type": "--lr_scheduler", "--logging_steps": "--log_interval", "--save_steps": "--save_interval",
    "--model_max_length": "--max_len", "--gradient_checkpointing": "--grad_checkpoint",
    "--fsdp_transformer_layer_cls_to_wrap": "--fsdp_block",
}
# --fsdp's words (TrainingArguments.fsdp) as coati's strategy flags; auto_wrap is what coati's fsdp always does
_FSDP_WORDS = {"full_shard": {"strategy": "fsdp", "zero_stage": 3}, "shard_grad_op": {"strategy": "fsdp", "zero_stage": 2},
               "offload": {"cpu_offload": True}, "auto_wrap": {}}


class _Precision(argparse.Action):
    """``--bf16`` / ``--fp16`` [BOOL]: ``--mixed_precision bf16`` / ``fp16``."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            on = values is None or str2bool(values)
        except argparse.ArgumentTypeError as err:
            parser.error(f"{option_string}: {err}")
        mode = option_string[2:]
        if on or namespace.mixed_precision == mode:
            namespace.mixed_precision = mode if on else "no"


class _Fsdp(argparse.Action):
    """``--fsdp "full_shard auto_wrap [offload]"``: ``--strategy fsdp`` and its options."""

    def __call__(self, parser, namespace, values, option_string=None):
        words = values.split()
        unknown = [w for w in words if w not in _FSDP_WORDS]
        if unknown:
            parser.error(f"--fsdp: {unknown[0]!r} has no coati equivalent (coati's fsdp: {', '.join(_FSDP_WORDS)})")
        if words and not {"full_shard", "shard_grad_op"} & set(words):
            parser.error(f"--fsdp {values!r}: name full_shard or shard_grad_op")
        for word in words:
            for dest, value in _FSDP_WORDS[word].items():
                setattr(namespace, dest, value)


def add_flag_aliases(parser: argparse.ArgumentParser) -> None:
    """Accept :data:`FLAG_ALIASES` as hidden spellings of the flags ``parser`` has (the same type and bounds, no
    default of their own, not in ``--help``), :data:`HF_TRAINER_ALIASES` as second names of those flags (shown
    in ``--help``), and ``--bf16`` / ``--fp16`` / ``--fsdp`` as the Trainer's switches."""
    for alias, name in FLAG_ALIASES.items():
        action = parser._option_string_actions.get(name)
        if action is not None:
            parser.add_argument(alias, dest=action.dest, type=action.type, choices=action.choices,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for alias, name in HF_TRAINER_ALIASES.items():
        action = parser._option_string_actions.get(name)
        if action is not None:
            action.option_strings.append(alias)
            parser._option_string_actions[alias] = action
    if "--mixed_precision" in parser._option_string_actions:
        hf = parser.add_argument_group("Hugging Face Trainer switches")
        for mode in ("bf16", "fp16"):
            hf.add_argument(f"--{mode}", action=_Precision, nargs="?", default=argparse.SUPPRESS, metavar="BOOL",
                            help=f"--mixed_precision {mode}")
        hf.add_argument("--fsdp", action=_Fsdp, default=argparse.SUPPRESS, metavar="WORDS",
                        help="'full_shard auto_wrap' = --strategy fsdp; shard_grad_op = --zero_stage 2; "
                             "offload = --cpu_offload")
