"""KL coefficient controllers for the per-token KL penalty ``-kl_coef * (log pi - log pi_ref)``.

The adaptive controller follows Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
Preferences"): ``e = clip(KL / target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e * n_steps / horizon)``,
where ``n_steps`` is the number of samples the KL was measured on. It keeps the policy near a target
distance from the reference instead of relying on one hand-tuned coefficient.
"""
from __future__ import annotations


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
