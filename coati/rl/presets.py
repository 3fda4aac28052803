"""``--algo`` presets: each method coati runs on the prompts-and-rewards loop (PPO, GRPO, Dr. GRPO, RLOO,
REINFORCE++, DAPO, GSPO) as a choice of registered pieces plus their settings, each value with its source.
"""
from __future__ import annotations

# ----- presets -------------------------------------------------------------------------------------------
# ``--algo NAME`` fills every algorithm field the user left unset (None) from PRESETS[NAME]; an explicit flag
# always wins. Each value says where it comes from (paper, or the peer default named). ``eps_clip_high`` None
# means "as eps_clip" (symmetric clip); kl_coef 0 means no KL term and no reference model pass.


class BudgetShare(float):
    """A preset's overlong buffer as a share of the generation budget (``--max_new_tokens``), resolved to
    tokens by RLConfig; DAPO's 4096-token buffer of a 20480-token budget is ``BudgetShare(0.2)``."""

    def tokens(self, budget: int) -> int:
        return max(1, round(self * budget))

    def __str__(self) -> str:
        return f"{float(self):g} x max_new_tokens"

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return str(self) if not spec else float.__format__(self, spec)


_NO_EXTRAS = {"dynamic_sampling": False, "overlong_buffer_len": 0, "overlong_penalty_factor": 1.0,
              "eps_clip_high": None}
# One pass over each rollout batch: veRL (ppo_epochs 1), OpenRLHF (max_epochs 1) and TRL (num_iterations 1) for
# the critic-free methods; more passes push GSPO's 3e-4 clip onto nearly every token.
_ONE_PASS = {"num_update_steps": 1}
PRESETS: dict[str, dict[str, object]] = {
    # InstructGPT (Ouyang et al. 2022) PPO: GAE on a critic, k1 KL penalty in the reward. kl_coef 0.02 is
    # InstructGPT's beta (peers: TRL 0.05, OpenRLHF 0.01); 5 passes over the buffer are Coati's PPO default
    "ppo": {"adv_estimator": "gae", "policy_loss": "ppo", "loss_agg_mode": "seq_mean_token_mean",
            "kl_placement": "reward", "kl_estimator": "k1", "kl_coef": 0.02, "eps_clip": 0.2, **_NO_EXTRAS,
            "num_update_steps": 5},
    # DeepSeekMath GRPO (Shao et al. 2024): group z-score, k3 KL as a loss term with beta 0.04
    "grpo": {"adv_estimator": "grpo", "policy_loss": "ppo", "loss_agg_mode": "seq_mean_token_mean",
             "kl_placement": "loss", "kl_estimator": "k3", "kl_coef": 0.04, "eps_clip": 0.2, **_NO_EXTRAS,
             **_ONE_PASS},
    # Dr. GRPO (Liu et al. 2025): no std division, constant length normaliser, no KL
    "dr_grpo": {"adv_estimator": "dr_grpo", "policy_loss": "ppo", "loss_agg_mode": "seq_mean_token_sum_norm",
                "kl_placement": "loss", "kl_estimator": "k3", "kl_coef": 0.0, "eps_clip": 0.2, **_NO_EXTRAS,
                **_ONE_PASS},
    # RLOO (Ahmadian et al. 2024, arXiv 2402.14740): leave-one-out baseline on the sequence reward minus
    # kl_coef x the response's summed k1 KL, and a sequence-level objective A * log pi(y) (seq_mean_token_sum:
    # every token gets its sequence's advantage, whatever the length). 0.05 is TRL's RLOOConfig beta (trl 1.16,
    # which clips the sequence's ratio; on the first update of a batch the two are the same)
    "rloo": {"adv_estimator": "rloo", "policy_loss": "ppo", "loss_agg_mode": "seq_mean_token_sum",
             "kl_placement": "reward", "kl_estimator": "k1", "kl_coef": 0.05, "eps_clip": 0.2, **_NO_EXTRAS,
             **_ONE_PASS},
    # REINFORCE++ (Hu 2025, arXiv 2501.03262): per-token k1 KL in the reward, returns normalised over the global
    # batch. 0.01 is the KL coefficient of the reference implementation's REINFORCE++ example (OpenRLHF
    # examples/scripts/train_reinforce_llama_ray.sh: --advantage_estimator reinforce --init_kl_coef 0.01)
    "reinforce_pp": {"adv_estimator": "reinforce_pp", "policy_loss": "ppo", "loss_agg_mode": "token_mean",
                     "kl_placement": "reward", "kl_estimator": "k1", "kl_coef": 0.01, "eps_clip": 0.2,
                     **_NO_EXTRAS, **_ONE_PASS},
    # DAPO (Yu et al. 2025): GRPO advantages, clip-higher 0.2 / 0.28, token mean, no KL, dynamic sampling, soft
    # overlong penalty over the last 4096 tokens of its 20480-token budget: a fifth of --max_new_tokens
    "dapo": {"adv_estimator": "grpo", "policy_loss": "ppo", "loss_agg_mode": "token_mean",
             "kl_placement": "loss", "kl_estimator": "k3", "kl_coef": 0.0, "eps_clip": 0.2, "eps_clip_high": 0.28,
             "dynamic_sampling": True, "overlong_buffer_len": BudgetShare(0.2), "overlong_penalty_factor": 1.0,
             **_ONE_PASS},
    # GSPO (Zheng et al. 2025): sequence-level ratio clipped to 3e-4 / 4e-4, GRPO advantages, no KL
    "gspo": {"adv_estimator": "grpo", "policy_loss": "gspo", "loss_agg_mode": "seq_mean_token_mean",
             "kl_placement": "loss", "kl_estimator": "k3", "kl_coef": 0.0, **_NO_EXTRAS,
             "eps_clip": 3e-4, "eps_clip_high": 4e-4, **_ONE_PASS},
}
PRESET_FIELDS = tuple(PRESETS["ppo"])
# Where each preset's values come from, for README's table (the comments above hold the detail).
PRESET_SOURCES = {
    "ppo": "InstructGPT (kl_coef 0.02; TRL 0.05, OpenRLHF 0.01); 5 passes: Coati",
    "grpo": "DeepSeekMath (beta 0.04, k3 in the loss); 1 pass: veRL / OpenRLHF / TRL",
    "dr_grpo": "Dr. GRPO (Liu et al. 2025); 1 pass: veRL / OpenRLHF / TRL",
    "rloo": "RLOO (Ahmadian et al. 2024), sequence-level; beta 0.05: TRL RLOOConfig",
    "reinforce_pp": "REINFORCE++ (Hu 2025); kl 0.01: OpenRLHF's REINFORCE++ example",
    "dapo": "DAPO (Yu et al. 2025): clip 0.2 / 0.28, buffer 4096 of 20480 tokens",
    "gspo": "GSPO (Zheng et al. 2025): clip 3e-4 / 4e-4",
}


def preset_table() -> str:
    """README's "Algorithms" table: each --algo preset's values, as PRESETS holds them."""
    cols = ["adv_estimator", "policy_loss", "loss_agg_mode", "kl_placement", "kl_estimator", "kl_coef", "eps_clip",
            "eps_clip_high", "num_update_steps", "dynamic_sampling", "overlong_buffer_len"]
    rows = ["| `--algo` | " + " | ".join(f"`--{c}`" for c in cols) + " | source |", "|" + " --- |" * (len(cols) + 2)]
    for name, preset in PRESETS.items():
        cells = ["" if preset[c] is None else f"`{preset[c]}`" for c in cols]
        rows.append(f"| `{name}` | " + " | ".join(cells) + f" | {PRESET_SOURCES[name]} |")
    return "\n".join(rows) + "\n"
