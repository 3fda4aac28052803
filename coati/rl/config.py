"""Every hyper-parameter of stage 3 (PPO and the critic-free methods), declared once.

``examples/train_prompts.py`` makes its flags from :class:`RLConfig` (``add_config_args``), PPOTrainer and
ExperienceMaker take it (their keyword arguments of the same names override its fields), and README's flag
table is generated from the parser. Algorithm fields default to None: :meth:`RLConfig.resolve` fills them
from the ``--algo`` preset (:data:`coati.rl.presets.PRESETS`), so an explicit flag always wins over the preset.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .advantages import ADV_ESTIMATORS
from .kl import KL_ESTIMATORS, KL_LOSS_GRADIENT
from .losses import AGG_MODES, POLICY_LOSSES
from .presets import PRESET_FIELDS, PRESETS, BudgetShare
from .rollout_is import ROLLOUT_IS
from ..errors import UsageError
from ..utils.config import check_bounds, option
from ..utils.optim import OPTIM_HELP, OPTIMIZERS, check_optimizer


def _preset(help: str, name: str) -> str:
    """Help for a preset field: the text plus what ``--algo ppo`` (the default) sets."""
    return f"{help}; unset = from --algo (ppo: {PRESETS['ppo'][name]})"


A, P, S, M, D, R = "algorithm", "PPO", "sampling", "memory", "data", "rollout engine"


@dataclass(frozen=True)
class RLConfig:
    """Stage-3 hyper-parameters; field names are the script's flag names. Frozen: :meth:`resolve` makes the one
    resolved config a run reads (``resolved`` is True on it; replacing a field gives an unresolved copy)."""

    # algorithm: --algo fills the fields left None
    algo: str = option("ppo", "algorithm preset: fills the algorithm flags left unset (README: Algorithms)",
                       choices=sorted(PRESETS), group=A)
    adv_estimator: str | None = option(None, _preset("advantage estimator (gae needs a critic; the others build "
                                                     "none)", "adv_estimator"),
                                       choices=sorted(ADV_ESTIMATORS), group=A)
    policy_loss: str | None = option(None, _preset("policy loss", "policy_loss"), choices=sorted(POLICY_LOSSES),
                                     group=A)
    loss_agg_mode: str | None = option(None, _preset("how per-token losses become one number",
                                                     "loss_agg_mode"), choices=list(AGG_MODES), group=A)
    kl_placement: str | None = option(None, _preset("where the KL to the reference goes: a per-token penalty in "
                                                    "the reward, or a loss term", "kl_placement"),
                                      choices=["reward", "loss"], group=A)
    kl_estimator: str | None = option(None, _preset(
        "per-token KL estimator (k3 = low-variance KL); in the reward each estimates KL(pi||ref), as a loss term "
        "its gradient is that of " + "; ".join(f"{k}: {v}" for k, v in KL_LOSS_GRADIENT.items()),
        "kl_estimator"), choices=list(KL_ESTIMATORS), group=A)
    kl_coef: float | None = option(None, _preset("KL coefficient (initial one with --target_kl, so > 0 there; 0 = no "
                                                 "KL and no reference pass)", "kl_coef"), bounds=">= 0", group=A)
    target_kl: float | None = option(None, "adaptive KL (Ziegler et al.): target KL per response in nats, scaling "
                                           "--kl_coef up or down; off = fixed --kl_coef", bounds="> 0", group=A)
    kl_horizon: int = option(10000, "adaptive KL horizon in samples", bounds=">= 1", group=A)
    eps_clip: float | None = option(None, _preset("policy ratio clip (the lower one with --eps_clip_high)",
                                                  "eps_clip"), bounds="> 0", group=A)
    eps_clip_high: float | None = option(None, "upper ratio clip (DAPO's clip-higher); unset = from --algo, "
                                               "else --eps_clip", bounds="> 0", group=A)
    dual_clip: float | None = option(None, "dual-clip PPO: bound negative-advantage losses by -c * A (c > 1; off "
                                           "when absent)", bounds="> 1", group=A)
    n_samples_per_prompt: int = option(1, "responses sampled per prompt (one group); group estimators need >= 2",
                                       bounds=">= 1", group=A)
    dynamic_sampling: bool | None = option(None, _preset("drop groups whose rewards are all equal and top up from "
                                                         "the next prompt batches (DAPO)", "dynamic_sampling"),
                                           group=A)
    max_sampling_rounds: int = option(4, "with --dynamic_sampling: most generation rounds per prompt batch an "
                                         "episode collects", bounds=">= 1", group=A)
    overlong_buffer_len: int | None = option(None, _preset("DAPO soft overlong penalty: responses longer than "
                                                           "--max_new_tokens minus this many tokens are penalised "
                                                           "linearly (0 = off; needs --max_new_tokens, at most it)",
                                                           "overlong_buffer_len"), bounds=">= 0", group=A)
    overlong_penalty_factor: float | None = option(None, _preset("largest overlong penalty",
                                                                 "overlong_penalty_factor"), bounds=">= 0", group=A)
    # PPO objective
    ptx_coef: float = option(0.9, "actor loss = policy loss + ptx_coef * pretrain LM loss", bounds=">= 0", group=P)
    value_clip: float = option(0.4, "value clip around the old values", bounds="> 0", group=P)
    vf_coef: float = option(1.0, "value loss weight", bounds=">= 0", group=P)
    gamma: float = option(1.0, "GAE / return discount", bounds="[0, 1]", group=P)
    lam: float = option(0.95, "GAE lambda", bounds="[0, 1]", group=P)
    whiten_advantages: bool = option(True, "normalise GAE advantages over the valid tokens of each batch", group=P)
    reward_clip: float | None = option(None, "clip sequence rewards to +-this (off when absent)", bounds="> 0", group=P)
    normalize_reward: bool = option(False, "normalise sequence rewards with running mean / std", group=P)
    # loop sizes
    num_episodes: int = option(10, "collect + update rounds", bounds=">= 1", group=P)
    num_collect_steps: int = option(10, "prompt batches collected per episode", bounds=">= 1", group=P)
    num_update_steps: int | None = option(None, _preset("passes over the replay buffer per episode",
                                                        "num_update_steps"), bounds=">= 1", group=P)
    max_epochs: int = option(1, "epochs per update step", bounds=">= 1", group=P)
    train_batch_size: int = option(8, "experiences per training micro-batch per process", bounds=">= 1", group=P)
    accumulation_steps: int = option(1, "micro-batches per optimizer step", bounds=">= 1", group=P)
    # optimisation
    optim: str = option("adamw_torch", "the actor's (and critic's) " + OPTIM_HELP, choices=list(OPTIMIZERS), group=P)
    lr: float = option(1e-6, "actor learning rate", bounds="> 0", group=P)
    critic_lr: float = option(9e-6, "critic learning rate", bounds="> 0", group=P)
    weight_decay: float = option(0.0, "decoupled weight decay (as AdamW's)", bounds=">= 0", group=P)
    lr_scheduler: str = option("constant", "learning-rate schedule of both optimizers (after warmup)",
                               choices=["constant", "cosine"], group=P)
    warmup_ratio: float = option(0.0, "share of optimizer steps spent warming up", bounds="[0, 1]", group=P)
    # generation
    max_seq_len: int | None = option(128, "max prompt + response tokens (padded prompt width + generated tokens)",
                                     bounds=">= 1", group=D)
    max_new_tokens: int | None = option(None, "max generated tokens (overrides --max_seq_len)", bounds=">= 1", group=D)
    do_sample: bool = option(True, "sample (false = greedy); rollouts use these sampling flags only, never the "
                                   "model's generation_config.json", group=S)
    temperature: float = option(1.0, "sampling temperature; PPO's old, new and reference log-probs are those of "
                                     "logits / temperature, the distribution sampled", bounds="> 0", group=S)
    top_k: int = option(0, "top-k sampling (0 = off); biases PPO: log-probs stay those of the untruncated "
                           "distribution", bounds=">= 0", group=S)
    top_p: float = option(1.0, "nucleus sampling (1 = off); biases PPO: log-probs stay those of the untruncated "
                               "distribution", bounds="(0, 1]", group=S)
    stop: tuple[str, ...] = option((), "stop strings: a response ends with the token that completes the first one "
                                       "(kept, as HF's stop_strings; no EOS after it); the same in both rollout "
                                       "engines", group=S)
    # rollout engine
    rollout_engine: str = option("hf", "what generates rollouts: HF generate on the trained actor, or vLLM (needs "
                                       "coati[vllm]; weights synced after every update)",
                                 choices=["hf", "vllm"], group=R)
    rollout_is: str = option("off", "rollout correction for an engine whose log-probs differ from the trainer's: "
                                    "truncated importance weights per token or per sequence (vllm only)",
                             choices=sorted(ROLLOUT_IS), group=R)
    rollout_is_cap: float = option(2.0, "cap of the --rollout_is weights", bounds=">= 1", group=R)
    rollout_mask_threshold: float | None = option(None, "weight 0 for a sequence whose geometric-mean "
                                                        "trainer/engine probability ratio is outside [1/t, t] (vllm "
                                                        "only; off when absent)", bounds="> 1", group=R)
    logprob_diff_threshold: float = option(0.1, "rollout/logprob_diff/over_threshold: share of tokens whose "
                                                "|trainer - engine log-prob| exceeds this", bounds="> 0", group=R)
    vllm_gpu_memory_utilization: float = option(0.5, "share of GPU memory vLLM takes (weights + KV cache)",
                                                bounds="(0, 1]", group=R)
    vllm_tensor_parallel_size: int = option(1, "GPUs vLLM shards the model over", bounds=">= 1", group=R)
    vllm_sleep: bool = option(False, "vLLM frees its GPU memory during updates (sleep / wake up; GPU only)",
                              group=R)
    vllm_sync_timeout_s: float = option(600.0, "seconds a weight sync into vLLM may take on every rank (FSDP's "
                                               "all-gathers included) before it raises naming the rank and tensor",
                                        bounds="> 0", group=R)
    vllm_lora: str = option("merge", "how a LoRA actor reaches vLLM after each update: merged into the full "
                                      "weights, or as an adapter served by vLLM's LoRA support (only the adapter "
                                      "moves; slower generation: README's vLLM section has the numbers)",
                            choices=["merge", "adapter"], group=R)
    # memory
    offload_ref_reward: bool = option(False, "keep reference and reward models on CPU between uses (not with "
                                             "fsdp, which shards them: use --cpu_offload there)", group=M)
    buffer_cpu_offload: bool = option(True, "keep the replay buffer on CPU", group=M)
    buffer_limit: int = option(0, "max samples in the replay buffer (0 = no limit)", bounds=">= 0", group=M)
    log_entropy: bool = option(True, "log policy entropy (computes full-vocabulary logits of the response)",
                               group=M)
    rollout_log_interval: int | None = option(None, "write every sample of every N-th episode to "
                                                    "SAVE_PATH/rollouts.jsonl (prompt, response, score, reward, "
                                                    "advantage, KL); unset = every episode of the first 10, then "
                                                    "every 10th; 0 = off", bounds=">= 0", group=M)

    def resolve(self) -> "RLConfig":
        """This config with the ``algo`` preset filling the algorithm fields left None, checked."""
        if self.algo not in PRESETS:
            raise UsageError(f"--algo must be one of {sorted(PRESETS)}, got {self.algo!r}")
        preset = PRESETS[self.algo]
        cfg = dataclasses.replace(self, **{k: preset[k] for k in PRESET_FIELDS if getattr(self, k) is None})
        if isinstance(cfg.overlong_buffer_len, BudgetShare):
            if cfg.max_new_tokens is None:
                raise UsageError(f"--algo {cfg.algo}'s overlong buffer is {cfg.overlong_buffer_len} (a share of the "
                                 f"generation budget): set --max_new_tokens (or --overlong_buffer_len 0 to turn it off)")
            cfg = dataclasses.replace(cfg, overlong_buffer_len=cfg.overlong_buffer_len.tokens(cfg.max_new_tokens))
        cfg._check()
        object.__setattr__(cfg, "_resolved", True)
        return cfg

    @property
    def resolved(self) -> bool:
        """Made by :meth:`resolve`: presets applied, combinations checked."""
        return getattr(self, "_resolved", False)

    @property
    def scoring_temperature(self) -> float:
        """The temperature of the distribution rollouts sample from, under which every log-prob PPO uses is
        taken: ``temperature`` when sampling, 1 for greedy decoding (which has none)."""
        return self.temperature if self.do_sample else 1.0

    def _check(self) -> None:
        """One line per combination that cannot do what it says (UsageError)."""
        cfg = self
        check_bounds(cfg)
        check_optimizer(cfg.optim, accumulation_steps=cfg.accumulation_steps)
        estimator = ADV_ESTIMATORS[cfg.adv_estimator]
        if estimator.needs_groups and cfg.n_samples_per_prompt < 2:
            raise UsageError(f"--adv_estimator {cfg.adv_estimator} compares the samples of a prompt: set "
                             f"--n_samples_per_prompt >= 2")
        if cfg.dynamic_sampling and cfg.n_samples_per_prompt < 2:
            raise UsageError("--dynamic_sampling drops groups of equal rewards: set --n_samples_per_prompt >= 2")
        if cfg.lr_scheduler not in ("constant", "cosine"):
            raise ValueError(f"lr_scheduler must be 'constant' or 'cosine', got {cfg.lr_scheduler!r}")
        if cfg.target_kl is not None and cfg.kl_coef <= 0:
            raise UsageError(f"--target_kl adapts --kl_coef by multiplying it, and --kl_coef is {cfg.kl_coef} "
                             f"(--algo {cfg.algo}): give --kl_coef > 0 as its start value")
        if cfg.kl_coef and cfg.kl_placement == "loss" and cfg.kl_estimator == "k1":
            raise UsageError("--kl_placement loss --kl_estimator k1: k1's gradient is zero in expectation "
                             "(E_pi[grad log pi] = 0), so the KL term would do nothing; use k2 (KL(pi||ref)) or k3 "
                             "(KL(ref||pi))")
        if cfg.rollout_engine == "hf" and (cfg.rollout_is != "off" or cfg.rollout_mask_threshold is not None):
            raise UsageError("--rollout_is / --rollout_mask_threshold correct for an engine whose log-probs differ "
                             "from the trainer's: they need --rollout_engine vllm")
        if any(not s for s in cfg.stop):
            raise UsageError("--stop: an empty stop string is in every text, so it would end each response at its "
                             "first token")
        if cfg.vllm_sleep and cfg.rollout_engine != "vllm":
            raise UsageError("--vllm_sleep puts the vLLM engine to sleep: it needs --rollout_engine vllm")
        if cfg.vllm_lora == "adapter" and cfg.rollout_engine != "vllm":
            raise UsageError("--vllm_lora adapter serves the LoRA adapter from vLLM: it needs --rollout_engine vllm")
        if cfg.overlong_buffer_len:
            if cfg.max_new_tokens is None:
                raise UsageError(f"--overlong_buffer_len {cfg.overlong_buffer_len} penalises lengths near the "
                                 f"generation budget: set --max_new_tokens (the budget it is measured from)")
            if cfg.overlong_buffer_len > cfg.max_new_tokens:
                raise UsageError(f"--overlong_buffer_len {cfg.overlong_buffer_len} exceeds --max_new_tokens "
                                 f"{cfg.max_new_tokens}: the penalty-free zone would be empty")

    @property
    def needs_critic(self) -> bool:
        return ADV_ESTIMATORS[self.adv_estimator].needs_critic

    @property
    def uses_reference(self) -> bool:
        """A KL term exists (so reference log-probs are computed); --target_kl needs kl_coef > 0."""
        return self.kl_coef != 0


def make_config(config: RLConfig | None = None, **overrides: Any) -> RLConfig:
    """``config`` (default: the dataclass defaults) with keyword overrides, resolved; a resolved config without
    overrides is returned as it is, so a run resolves once. Unknown names raise TypeError, as a wrong keyword
    argument would."""
    if config is not None and config.resolved and not overrides:
        return config
    names = {f.name for f in dataclasses.fields(RLConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown RL config fields: {unknown}")
    return dataclasses.replace(config or RLConfig(), **overrides).resolve()
