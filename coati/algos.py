"""RL algorithms as data: advantage estimators, policy losses, loss aggregation and KL estimators.

Every method coati runs on the prompts-and-rewards loop (PPO, GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO,
GSPO) differs from the others only in these few small functions, so each is a pure function registered by
name; an algorithm is a choice of names plus their settings, and adding one never edits the trainer.

Shapes: ``(B, A)`` for per-action tensors aligned with the last ``A`` tokens of each sequence, ``(B,)`` for
per-sequence ones. ``mask`` marks valid action tokens (1 up to and including the first EOS). ``group`` holds
one integer per sequence naming the prompt it answers (the ``n_samples_per_prompt`` samples of a prompt
share it). ``reduce_sum``, where taken, sums a tensor over every process (the strategy's all-reduce), so
statistics over "the batch" mean the global batch; leave it None on one process.
"""
from __future__ import annotations

from typing import Callable

import torch

from .experience.gae import compute_gae
from .models.utils import masked_mean

Reduce = Callable[[torch.Tensor], torch.Tensor] | None

ADV_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}
POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {}
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
# What each estimator's gradient follows as a loss term (tokens sampled from pi, the estimate differentiated
# through log pi only): k1's is 0 in expectation (E_pi[grad log pi] = 0), so it is refused there.
KL_LOSS_GRADIENT = {"k1": "zero in expectation (refused as a loss term)", "k2": "KL(pi || ref)",
                    "k3": "KL(ref || pi) (GRPO's choice)"}
# Clamps as veRL and OpenRLHF apply them, so one token far off-policy or far from the reference cannot dominate
# a loss: the log-ratio inside an importance ratio or a KL estimate to +-20, a per-token KL estimate to +-10.
LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0


def register_adv_est(name: str, *, needs_critic: bool = False, needs_groups: bool = False):
    """Register an advantage estimator. ``needs_critic``: it reads a value model's ``values`` (else no critic
    is built); ``needs_groups``: it compares samples of one prompt (so ``n_samples_per_prompt`` must be > 1)."""
    def deco(fn):
        fn.needs_critic, fn.needs_groups = needs_critic, needs_groups
        ADV_ESTIMATORS[name] = fn
        return fn
    return deco


def register_policy_loss(name: str):
    def deco(fn):
        POLICY_LOSSES[name] = fn
        return fn
    return deco


# ----- statistics ----------------------------------------------------------------------------------------

def whiten(x: torch.Tensor, mask: torch.Tensor, reduce_sum: Reduce = None, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the valid entries of the global batch; invalid entries become 0.
    Two passes (mean, then the mean squared deviation), the same arithmetic as PPO's per-batch whitening."""
    x = x.float()
    m = mask.to(torch.float32)
    stats = torch.stack([(x * m).sum(), m.sum()])
    if reduce_sum is not None:
        stats = reduce_sum(stats)
    count = stats[1].clamp(min=1e-8)
    mean = stats[0] / count
    sq = ((x - mean) ** 2 * m).sum()
    if reduce_sum is not None:
        sq = reduce_sum(sq)
    return (x - mean) * torch.rsqrt(sq / count + eps) * m


def group_stats(scores: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence: the size, mean and unbiased std of its group's scores (std 0 for a group of one)."""
    scores = scores.float()
    _, inverse = torch.unique(group, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    count = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, inverse, torch.ones_like(scores))
    total = torch.zeros_like(count).index_add_(0, inverse, scores)
    mean = total / count
    sq = torch.zeros_like(count).index_add_(0, inverse, (scores - mean[inverse]) ** 2)
    std = (sq / (count - 1).clamp(min=1.0)).sqrt()
    return count[inverse], mean[inverse], std[inverse]


# ----- advantage estimators ------------------------------------------------------------------------------
# Each returns (advantages, returns), both (B, A) and 0 outside the mask. Keyword arguments an estimator
# does not use are accepted and ignored, so callers pass one set of inputs to any of them.

@register_adv_est("gae", needs_critic=True)
def gae_advantages(*, token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95, whiten_advantages: bool = True, reduce_sum: Reduce = None,
                   **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's generalised advantage estimation on a critic's values; returns are the value targets."""
    advantages, returns = compute_gae(token_rewards, values * mask.to(values.dtype), mask, gamma, lam)
    if whiten_advantages:
        advantages = whiten(advantages, mask, reduce_sum)
    return advantages, returns


def _broadcast(per_seq: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    adv = per_seq.float().unsqueeze(-1) * mask.to(torch.float32)
    return adv, adv


@register_adv_est("grpo", needs_groups=True)
def grpo_advantages(*, scores: torch.Tensor, group: torch.Tensor, mask: torch.Tensor, norm_by_std: bool = True,
                    eps: float = 1e-6, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: ``(r - mean_group) / (std_group + eps)`` on every token. A group of one, or one whose rewards
    are all equal, carries no signal and gets advantage 0."""
    count, mean, std = group_stats(scores, group)
    adv = scores.float() - mean
    if norm_by_std:
        adv = adv / (std + eps)
    return _broadcast(torch.where(count > 1, adv, torch.zeros_like(adv)), mask)


@register_adv_est("dr_grpo", needs_groups=True)
def dr_grpo_advantages(**kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO: the group mean is the baseline, no division by the std (which over-weights easy prompts)."""
    return grpo_advantages(**{**kwargs, "norm_by_std": False})


@register_adv_est("rloo", needs_groups=True)
def rloo_advantages(*, scores: torch.Tensor, group: torch.Tensor, mask: torch.Tensor,
                    **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: each sample's baseline is the mean of the *other* samples of its prompt,
    ``r_i - (sum_g - r_i) / (n - 1)``; a group of one has no baseline and gets 0. With the KL in the reward,
    ``scores`` already carry it (``r - kl_coef * sum_t KL_t``, see the experience maker)."""
    count, mean, _ = group_stats(scores, group)
    scores = scores.float()
    loo = (mean * count - scores) / (count - 1).clamp(min=1.0)
    return _broadcast(torch.where(count > 1, scores - loo, torch.zeros_like(scores)), mask)


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = sum_{k >= t} gamma^(k-t) r_k`` over the valid tokens of each row."""
    m = mask.to(torch.float32)
    rewards = token_rewards.float() * m
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = (rewards[:, t] + gamma * running) * m[:, t]
        out[:, t] = running
    return out


@register_adv_est("reinforce_pp")
def reinforce_pp_advantages(*, token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            reduce_sum: Reduce = None, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: discounted returns of the per-token rewards (score on the last token, KL penalty on
    every token), normalised over the global batch; no critic, no groups."""
    returns = discounted_returns(token_rewards, mask, gamma)
    return whiten(returns, mask, reduce_sum), returns


@register_adv_est("reinforce_baseline", needs_groups=True)
def reinforce_baseline_advantages(*, scores: torch.Tensor, group: torch.Tensor, mask: torch.Tensor,
                                  reduce_sum: Reduce = None, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline: the group mean as baseline, then normalised over the global batch."""
    _, mean, _ = group_stats(scores, group)
    adv, _ = _broadcast(scores.float() - mean, mask)
    adv = whiten(adv, mask, reduce_sum)
    return adv, adv


# ----- aggregation ---------------------------------------------------------------------------------------

def agg_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str, norm_len: int | None = None) -> torch.Tensor:
    """Reduce a ``(B, A)`` per-token loss to a scalar.

    ``token_mean``: every valid token of the batch weighs the same (DAPO). ``seq_mean_token_mean``: mean per
    sequence, then over sequences (PPO, GRPO). ``seq_mean_token_sum``: per-sequence sum, then the mean over
    sequences: the sequence-level objective ``A * log pi(y)`` (RLOO), every token of every sequence weighted
    alike. ``seq_mean_token_sum_norm``: per-sequence sum divided by the constant ``norm_len`` (Dr. GRPO;
    default the action width), then the mean over sequences, so no length bias enters through the normaliser.
    """
    m = mask.to(loss.dtype)
    if mode == "token_mean":
        return (loss * m).sum() / m.sum().clamp(min=1.0)
    if mode == "seq_mean_token_mean":
        return masked_mean(loss, mask, dim=-1).mean()
    if mode == "seq_mean_token_sum":
        return (loss * m).sum(-1).mean()
    if mode == "seq_mean_token_sum_norm":
        return ((loss * m).sum(-1) / float(norm_len or loss.size(-1))).mean()
    raise ValueError(f"loss aggregation must be one of {AGG_MODES}, got {mode!r}")


# ----- KL ------------------------------------------------------------------------------------------------

def kl_estimate(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman's k1, k2, k3), clamped.

    ``k1 = log pi - log ref`` (unbiased, can be negative: the form PPO puts in the reward);
    ``k2 = (log pi - log ref)^2 / 2``; ``k3 = exp(log ref - log pi) - 1 - (log ref - log pi)`` (unbiased and
    non-negative, the "low-variance KL" used as a loss term by GRPO). The log-ratio is clamped to
    ``+-LOG_RATIO_CLAMP`` and the estimate to ``+-KL_CLAMP`` (k3 is exponential in the log-ratio: one token
    that the reference finds 13 nats likelier would otherwise add 4e5); the gradient is 0 where clamped.
    """
    log_ratio = (log_probs.float() - ref_log_probs.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio ** 2
    elif kind == "k3":
        kl = (-log_ratio).exp() - 1 + log_ratio
    else:
        raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {kind!r}")
    return kl.clamp(-KL_CLAMP, KL_CLAMP)


@torch.no_grad()
def kl_clamped_share(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kind: str, mask: torch.Tensor,
                     dim: int | None = None) -> torch.Tensor:
    """The share of valid tokens (per row with ``dim=-1``) whose KL estimate :func:`kl_estimate` clamps."""
    log_ratio = log_probs.float() - ref_log_probs.float()
    raw = {"k1": log_ratio, "k2": 0.5 * log_ratio ** 2, "k3": (-log_ratio).exp() - 1 + log_ratio}[kind]
    hit = (raw.abs() > KL_CLAMP) | (log_ratio.abs() > LOG_RATIO_CLAMP)
    return masked_mean(hit.float(), mask, dim=dim)


# ----- policy losses -------------------------------------------------------------------------------------
# Each returns (loss, metrics) with metrics as detached 0-d tensors, aggregated like the loss: pg_clipfrac (share
# of tokens whose clipped branch is taken), pg_clipfrac_high / _low (ratio above 1 + clip_high with A > 0, below
# 1 - clip_low with A < 0), ppo_kl (KL(old || new) estimated as ratio - 1 - log ratio), ratio_max / ratio_min
# (over valid tokens: 1 on the first update of a batch, when the policy is the one that sampled).

def _clipped_surrogate(ratio: torch.Tensor, log_ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                       clip_low: float, clip_high: float | None, dual_clip: float | None, agg_mode: str,
                       norm_len: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)``, with dual clip, aggregated, and its metrics."""
    clip_high = clip_low if clip_high is None else clip_high
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    loss = -torch.min(surr1, surr2)
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        loss = torch.where(adv < 0, torch.min(loss, -dual_clip * adv), loss)
    with torch.no_grad():
        r, lr = ratio.detach(), log_ratio.detach()
        valid = mask.bool()
        metrics = {name: agg_loss(x.float(), mask, agg_mode, norm_len) for name, x in (
            ("pg_clipfrac", surr2.detach().lt(surr1.detach())), ("pg_clipfrac_high", (r > 1 + clip_high) & (adv > 0)),
            ("pg_clipfrac_low", (r < 1 - clip_low) & (adv < 0)), ("ppo_kl", r - 1 - lr))}
        metrics["ratio_max"] = r[valid].max() if valid.any() else r.new_tensor(1.0)
        metrics["ratio_min"] = r[valid].min() if valid.any() else r.new_tensor(1.0)
    return agg_loss(loss, mask, agg_mode, norm_len), metrics


@register_policy_loss("ppo")
def ppo_clip_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float | None = None,
                  dual_clip: float | None = None, agg_mode: str = "seq_mean_token_mean",
                  norm_len: int | None = None, **_: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate ``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)`` per token.

    ``clip_high`` defaults to ``clip_low`` (PPO); a larger one is DAPO's clip-higher, which lets
    low-probability tokens grow. ``dual_clip`` (c > 1) bounds the loss of negative-advantage tokens by
    ``-c A`` so a huge ratio cannot blow the step up (dual-clip PPO). The log-ratio is clamped to
    ``+-LOG_RATIO_CLAMP`` before ``exp``.
    """
    log_ratio = (log_probs.float() - old_log_probs.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return _clipped_surrogate(log_ratio.exp(), log_ratio, advantages.float(), mask, clip_low, clip_high, dual_clip,
                              agg_mode, norm_len)


@register_policy_loss("gspo")
def gspo_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              *, clip_low: float = 3e-4, clip_high: float | None = 4e-4, dual_clip: float | None = None,
              agg_mode: str = "seq_mean_token_mean", norm_len: int | None = None,
              **_: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO: one importance ratio per sequence, ``s = exp(mean_t(log pi - log pi_old))`` over its valid
    tokens, clipped with GSPO's small ranges. Written per token as ``sg[s] * pi_t / sg[pi_t]`` so the value is
    ``s`` and the gradient is ``s`` times the sequence's mean token-log-prob gradient. ``dual_clip`` bounds a
    negative-advantage sequence's loss by ``-c A`` (the sequence-level dual clip: every token carries ``s``)."""
    log_ratio = log_probs.float() - old_log_probs.float()
    seq_log_ratio = masked_mean(log_ratio, mask, dim=-1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    token_log_ratio = seq_log_ratio.detach().unsqueeze(-1) + log_probs.float() - log_probs.float().detach()
    return _clipped_surrogate(token_log_ratio.exp(), token_log_ratio, advantages.float(), mask, clip_low, clip_high,
                              dual_clip, agg_mode, norm_len)


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


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to ``max_len - buffer_len`` tokens, then falling linearly to
    ``-factor`` at ``max_len`` (and beyond). ``max_len`` is the configured budget, never a batch's width, so a
    response's penalty depends on its length alone."""
    if buffer_len <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    if buffer_len > max_len:
        raise ValueError(f"overlong buffer {buffer_len} exceeds the generation budget {max_len}")
    expected = max_len - buffer_len
    return ((expected - lengths.float()) / buffer_len).clamp(min=-1.0, max=0.0) * factor


def preset_table() -> str:
    """README's "Algorithms" table: each --algo preset's values, as PRESETS holds them."""
    cols = ["adv_estimator", "policy_loss", "loss_agg_mode", "kl_placement", "kl_estimator", "kl_coef", "eps_clip",
            "eps_clip_high", "num_update_steps", "dynamic_sampling", "overlong_buffer_len"]
    rows = ["| `--algo` | " + " | ".join(f"`--{c}`" for c in cols) + " | source |", "|" + " --- |" * (len(cols) + 2)]
    for name, preset in PRESETS.items():
        cells = ["" if preset[c] is None else f"`{preset[c]}`" for c in cols]
        rows.append(f"| `{name}` | " + " | ".join(cells) + f" | {PRESET_SOURCES[name]} |")
    return "\n".join(rows) + "\n"
