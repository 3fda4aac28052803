"""Stage 3: PPO (and PPO-ptx), GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO and GSPO on prompts, through a Strategy.

The algorithm is data (:class:`~coati.rl.RLConfig`, ``--algo`` presets in ``coati.rl.PRESETS``): an advantage
estimator, a policy loss, a loss aggregation and where the KL goes, each a registered function of
:mod:`coati.rl`. The critic exists only for an estimator that needs values (gae).

One *episode* (= one logged step, like a veRL iteration) is:

1. collect: ``num_collect_steps`` prompt batches, each prompt sampled ``n_samples_per_prompt`` times ->
   experiences -> buffer; with ``dynamic_sampling`` groups whose rewards are all equal are dropped and further
   prompt batches top the episode up to its number of groups;
2. update: ``num_update_steps`` x ``max_epochs`` shuffled passes over the buffer in micro-batches of
   ``train_batch_size``; every ``accumulation_steps`` micro-batches make one actor (and critic) optimizer
   step. When that is one optimizer step per episode, the update's detached log-probs are the old ones
   (see :meth:`PPOTrainer._reuses_update_log_probs`);
3. the buffer is cleared.

Actor loss (PPO-ptx, InstructGPT's objective, plus a KL term for ``kl_placement="loss"``)::

    loss_actor  = policy_loss + kl_coef * kl_loss + ptx_coef * ptx_loss  (ptx only with a pretrain loader)
    loss_critic = vf_coef * value_loss

Micro-batches of one optimizer step are weighted by their share of the global batch's sequences (``seq_*``
modes) or valid tokens (``token_mean``), so any number of processes and accumulation steps equals one big
batch. With ``ptx_coef == 0`` no pretraining batch is drawn: plain PPO exactly. (Coati's 2023 code mixed
``ptx_coef * ptx + (1 - ptx_coef) * policy``; here the policy term keeps weight 1.)

Every run checks itself: the first update of each batch must see importance ratios of 1, zero-signal groups
and clipped shares are logged, and ``rollouts.jsonl`` records each sample with its score, reward, advantage, KL.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from torch.optim.lr_scheduler import LambdaLR

from ..dataset.packing import model_inputs
from ..experience.buffer import ReplayBuffer
from ..experience.experience import Experience
from ..experience.maker import ExperienceMaker
from ..models.lora import check_ppo_train_bias, lora_train_bias
from ..models.loss import GPTLMLoss
from ..models.utils import disable_dropout, masked_mean
from ..rl import (POLICY_LOSSES, RLConfig, ValueLoss, agg_loss, kl_clamped_share, kl_estimate, make_config,
                  make_kl_controller)
from ..utils.optim import check_optimizer
from .base import LRSchedule, checkpoint_dir, epoch_iter, save_checkpoint, to_device
from .optim import make_optimizer
from .callbacks import MetricsLogger, logger
from .strategies import Strategy

# Experience info fields -> logged names (veRL's where it has one).
# "score" is the sequence reward (reward model / function), "reward" the per-token rewards summed (score
# minus the KL penalty), "kl" the per-token mean of log pi - log pi_ref, "kl_seq" its sum over the response
# (what the adaptive KL controller sees), "advantage" the per-sequence mean of the advantages trained on.
_EXPERIENCE_METRICS = {
    "score": "critic/score/mean",
    "reward": "critic/rewards/mean",
    "return": "critic/returns/mean",
    "value": "critic/values/mean",
    "advantage": "critic/advantages/mean",
    "kl": "actor/reward_kl_penalty",
    "kl_seq": "actor/kl_seq",
    "response_length": "response_length/mean",
    "prompt_length": "prompt_length/mean",
    "response_clipped": "response_length/clip_ratio",
    "overlong_penalty": "critic/overlong_penalty/mean",
    "kl_clamped": "actor/kl_clamped_share",
    "logprob_diff": "rollout/logprob_diff/mean",
    "logprob_diff_over": "rollout/logprob_diff/over_threshold",
    "rollout_is_weight": "rollout/is_weight/mean",
}
# Per-step metrics reduced by their extreme (over micro-batches, steps and processes), not averaged.
_EXTREMES = {"actor/ratio_max": max, "actor/ratio_min": min}
# The first update of a batch runs the policy that sampled it: its importance ratios are 1 to rounding (fp32;
# low-precision compute rounds log-probs to about 1e-2).
_ON_POLICY_TOL = {None: 1e-3, "bf16": 5e-2, "fp16": 5e-2}
# Rollout dump when --rollout_log_interval is unset: every episode of the first 10, then every 10th.
_DUMP_FIRST, _DUMP_EVERY = 10, 10
_WITH_STD = ("score", "reward", "response_length")


@dataclass
class _Collected:
    """What one episode's collection generated: every sample's info (on CPU), the token count, the experience
    maker's stage timings, summed, and with dynamic sampling its metrics."""

    infos: list[dict[str, torch.Tensor]] = field(default_factory=list)
    tokens: float = 0.0
    timings: dict[str, float] = field(default_factory=lambda: {"generate": 0.0, "make_experience": 0.0})
    sampling: dict[str, float] = field(default_factory=dict)

    def add(self, exp: Experience) -> None:
        self.infos.append({k: v.detach().cpu() for k, v in exp.info.items()})
        self.tokens += float(exp.attention_mask.sum())
        for k, v in exp.timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + v


def _informative_groups(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Per group of ``n`` consecutive samples (one prompt's), whether their scores differ: a group whose scores
    are all equal gives the task no signal (DAPO's dynamic sampling drops it)."""
    scores = scores.reshape(-1, n)
    return (scores != scores[:, :1]).any(-1)


class _Cycle:
    """Endless iteration over a dataloader that remembers its position (epoch, batches used) for resume."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.epoch = 0
        self.consumed = 0
        self._it: Iterator | None = None

    def next(self) -> Any:
        if self._it is None:
            self._it = epoch_iter(self.loader, self.epoch, self.consumed)
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.consumed = self.epoch + 1, 0
            self._it = epoch_iter(self.loader, self.epoch)
            batch = next(self._it)
        self.consumed += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        self._it = None


class PPOTrainer:
    """The stage-3 trainer (PPO / PPO-ptx and the critic-free methods). ``config`` holds the hyper-parameters
    (:class:`~coati.rl.RLConfig`, the fields of ``examples/train_prompts.py``'s flags);
    keyword arguments of the same names override its fields.

    Models may be plain or already prepared by ``strategy``; unprepared ones are prepared here. ``critic`` is
    required by an estimator that needs values (gae) and refused otherwise. ``initial_model`` (frozen
    reference policy, only used with a KL term) defaults to the actor with LoRA disabled when the actor has
    LoRA, else to a frozen copy of the actor made now. Give ``reward_model`` or ``reward_fn``.
    """

    def __init__(
        self,
        strategy: Strategy,
        actor: nn.Module,
        critic: nn.Module | None = None,
        reward_model: nn.Module | None = None,
        initial_model: nn.Module | None = None,
        actor_optim: torch.optim.Optimizer | None = None,
        critic_optim: torch.optim.Optimizer | None = None,
        *,
        tokenizer: Any,
        reward_fn: Callable[..., Any] | None = None,
        config: RLConfig | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        # logging and checkpoints
        save_path: str | os.PathLike | None = None,
        save_interval: int = 0,
        save_total_limit: int = 0,
        log_interval: int = 1,
        log_dir: str | os.PathLike | None = None,
        use_tensorboard: bool = False,
        use_wandb: bool = False,
        merge_lora: bool = True,
        need_optim_ckpt: bool = True,
        run_config: dict[str, Any] | None = None,
        engine: Any = None,
        **overrides: Any,
    ) -> None:
        cfg = self.config = make_config(config, **overrides)  # the one resolution of this run's config
        strategy.check_ppo(cfg.offload_ref_reward)
        self.strategy = strategy
        self.tokenizer = tokenizer
        self._prepare_models(actor, critic, reward_model, initial_model)
        optim_kw = dict(strategy=strategy, accumulation_steps=cfg.accumulation_steps)
        actor_optim = actor_optim or make_optimizer(cfg.optim, self.actor, cfg.lr, cfg.weight_decay, **optim_kw)
        # Strategies that wrap a model together with its optimizer (ColossalAI's Booster) do it here; the
        # experience maker and the update phase then use the returned pairs.
        self.actor, self.actor_optim = strategy.prepare_optimizer(self.actor, actor_optim)
        self.critic_optim = None
        if self.critic is not None:
            critic_optim = critic_optim or make_optimizer(cfg.optim, self.critic, cfg.critic_lr, cfg.weight_decay,
                                                          **optim_kw)
            self.critic, self.critic_optim = strategy.prepare_optimizer(self.critic, critic_optim)

        self.kl_ctl = make_kl_controller(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.experience_maker = ExperienceMaker(
            self.actor, self.critic, self.reward_model, self.initial_model, tokenizer=tokenizer,
            reward_fn=reward_fn, kl_ctl=self.kl_ctl, strategy=strategy, generate_kwargs=generate_kwargs, config=cfg,
            engine=engine)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.buffer = ReplayBuffer(pad_token_id=pad_id, cpu_offload=cfg.buffer_cpu_offload, limit=cfg.buffer_limit)
        self.actor_scheduler = self.critic_scheduler = None
        self.policy_loss_fn = POLICY_LOSSES[cfg.policy_loss]
        self.value_loss_fn = ValueLoss(cfg.value_clip)
        self.ptx_loss_fn = GPTLMLoss()

        self.save_path = save_path
        self.save_interval = save_interval
        self.save_total_limit = save_total_limit
        self.log_interval = max(1, log_interval)
        self.merge_lora = merge_lora
        self.need_optim_ckpt = need_optim_ckpt
        self.episode = 0
        self.optim_step = 0
        self.history: list[dict[str, float]] = []
        if log_dir is None and save_path is not None:
            log_dir = save_path
        self.metrics = MetricsLogger(log_dir, enabled=strategy.is_rank0(), use_tensorboard=use_tensorboard,
                                     use_wandb=use_wandb, config=run_config, console=tqdm.write)
        self._prompts: _Cycle | None = None
        self._pretrain: _Cycle | None = None

    def _prepare_models(self, actor: nn.Module, critic: nn.Module | None, reward_model: nn.Module | None,
                        initial_model: nn.Module | None) -> None:
        """Check, de-dropout and prepare the four models; make the reference a frozen copy of the actor where the
        KL needs one and LoRA's disabled adapter cannot be it."""
        cfg, strategy = self.config, self.strategy
        if cfg.needs_critic and critic is None:
            raise ValueError(f"adv_estimator {cfg.adv_estimator!r} learns from a critic's values: pass a critic")
        if not cfg.needs_critic and critic is not None:
            raise ValueError(f"adv_estimator {cfg.adv_estimator!r} uses no critic: pass critic=None")
        plain_actor = strategy.unwrap(actor)
        # the reference policy (the LoRA actor's base, when no initial_model is given) and a reward model sharing
        # the critic's base must not train: refuse LoRA that trains the base's biases
        if initial_model is None and cfg.uses_reference:
            check_ppo_train_bias(lora_train_bias(plain_actor.model))
        if critic is not None and getattr(reward_model, "shares_base", False):  # never strategy-wrapped
            check_ppo_train_bias(lora_train_bias(strategy.unwrap(critic).model))
        for model in (actor, critic, initial_model, reward_model):
            if model is not None:
                # old log-probs and values are scored without gradients, the update runs in train mode:
                # with dropout they would be two different functions (TRL and OpenRLHF do the same)
                disable_dropout(strategy.unwrap(model))
        if not cfg.uses_reference:
            initial_model = None  # no KL term: no reference pass
        elif initial_model is None and not getattr(plain_actor, "lora_enabled", False):
            initial_model = copy.deepcopy(plain_actor)  # full fine-tuning: a frozen copy of the starting policy
        self.actor = self._prepare(actor, trainable=True)
        self.critic = self._prepare(critic, trainable=True)
        self.initial_model = self._prepare(initial_model, trainable=False)
        self.reward_model = self._prepare(reward_model, trainable=False)
        if cfg.offload_ref_reward:
            for m in (self.initial_model, self.reward_model):
                if m is not None:
                    m.to("cpu")

    def _prepare(self, model: nn.Module | None, trainable: bool) -> nn.Module | None:
        if model is None:
            return None
        if self.strategy.unwrap(model) is not model:
            return model  # already wrapped by the strategy
        return self.strategy.prepare_model(model, trainable=trainable)

    @property
    def _accumulation(self) -> int:
        return max(1, self.config.accumulation_steps)

    # ----- schedules ---------------------------------------------------------------------------------
    def _steps_for(self, samples: int) -> int:
        """Optimizer steps of an update phase over ``samples`` buffered samples: each of the ``num_update_steps
        x max_epochs`` passes steps once per ``accumulation_steps`` micro-batches (the last group may be short)."""
        micro = math.ceil(samples / self.config.train_batch_size)
        return math.ceil(micro / self._accumulation) * self.config.num_update_steps * self.config.max_epochs

    def _planned_optimizer_steps(self, prompt_loader: DataLoader) -> list[int]:
        """The optimizer steps each episode is planned to take, which the LR schedules span. Each episode
        collects the next ``num_collect_steps`` prompt batches (the last batch of a pass over the prompts may be
        short) and the buffer keeps at most ``buffer_limit`` of their samples. With dynamic sampling an episode
        is topped up to full batches' worth of groups, unless it hits ``max_sampling_rounds`` first: then
        :meth:`_correct_schedule` shortens the schedules by the steps it did not take."""
        n, size = len(prompt_loader.sampler), prompt_loader.batch_size
        batches = [size] * (n // size) + ([n % size] if n % size and not prompt_loader.drop_last else [])
        per_prompt = self.config.n_samples_per_prompt
        plan = []
        for episode in range(self.config.num_episodes):
            first = episode * self.config.num_collect_steps
            if self.config.dynamic_sampling:
                samples = self.config.num_collect_steps * size * per_prompt
            else:
                samples = per_prompt * sum(batches[i % len(batches)]
                                           for i in range(first, first + self.config.num_collect_steps))
            if self.buffer.limit > 0:
                samples = min(samples, self.buffer.limit)
            plan.append(self._steps_for(samples))
        return plan

    def _reuses_update_log_probs(self, prompt_loader: DataLoader) -> bool:
        """Whether the old log-probs may be the update's own, detached, instead of a no-grad forward while
        making experience (TRL's GRPOTrainer does the same): exact when every sample of an episode is trained
        in its first optimizer step, i.e. one pass over the buffer and at most ``accumulation_steps``
        micro-batches in it, so the update's forward runs the weights that sampled (dropout is off in every
        model, see __init__). The experience maker still needs them for a KL penalty in the reward or an
        adaptive KL."""
        cfg = self.config
        if self.config.num_update_steps * self.config.max_epochs != 1:
            return False
        if cfg.uses_reference and (cfg.kl_placement == "reward" or cfg.target_kl is not None):
            return False
        samples = self.config.num_collect_steps * (prompt_loader.batch_size or 1) * cfg.n_samples_per_prompt  # the most
        if self.buffer.limit > 0:
            samples = min(samples, self.buffer.limit)
        return math.ceil(samples / self.config.train_batch_size) <= self._accumulation

    def _build_schedulers(self, prompt_loader: DataLoader) -> None:
        self._plan = self._planned_optimizer_steps(prompt_loader)
        for name in ("actor", "critic") if self.critic is not None else ("actor",):
            optim = self.strategy.base_optimizer(getattr(self, f"{name}_optim"))
            sched = LambdaLR(optim, LRSchedule(sum(self._plan), self.config.warmup_ratio, self.config.lr_scheduler))
            setattr(self, f"{name}_scheduler", sched)

    def _correct_schedule(self) -> None:
        """After collecting: when the buffer gives this episode fewer (or more) optimizer steps than planned
        (dynamic sampling stopped at its round cap), the schedules' length changes by the difference, so they
        end with the run's last step; the learning rate of the step about to be taken follows at once. The
        rate stays a function of the steps taken: ``LRSchedule(total)`` at ``last_epoch``."""
        diff = self._steps_for(len(self.buffer)) - self._plan[self.episode]
        if diff == 0:
            return
        for sched in (self.actor_scheduler, self.critic_scheduler):
            if sched is None:
                continue
            plan = sched.lr_lambdas[0]
            plan.total += diff
            for group, base_lr in zip(sched.optimizer.param_groups, sched.base_lrs):
                group["lr"] = base_lr * plan(sched.last_epoch)

    # ----- checkpoint / resume -----------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        state = {
            "episode": self.episode, "optim_step": self.optim_step, "history": self.history,
            "metrics_records": self.metrics.records,
            "kl_ctl": self.kl_ctl.state_dict(),
            "experience_maker": self.experience_maker.state_dict(),
            "actor_scheduler": self.actor_scheduler.state_dict(),
            "prompts": self._prompts.state_dict() if self._prompts else None,
            "pretrain": self._pretrain.state_dict() if self._pretrain else None,
        }
        if self.critic is not None:
            state["critic_scheduler"] = self.critic_scheduler.state_dict()
        if self.need_optim_ckpt:
            state["actor_optim"] = self.actor_optim.state_dict()
            if self.critic is not None:
                state["critic_optim"] = self.critic_optim.state_dict()
        return state

    def _models(self) -> dict[str, nn.Module]:
        """The trained models by checkpoint name (no critic for a critic-free estimator)."""
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    def save_checkpoint(self) -> Path:
        """``{save_path}/checkpoints/step_{episode}/{actor,critic,trainer_state}`` (no critic when the run has
        none), written atomically."""
        path = checkpoint_dir(self.save_path, self.episode)
        save_checkpoint(self.strategy, path, self._models(), self._state(), tokenizer=self.tokenizer,
                        keep=self.save_total_limit)
        if self.strategy.is_rank0():
            logger.info("saved checkpoint %s", path)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        path = Path(path)
        for name, model in self._models().items():
            self.strategy.load_model(model, path / name)
        state = self.strategy.load_state(path / "trainer_state")
        if "actor_optim" in state:
            self.actor_optim.load_state_dict(state["actor_optim"])
            if self.critic is not None:
                self.critic_optim.load_state_dict(state["critic_optim"])
        self.actor_scheduler.load_state_dict(state["actor_scheduler"])
        if self.critic is not None:
            self.critic_scheduler.load_state_dict(state["critic_scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.experience_maker.load_state_dict(state.get("experience_maker") or  # checkpoints before it had one
                                              {"reward_stats": state["reward_stats"], "groups_made": 0})
        self.episode = state["episode"]
        self.optim_step = state["optim_step"]
        self.history = state.get("history", [])
        self.metrics.rewind(state.get("metrics_records"))
        if state.get("prompts") and self._prompts:
            self._prompts.load_state_dict(state["prompts"])
        if state.get("pretrain") and self._pretrain:
            self._pretrain.load_state_dict(state["pretrain"])
        if self.strategy.is_rank0():
            logger.info("resumed from %s at episode %d", path, self.episode)

    def save_model(self, path: str | os.PathLike | None = None) -> None:
        """Final models: the actor as the HF dir ``path`` itself (like the SFT and RM stages, so the next tool
        takes ``--pretrain path``; LoRA merged when ``merge_lora``) and the critic in ``{path}/critic``
        (HF dir + ``value_head.safetensors``) when the run has one. ``checkpoints/`` and ``metrics.jsonl``
        beside them are kept."""
        path = Path(path or self.save_path)
        self.strategy.save_model(self.actor, path, tokenizer=self.tokenizer, merge_lora=self.merge_lora)
        if self.critic is not None:
            self.strategy.save_model(self.critic, path / "critic", tokenizer=self.tokenizer,
                                     merge_lora=self.merge_lora)

    # ----- update phase ------------------------------------------------------------------------------
    def _sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else self.strategy.no_sync(model)

    def _policy_loss(self, log_probs: torch.Tensor, exp: Experience) -> tuple[torch.Tensor, dict[str, float]]:
        """The configured policy loss, plus the KL loss term when the KL is one, and their metrics."""
        cfg = self.config
        agg = dict(agg_mode=cfg.loss_agg_mode, norm_len=self._norm_len)
        # no stored old log-probs: this forward runs the weights that sampled (see _reuses_update_log_probs)
        old = exp.action_log_probs if exp.action_log_probs is not None else log_probs.detach()
        loss, metrics = self.policy_loss_fn(log_probs, old, exp.advantages, exp.action_mask,
                                            clip_low=cfg.eps_clip, clip_high=cfg.eps_clip_high,
                                            dual_clip=cfg.dual_clip, is_weights=exp.rollout_is_weights, **agg)
        out = {"actor/pg_loss": float(loss.detach()), **{f"actor/{k}": float(v) for k, v in metrics.items()}}
        if exp.ref_log_probs is not None:
            kl_loss = agg_loss(kl_estimate(log_probs, exp.ref_log_probs, cfg.kl_estimator), exp.action_mask,
                               cfg.loss_agg_mode, self._norm_len)
            out["actor/kl_loss"] = float(kl_loss.detach())
            out["actor/kl_clamped_share"] = float(kl_clamped_share(log_probs, exp.ref_log_probs, cfg.kl_estimator,
                                                                   exp.action_mask))
            loss = loss + self.kl_ctl.value * kl_loss
        return loss, out

    @property
    def _norm_len(self) -> int:
        """Dr. GRPO's constant length normaliser: the generation budget."""
        return self.config.max_new_tokens or self.config.max_seq_len

    def _weights(self, group: list[Experience]) -> tuple[list[float], list[float]]:
        """Each micro-batch's share of the optimizer step over every process, by valid tokens and by sequences
        (one all-reduce for both), times the number of processes, which DDP / FSDP divide the summed gradients
        by: the step is the aggregation of the global batch, whatever the processes' and micro-batches' sizes."""
        sizes = torch.tensor([[float(e.action_mask.sum()), float(e.batch_size)] for e in group], dtype=torch.float64)
        totals = self.strategy.all_reduce(sizes.sum(0), op="sum").cpu().clamp(min=1.0)
        shares = sizes * self.strategy.dp_size / totals
        return shares[:, 0].tolist(), shares[:, 1].tolist()

    def _actor_step(self, group: list[Experience]) -> dict[str, float]:
        strategy, actor = self.strategy, self.actor
        use_ptx = self._pretrain is not None and self.config.ptx_coef != 0
        temperature = self.config.scoring_temperature  # the distribution sampled, as the experience maker scored it
        sums: dict[str, float] = {}
        if self.config.log_entropy:
            sums["actor/entropy"] = 0.0
        if use_ptx:
            sums["actor/ptx_loss"] = 0.0
        token_weights, seq_weights = self._weights(group)
        weights = token_weights if self.config.loss_agg_mode == "token_mean" else seq_weights
        for i, (exp, weight, seq_weight) in enumerate(zip(group, weights, seq_weights)):
            last = i == len(group) - 1
            num_actions = exp.num_actions
            with self._sync(actor, last and not use_ptx):
                with strategy.autocast():
                    # the sampled distribution, as the experience maker scored it (entropy is of it too)
                    log_probs = actor(exp.sequences, attention_mask=exp.attention_mask, num_actions=num_actions,
                                      temperature=temperature, entropy=self.config.log_entropy)
                    if self.config.log_entropy:
                        log_probs, entropy = log_probs
                        sums["actor/entropy"] += seq_weight * float(
                            masked_mean(entropy, exp.action_mask, dim=-1).mean())
                loss, metrics = self._policy_loss(log_probs, exp)
                strategy.backward(loss * weight, actor, self.actor_optim)
            for k, v in metrics.items():
                if k in _EXTREMES:
                    sums[k] = _EXTREMES[k](sums.get(k, v), v)
                else:
                    sums[k] = sums.get(k, 0.0) + weight * v
            if use_ptx:
                batch = to_device(self._pretrain.next(), strategy.device)
                with self._sync(actor, last):
                    with strategy.autocast():
                        ptx_log_probs = actor(batch["input_ids"], labels=batch["labels"], reduction="sum",
                                              **model_inputs(batch))
                    ptx_loss = self.ptx_loss_fn.from_log_probs(ptx_log_probs, batch["labels"])
                    strategy.backward(ptx_loss * (self.config.ptx_coef / len(group)), actor, self.actor_optim)
                sums["actor/ptx_loss"] += float(ptx_loss.detach()) / len(group)
        sums["actor/grad_norm"] = strategy.optimizer_step(self.actor_optim, actor, self.actor_scheduler)
        sums["actor/lr"] = self.actor_scheduler.get_last_lr()[0]
        return sums

    def _critic_step(self, group: list[Experience]) -> dict[str, float]:
        strategy, critic = self.strategy, self.critic
        sums = {"critic/vf_loss": 0.0, "critic/vf_clipfrac": 0.0}
        for i, (exp, weight) in enumerate(zip(group, self._weights(group)[1])):
            with self._sync(critic, i == len(group) - 1):
                with strategy.autocast():
                    values = critic(exp.sequences, attention_mask=exp.attention_mask, num_actions=exp.num_actions)
                vf_loss, vf_metrics = self.value_loss_fn(values, exp.values, exp.returns, exp.action_mask)
                strategy.backward(vf_loss * (self.config.vf_coef * weight), critic, self.critic_optim)
            sums["critic/vf_loss"] += weight * float(vf_loss.detach())
            sums["critic/vf_clipfrac"] += weight * float(vf_metrics["clip_frac"])
        sums["critic/grad_norm"] = strategy.optimizer_step(self.critic_optim, critic, self.critic_scheduler)
        sums["critic/lr"] = self.critic_scheduler.get_last_lr()[0]
        return sums

    def _update_phase(self, timings: dict[str, float]) -> list[dict[str, float]]:
        """``num_update_steps x max_epochs`` shuffled passes over the buffer; returns each optimizer step's
        metrics and adds the seconds spent training to ``timings``."""
        timings["train_actor"] = 0.0
        self.actor.train()
        if self.critic is not None:
            timings["train_critic"] = 0.0
            self.critic.train()
        step_metrics = []
        device = self.strategy.device
        for update in range(self.config.num_update_steps * self.config.max_epochs):
            gen = torch.Generator().manual_seed(self.strategy.seed * 100003 + self.episode * 1009 + update)
            batches = list(self.buffer.micro_batches(self.config.train_batch_size, shuffle=True, generator=gen))
            group: list[Experience] = []
            for j, exp in enumerate(batches):
                group.append(exp.to(device))
                if len(group) < self._accumulation and j < len(batches) - 1:
                    continue
                t0 = time.perf_counter()
                metrics = self._actor_step(group)
                if update == 0 and not step_metrics:
                    self._check_on_policy(metrics)
                t1 = time.perf_counter()
                timings["train_actor"] += t1 - t0
                if self.critic is not None:
                    metrics.update(self._critic_step(group))
                    timings["train_critic"] += time.perf_counter() - t1
                self.optim_step += 1
                step_metrics.append(metrics)
                group = []
        return step_metrics

    @functools.cached_property
    def _compute_precision(self) -> str | None:
        """The actor's compute precision for the on-policy tolerance: the strategy's, or bf16 / fp16 where the
        actor holds low-precision weights (a frozen bf16 or quantized base under LoRA)."""
        if self.strategy.compute_precision is None:
            low = {p.dtype for p in self.strategy.unwrap(self.actor).parameters()} & {torch.bfloat16, torch.float16}
            return "bf16" if low else None
        return self.strategy.compute_precision

    def _check_on_policy(self, metrics: dict[str, float]) -> None:
        """Warn when the first update of a batch is off-policy: its ratios should be 1 (see _ON_POLICY_TOL)."""
        lo = float(self.strategy.all_reduce(torch.tensor(metrics["actor/ratio_min"]), op="min"))
        hi = float(self.strategy.all_reduce(torch.tensor(metrics["actor/ratio_max"]), op="max"))
        tol = _ON_POLICY_TOL[self._compute_precision]
        if max(hi - 1, 1 - lo) > tol and self.strategy.is_rank0():
            logger.warning("episode %d: the first update is off-policy: importance ratios in [%.4g, %.4g] where the "
                           "policy that sampled gives 1 (tolerance %g). Likely causes: dropout still on in the "
                           "model, sampling settings that change the scored distribution (temperature), or a rollout "
                           "engine whose log-probs differ from the trainer's", self.episode + 1, lo, hi, tol)

    # ----- metrics -----------------------------------------------------------------------------------
    def _episode_metrics(self, collected: _Collected, step_metrics: list[dict[str, float]]) -> dict[str, float]:
        """Experience statistics over every sample of every process, training metrics averaged over the
        episode's optimizer steps and processes, timings and throughput of this process."""
        strategy, infos, timings = self.strategy, collected.infos, collected.timings
        keys = [k for k in _EXPERIENCE_METRICS if all(k in info for info in infos)]
        stats = []
        for k in keys:
            x = torch.cat([info[k].float() for info in infos])
            stats += [float(x.sum()), float((x * x).sum()), float(x.numel())]
        train_keys = sorted(k for k in step_metrics[0] if k not in _EXTREMES) if step_metrics else []
        train = [sum(m[k] for m in step_metrics) / len(step_metrics) for k in train_keys]
        # groups whose scores are all equal (the task gives them no signal), of all groups
        informative = torch.cat([_informative_groups(info["score"], self.config.n_samples_per_prompt)
                                 for info in infos])
        stats += [float((~informative).sum()), float(informative.numel())]
        reduced_sum = strategy.all_reduce(torch.tensor(stats + [collected.tokens], dtype=torch.float64), op="sum").cpu()
        reduced_mean = strategy.all_reduce(torch.tensor(train, dtype=torch.float64), op="mean").cpu() \
            if train else []
        metrics: dict[str, float] = {}
        for i, k in enumerate(keys):
            s, ss, n = (float(v) for v in reduced_sum[3 * i: 3 * i + 3])
            mean = s / max(n, 1.0)
            name = _EXPERIENCE_METRICS[k]
            metrics[name] = mean
            if k in _WITH_STD:
                metrics[name[: -len("mean")] + "std"] = max(ss / max(n, 1.0) - mean * mean, 0.0) ** 0.5
        metrics["actor/reward_kl_penalty_coeff"] = self.kl_ctl.value
        for k, v in zip(train_keys, reduced_mean):
            metrics[k] = float(v)
        for k, pick in _EXTREMES.items():
            if step_metrics and k in step_metrics[0]:
                local = torch.tensor(pick(m[k] for m in step_metrics), dtype=torch.float64)
                metrics[k] = float(strategy.all_reduce(local, op=pick.__name__))
        if self.config.n_samples_per_prompt > 1:
            zero, groups = (float(v) for v in reduced_sum[3 * len(keys): 3 * len(keys) + 2])
            metrics["sampling/zero_adv_group_share"] = zero / max(groups, 1.0)
        total_tokens = float(reduced_sum[-1])
        samples = sum(len(info["score"]) for info in infos) * strategy.dp_size
        for k, v in timings.items():
            metrics[f"timing_s/{k}"] = v
        metrics["perf/samples_per_s"] = samples / max(timings["step"], 1e-9)
        metrics["perf/throughput"] = total_tokens / max(timings["step"], 1e-9) / strategy.world_size
        metrics["perf/total_num_tokens"] = total_tokens
        metrics["training/optim_steps"] = self.optim_step
        if all("logprob_diff_max" in info for info in infos):
            local = torch.tensor(max(float(info["logprob_diff_max"].max()) for info in infos), dtype=torch.float64)
            metrics["rollout/logprob_diff/max"] = float(strategy.all_reduce(local, op="max"))
        return metrics

    # ----- collection ---------------------------------------------------------------------------------
    def _dumps_rollouts(self, episode: int) -> bool:
        """Whether episode ``episode`` (1-based) goes to rollouts.jsonl (--rollout_log_interval)."""
        every = self.config.rollout_log_interval
        if not self.save_path or every == 0:
            return False
        if every is None:
            return episode <= _DUMP_FIRST or episode % _DUMP_EVERY == 0
        return episode % every == 0

    def _trim_rollouts(self) -> None:
        """At the start of fit: rollouts.jsonl keeps only the episodes this run has already taken (none for a
        fresh run, those up to the checkpoint for a resumed one), so it continues without duplicates."""
        path = Path(self.save_path or "", "rollouts.jsonl")
        if not self.save_path or not self.strategy.is_rank0():
            return
        path.parent.mkdir(parents=True, exist_ok=True)  # the dump may come before any other file there
        if not path.is_file():
            return
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= self.episode:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):  # a line cut short by a killed run
                    logger.warning("%s: dropping an unreadable line (a run killed while writing it)", path)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)

    def _dump_rollouts(self, exp: Experience) -> None:
        """Append every sample of ``exp`` (all processes') to SAVE_PATH/rollouts.jsonl, one JSON line each:
        what was generated, its score, its reward after shaping, its advantage and its KL (per-sequence sums)."""
        maker, info = self.experience_maker, exp.info
        prompt_ids = exp.sequences[:, : -exp.num_actions]
        prompt_mask = exp.attention_mask[:, : -exp.num_actions].bool()
        prompts = [maker.tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
                   for ids, m in zip(prompt_ids, prompt_mask)]
        responses = maker.decode_responses(exp.sequences, exp.action_mask)
        zeros = torch.zeros_like(info["score"])
        columns = {"response_len": info["response_length"], "group": info["group"], "score": info["score"],
                   "overlong_penalty": info.get("overlong_penalty", zeros), "reward": info["reward"],
                   "advantage": info["advantage"], "kl": info.get("kl_seq", zeros),
                   "weight_version": info.get("weight_version", zeros)}
        columns = {k: v.tolist() for k, v in columns.items()}
        ints = ("response_len", "group", "weight_version")
        records = [{"step": self.episode + 1, "prompt": p, "response": r,
                    **{k: (int(v[i]) if k in ints else v[i]) for k, v in columns.items()}}
                   for i, (p, r) in enumerate(zip(prompts, responses))]
        gathered = self.strategy.all_gather_object(records)
        if self.strategy.is_rank0():
            with open(Path(self.save_path) / "rollouts.jsonl", "a") as f:
                for part in gathered:
                    f.writelines(json.dumps(rec) + "\n" for rec in part)

    def _experience(self, prompts_per_batch: int, collected: _Collected) -> Experience:
        """One prompt batch made into experience and counted in ``collected``; the rollout dump and the adaptive KL
        controller see it."""
        exp = self.experience_maker.make_experience(self._prompts.next())
        if self._dumps_rollouts(self.episode + 1):
            self._dump_rollouts(exp)
        if "kl_seq" in exp.info:
            kl_seq = float(self.strategy.all_reduce(exp.info["kl_seq"].float().mean(), op="mean"))
            self.kl_ctl.update(kl_seq, prompts_per_batch * self.strategy.dp_size * self.config.n_samples_per_prompt)
        collected.add(exp)
        return exp

    def _collect(self, prompts_per_batch: int) -> _Collected:
        """Fill the buffer for one episode; the LR schedules then follow the optimizer steps the buffer gives."""
        collected = _Collected()
        if self.config.dynamic_sampling:
            collected.sampling = self._collect_dynamic(prompts_per_batch, collected)
        else:
            for _ in range(self.config.num_collect_steps):
                self.buffer.append(self._experience(prompts_per_batch, collected))
        self._correct_schedule()
        return collected

    def _collect_dynamic(self, prompts_per_batch: int, collected: _Collected) -> dict[str, float]:
        """DAPO dynamic sampling: keep groups whose rewards differ until the episode holds its number of groups.
        Every process runs the same number of generation rounds (sharded models generate collectively): go on
        while any process still needs groups, up to max_sampling_rounds per prompt batch."""
        strategy, n = self.strategy, self.config.n_samples_per_prompt
        target = self.config.num_collect_steps * prompts_per_batch
        kept = generated = rounds = 0
        while rounds < self.config.num_collect_steps * self.config.max_sampling_rounds:
            if float(strategy.all_reduce(torch.tensor(float(kept < target)), op="max")) == 0:
                break
            exp = self._experience(prompts_per_batch, collected)
            rounds += 1
            informative = _informative_groups(exp.info["score"], n)
            generated += informative.numel()
            groups = informative.nonzero().flatten()[: max(target - kept, 0)]
            if len(groups):
                rows = (groups.unsqueeze(-1) * n + torch.arange(n, device=groups.device)).flatten()
                self.buffer.append(exp.select(rows))
                kept += len(groups)
        # the same number of samples on every process, so every process takes the same optimizer steps
        least = int(strategy.all_reduce(torch.tensor(float(kept)), op="min"))
        del self.buffer.items[least * n:]
        totals = strategy.all_reduce(torch.tensor([float(generated), float(least), float(rounds)],
                                                  dtype=torch.float64), op="sum").cpu()
        dropped = 1.0 - float(totals[1]) / max(float(totals[0]), 1.0)
        return {"sampling/dropped_group_share": dropped,
                "sampling/generation_rounds": float(totals[2]) / strategy.dp_size}

    # ----- main loop ----------------------------------------------------------------------------------
    def fit(self, prompt_dataloader: DataLoader, pretrain_dataloader: DataLoader | None = None, *,
            num_episodes: int | None = None, num_collect_steps: int | None = None,
            num_update_steps: int | None = None, resume_from: str | os.PathLike | None = None,
            ) -> list[dict[str, float]]:
        """Run the loop; returns one metrics dict per episode. Each episode: collect -> update -> log ->
        checkpoint. Loop sizes given here are inputs to the config (Coati's ``fit`` signature)."""
        sizes = {k: v for k, v in (("num_episodes", num_episodes), ("num_collect_steps", num_collect_steps),
                                   ("num_update_steps", num_update_steps)) if v is not None}
        if sizes:
            self.config = self.experience_maker.config = make_config(self.config, **sizes)
        self._start(prompt_dataloader, pretrain_dataloader, resume_from)
        bar = tqdm(total=self.config.num_episodes, initial=self.episode, desc="ppo",
                   disable=not self.strategy.is_rank0(), dynamic_ncols=True)
        while self.episode < self.config.num_episodes:
            t_start = time.perf_counter()
            collected = self._collect(prompt_dataloader.batch_size or 1)
            step_metrics = self._update_phase(collected.timings)
            t_sync = time.perf_counter()  # the next rollouts' policy, stamped with its optimizer step
            self.experience_maker.update_weights(self.actor, version=self.optim_step)
            collected.timings["weight_sync"] = time.perf_counter() - t_sync
            self.buffer.clear()
            self.episode += 1
            collected.timings["step"] = time.perf_counter() - t_start
            self._log(bar, {**self._episode_metrics(collected, step_metrics), **collected.sampling})
            if self.save_path and self.save_interval and self.episode % self.save_interval == 0:
                self.save_checkpoint()
        bar.close()
        if self.save_path:
            self.save_model(self.save_path)
        self.metrics.close()
        return self.history

    def _start(self, prompt_loader: DataLoader, pretrain_loader: DataLoader | None,
               resume_from: str | os.PathLike | None) -> None:
        """Data cycles, LR schedules, whether collection scores old log-probs, sampling seeds, a resumed state."""
        self._prompts = _Cycle(prompt_loader)
        self._pretrain = _Cycle(pretrain_loader) if pretrain_loader is not None else None
        check_optimizer(self.config.optim, ptx=self._pretrain is not None and self.config.ptx_coef != 0)
        self._build_schedulers(prompt_loader)
        self.experience_maker.score_old_log_probs(not self._reuses_update_log_probs(prompt_loader))
        # models are built (identically on every rank): from here each rank samples its own rollouts; a
        # resumed run restores every rank's stream from its checkpoint
        self.strategy.set_sampling_seed()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            self.experience_maker.update_weights(self.actor, version=self.optim_step)  # the restored weights
        self._trim_rollouts()

    def _log(self, bar: tqdm, metrics: dict[str, float]) -> None:
        self.history.append({"step": self.episode, **metrics})
        bar.update(1)
        kl = metrics.get("actor/reward_kl_penalty", metrics.get("actor/kl_loss"))  # the KL the run uses
        bar.set_postfix(score=f"{metrics.get('critic/score/mean', float('nan')):.3f}",
                        **({"kl": f"{kl:.4f}"} if kl is not None else {}))
        if self.episode % self.log_interval == 0 or self.episode == self.config.num_episodes:
            self.metrics.log(self.episode, metrics, prefix="ppo")
