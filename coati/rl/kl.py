"""KL to the reference policy: per-token estimators (where the KL goes is ``--kl_placement``) and the
controllers of its coefficient.

The adaptive controller follows Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"):
``e = clip(KL / target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e * n_steps / horizon)``, where ``n_steps`` is
the number of samples the KL was measured on. It keeps the policy near a target distance from the reference
instead of relying on one hand-tuned coefficient.
"""
from __future__ import annotations

import torch

from ..models.utils import masked_mean

# Each estimator as a function of the log-ratio log pi - log ref (see kl_estimate).
_ESTIMATES = {"k1": lambda lr: lr, "k2": lambda lr: 0.5 * lr ** 2, "k3": lambda lr: (-lr).exp() - 1 + lr}
KL_ESTIMATORS = tuple(_ESTIMATES)
# What each estimator's gradient follows as a loss term (tokens sampled from pi, the estimate differentiated
# through log pi only): k1's is 0 in expectation (E_pi[grad log pi] = 0), so it is refused there.
KL_LOSS_GRADIENT = {"k1": "zero in expectation (refused as a loss term)", "k2": "KL(pi || ref)",
                    "k3": "KL(ref || pi) (GRPO's choice)"}
# Clamps as veRL and OpenRLHF apply them, so one token far off-policy or far from the reference cannot dominate
# a loss: the log-ratio inside an importance ratio or a KL estimate to +-20, a per-token KL estimate to +-10.
LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0


def kl_estimate(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman's k1, k2, k3), clamped.

    ``k1 = log pi - log ref`` (unbiased, can be negative: the form PPO puts in the reward);
    ``k2 = (log pi - log ref)^2 / 2``; ``k3 = exp(log ref - log pi) - 1 - (log ref - log pi)`` (unbiased and
    non-negative, the "low-variance KL" used as a loss term by GRPO). The log-ratio is clamped to
    ``+-LOG_RATIO_CLAMP`` and the estimate to ``+-KL_CLAMP`` (k3 is exponential in the log-ratio: one token
    that the reference finds 13 nats likelier would otherwise add 4e5); the gradient is 0 where clamped.
    """
    if kind not in _ESTIMATES:
        raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {kind!r}")
    log_ratio = (log_probs.float() - ref_log_probs.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return _ESTIMATES[kind](log_ratio).clamp(-KL_CLAMP, KL_CLAMP)


@torch.no_grad()
def kl_clamped_share(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kind: str, mask: torch.Tensor,
                     dim: int | None = None) -> torch.Tensor:
    """The share of valid tokens (per row with ``dim=-1``) whose KL estimate :func:`kl_estimate` clamps."""
    log_ratio = log_probs.float() - ref_log_probs.float()
    hit = (_ESTIMATES[kind](log_ratio).abs() > KL_CLAMP) | (log_ratio.abs() > LOG_RATIO_CLAMP)
    return masked_mean(hit.float(), mask, dim=dim)


class FixedKLController:
    """Constant coefficient (Coati's behaviour)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional controller towards ``target`` KL over ``horizon`` samples."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int, clip: float = 0.2) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target KL and horizon must be positive, got {target} and {horizon}")
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)
        self.clip = float(clip)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -self.clip), self.clip)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def make_kl_controller(kl_coef: float, target_kl: float | None = None, kl_horizon: int = 10000):
    """Fixed controller unless ``target_kl`` is given."""
    if target_kl is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target_kl, kl_horizon)
