"""The DPO family as small pure functions on per-sequence log-probabilities.

Inputs are per-sequence *summed* log-probs of the response tokens (``logps``) and, where a loss is
length-normalised, the response token counts (``lengths``). Every function returns the loss of each pair
(or, for KTO, each sample) unreduced, so a trainer can sum them and divide by a count gathered over
micro-batches and processes (see :class:`coati.trainer.base.SupervisedTrainer`).

Definitions follow TRL 1.16 where TRL has the loss (tests compare against it):

* ``dpo``: ``-(1-e) log s(b h) - e log s(-b h)`` with ``h = (pi_c - ref_c) - (pi_r - ref_r)``; ``e`` is
  ``label_smoothing`` (conservative DPO; ``e = 0`` is TRL's ``sigmoid``).
* ``ipo``: ``(h' - 1/(2b))^2`` where ``h'`` uses log-ratios averaged over each response's tokens (TRL
  normalises by length as the IPO authors do).
* ``kto``: desirable ``w_d (1 - s(b (r - z0)))``, undesirable ``w_u (1 - s(b (z0 - r)))`` with
  ``r = pi - ref`` and ``z0`` the detached KL baseline ``max(0, mean(pi(y'|x) - ref(y'|x)))`` over
  mismatched prompt / completion pairs (:func:`kto_kl_baseline`).
* ``orpo``: ``NLL_c - lambda log s(log_odds)`` on length-averaged log-probs ``a``, with
  ``log_odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r))``; ``NLL_c = -a_c``, the mean token NLL of
  the chosen response (TRL averages NLL over the batch's tokens instead; equal for equal lengths).
* ``simpo``: ``-(1-e) log s(b (a_c - a_r) - gamma) - e log s(-(b (a_c - a_r) - gamma))`` on length-averaged
  log-probs (TRL's CPO trainer with ``loss_type="simpo"``).

``sft_nll`` is the RPO-style NLL term on chosen responses (``--sft_coef``), per pair the mean token NLL.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("dpo", "ipo", "kto", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair (conservative) DPO loss."""
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return _smoothed_sigmoid(beta * h.float(), label_smoothing)


def ipo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Per-pair IPO loss on token-averaged log-ratios (beta is IPO's tau)."""
    h = ((chosen_logps - ref_chosen_logps) / chosen_lengths.clamp(min=1)
         - (rejected_logps - ref_rejected_logps) / rejected_lengths.clamp(min=1))
    return (h.float() - 1 / (2 * beta)) ** 2


def kto_kl_baseline(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0``: the detached mean log-ratio on mismatched pairs, clamped at 0."""
    return (kl_logps - ref_kl_logps).float().mean().detach().clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor | float,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-sample KTO loss; ``desirable`` is a bool tensor, ``kl`` the baseline ``z0``."""
    r = (logps - ref_logps).float()
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    return torch.where(desirable.bool(), good, bad)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2``."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    c, r = chosen_avg_logps.float(), rejected_avg_logps.float()
    return (c - r) - (_log1mexp(c) - _log1mexp(r))


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, lambda_orpo: float) -> torch.Tensor:
    """Per-pair ORPO loss: chosen NLL plus the weighted odds-ratio term."""
    log_odds = orpo_log_odds(chosen_avg_logps, rejected_avg_logps)
    return -chosen_avg_logps.float() - lambda_orpo * F.logsigmoid(log_odds)


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair SimPO loss: length-normalised reward margin against the target margin ``gamma``."""
    logits = beta * (chosen_avg_logps.float() - rejected_avg_logps.float()) - gamma
    return _smoothed_sigmoid(logits, label_smoothing)


def sft_nll(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per-pair mean token NLL of the chosen response (the ``--sft_coef`` term)."""
    return -chosen_logps.float() / chosen_lengths.clamp(min=1)
