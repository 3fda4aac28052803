"""RL math and RL configuration, below experience making and the trainer: advantage estimators, policy and value
losses, aggregation, KL estimators and controllers, reward shaping, the ``--algo`` presets and :class:`RLConfig`.

Every method coati runs on the prompts-and-rewards loop (PPO, GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO, GSPO)
differs from the others only in these small functions, so each is a pure function registered by name; an
algorithm is a choice of names plus their settings (:mod:`coati.rl.presets`), and adding one never edits the
trainer.
"""
from .advantages import ADV_ESTIMATORS, compute_gae, discounted_returns, group_stats, register_adv_est, whiten
from .config import RLConfig, make_config
from .kl import (KL_CLAMP, KL_ESTIMATORS, KL_LOSS_GRADIENT, LOG_RATIO_CLAMP, AdaptiveKLController, FixedKLController,
                 kl_clamped_share, kl_estimate, make_kl_controller)
from .losses import AGG_MODES, POLICY_LOSSES, ValueLoss, agg_loss, register_policy_loss
from .rollout_is import ROLLOUT_IS, logprob_diff_stats, register_rollout_is, rollout_is_weights, rollout_outliers
from .presets import PRESET_FIELDS, PRESET_SOURCES, PRESETS, BudgetShare, preset_table
from .shaping import compute_reward, overlong_penalty

__all__ = [
    "ADV_ESTIMATORS", "AGG_MODES", "AdaptiveKLController", "BudgetShare", "FixedKLController", "KL_CLAMP",
    "KL_ESTIMATORS", "KL_LOSS_GRADIENT", "LOG_RATIO_CLAMP", "POLICY_LOSSES", "PRESETS", "PRESET_FIELDS",
    "PRESET_SOURCES", "RLConfig", "ROLLOUT_IS", "ValueLoss", "agg_loss", "compute_gae", "compute_reward", "discounted_returns",
    "group_stats", "kl_clamped_share", "logprob_diff_stats", "register_rollout_is", "rollout_is_weights",
    "rollout_outliers", "kl_estimate", "make_config", "make_kl_controller", "overlong_penalty",
    "preset_table", "register_adv_est", "register_policy_loss", "whiten",
]
