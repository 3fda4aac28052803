"""Turn a batch of prompts into an :class:`Experience`: sample responses, score them, compute advantages.

Per batch: repeat each prompt ``n_samples_per_prompt`` times (one group id per prompt); sample with the rollout
engine (:mod:`coati.rollout`; default HF ``generate`` on the actor); score with the reference policy (when
there is a KL term), the critic (only for an estimator that needs values) and a reward model or function (plus
DAPO's overlong penalty); put the sequence reward on the last response token (and, with
``kl_placement="reward"``, ``-kl_coef * KL`` on every token); then advantages from
``coati.rl.ADV_ESTIMATORS[adv_estimator]``. With LoRA and no separate reference model, the reference is the
actor with its adapter disabled (no second copy).

Rollouts sample with exactly the settings given here (the checkpoint's ``generation_config.json`` never
applies, see :meth:`~coati.models.Actor.generate`), and every log-prob PPO uses (old, reference, and the
update's new ones) is taken under ``log_softmax(logits / temperature)``: the distribution the tokens were
sampled from. top-k / top-p truncation is not applied to the log-probs, so with either on the ratio and
the KL penalty are biased; the defaults (temperature 1, no top-k / top-p) sample from the scored policy.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from coati.errors import MissingInputError, UsageError
from coati.experience.experience import Experience
from coati.models.utils import masked_mean
from coati.rewards import RewardFn, call_reward_fn
from coati.rl import (ADV_ESTIMATORS, FixedKLController, RLConfig, compute_reward, kl_clamped_share,
                      logprob_diff_stats, make_config, make_kl_controller, overlong_penalty, rollout_is_weights)
from coati.rollout import HFRolloutEngine, Rollout, RolloutEngine, cut_at_stop_strings

logger = logging.getLogger("coati")

# PromptCollator fields that are not per-sample extras for a reward function.
_BATCH_KEYS = ("input_ids", "attention_mask", "prompts")
# Generation settings that are RLConfig fields: the log-probs depend on them, so generate_kwargs cannot set them.
_SAMPLING_FIELDS = {"do_sample", "temperature", "top_k", "top_p", "max_new_tokens"}


class RunningMoments:
    """Running mean / std of sequence rewards over every process, for ``normalize_reward``."""

    def __init__(self, strategy: Any = None) -> None:
        self.strategy = strategy
        self.count = 0.0
        self.mean = 0.0
        self.var = 1.0

    def update(self, x: torch.Tensor) -> None:
        stats = torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x * x).sum()]).float()
        if self.strategy is not None:
            stats = self.strategy.all_reduce(stats, op="sum")
        n, s, ss = (float(v) for v in stats)
        if n == 0:
            return
        b_mean = s / n
        b_var = max(ss / n - b_mean * b_mean, 0.0)
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 0.0) ** 0.5

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.var = state["count"], state["mean"], state["var"]


def _repeat_batch(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """Every per-sample entry of a PromptCollator batch repeated ``n`` times in place (rows 0..n-1 answer
    prompt 0, ...)."""
    if n == 1:
        return batch
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            out[k] = v.repeat_interleave(n, dim=0)
        elif isinstance(v, (list, tuple)):
            out[k] = [x for x in v for _ in range(n)]
        else:
            out[k] = v
    return out


@dataclass
class Scored:
    """What :meth:`ExperienceMaker.score` returns: ``score`` (B,) from the reward model or function, the critic's
    ``values`` (B, A) and the reference's ``ref_log_probs`` (B, A), each None where the algorithm has no use."""

    score: torch.Tensor
    values: torch.Tensor | None
    ref_log_probs: torch.Tensor | None


@dataclass
class Shaped:
    """What :meth:`ExperienceMaker.shape` returns: the per-token ``token_rewards`` (B, A), the sequence-level
    ``seq_reward`` (B,) the group estimators read, DAPO's ``overlong_penalty`` (B,) when on, and the KL
    coefficient applied in the reward (0 when the KL is not there)."""

    token_rewards: torch.Tensor
    seq_reward: torch.Tensor
    overlong_penalty: torch.Tensor | None
    kl_coef: float


class ExperienceMaker:
    """Builds experiences for PPO and the critic-free methods.

    ``actor``/``critic`` may be strategy-wrapped (DDP); inference here uses the unwrapped modules. ``critic``
    is used (and required) only by an estimator that needs values (gae). ``initial_model`` is the frozen
    reference actor; leave it None when the actor has LoRA to use the actor with its adapter disabled (with
    no KL term no reference is needed). Give ``reward_model`` or ``reward_fn`` (see :mod:`coati.rewards`).
    ``config`` (an :class:`~coati.rl.RLConfig`) holds the settings; keyword arguments override its fields.
    ``kl_ctl`` holds the KL coefficient (default: made from the config; a float makes a fixed controller).
    ``engine`` generates (default :class:`~coati.rollout.HFRolloutEngine` on the unwrapped actor).
    ``old_log_probs=False`` skips the no-grad actor forward that scores the sampled tokens (experiences carry
    ``action_log_probs=None``): exact only when the update's forward runs the very weights that sampled, which
    PPOTrainer decides; refused when the KL is in the reward or adaptive (both need those log-probs here).
    """

    def __init__(
        self,
        actor: nn.Module,
        critic: nn.Module | None = None,
        reward_model: nn.Module | None = None,
        initial_model: nn.Module | None = None,
        *,
        tokenizer: Any,
        reward_fn: RewardFn | None = None,
        kl_ctl: FixedKLController | float | None = None,
        strategy: Any = None,
        generate_kwargs: dict[str, Any] | None = None,
        config: RLConfig | None = None,
        old_log_probs: bool = True,
        engine: RolloutEngine | None = None,
        **overrides: Any,
    ) -> None:
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("give exactly one reward source: reward_model or reward_fn")
        cfg = self.config = make_config(config, **overrides)
        if cfg.max_new_tokens is None and cfg.max_seq_len is None:
            raise ValueError("set max_new_tokens or max_seq_len for generation")
        if cfg.needs_critic and critic is None:
            raise ValueError(f"adv_estimator {cfg.adv_estimator!r} needs a critic")
        self.actor = actor
        self.critic = critic if cfg.needs_critic else None
        self.reward_model = reward_model
        self.initial_model = initial_model
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        if kl_ctl is None:
            kl_ctl = make_kl_controller(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.kl_ctl = kl_ctl if isinstance(kl_ctl, FixedKLController) else FixedKLController(kl_ctl)
        self.reward_stats = RunningMoments(strategy)
        self.strategy = strategy
        clash = sorted(set(generate_kwargs or {}) & _SAMPLING_FIELDS)
        if clash:
            raise ValueError(f"generate_kwargs {clash}: sampling settings are config fields (RLConfig), so every "
                             f"log-prob is taken under the distribution sampled")
        self.sampling = {"do_sample": cfg.do_sample, **(generate_kwargs or {})}
        if cfg.do_sample:
            self.sampling.update(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        self.temperature = cfg.scoring_temperature  # log-probs are those of the sampled distribution
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.engine = engine if engine is not None else HFRolloutEngine(
            self._unwrap(actor), eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            autocast=self._autocast)
        self.groups_made = 0  # prompts made into experience by this process: the next group id
        self.weight_version = 0  # the optimizer step of the weights rollouts must come from
        self._warned_len = False
        if cfg.uses_reference and initial_model is None and not getattr(self._unwrap(actor), "lora_enabled", False):
            raise ValueError("no reference model: pass initial_model (a frozen copy of the starting actor) or "
                             "use LoRA, whose disabled adapter is the reference")
        self.score_old_log_probs(old_log_probs)

    def score_old_log_probs(self, enabled: bool) -> None:
        """Whether :meth:`generate` scores the sampled tokens' log-probs (see ``old_log_probs``)."""
        cfg = self.config
        if not enabled and cfg.uses_reference and (cfg.kl_placement == "reward" or cfg.target_kl is not None):
            raise ValueError("old_log_probs=False: a KL penalty in the reward or an adaptive KL needs the old "
                             "log-probs while making experience")
        self.old_log_probs = enabled

    # ----- helpers ------------------------------------------------------------------------------------
    def _unwrap(self, model: nn.Module | None) -> nn.Module | None:
        if model is None or self.strategy is None:
            return model
        return self.strategy.unwrap(model)

    @property
    def device(self) -> torch.device:
        if self.strategy is not None:
            return self.strategy.device
        return next(self._unwrap(self.actor).parameters()).device

    @contextlib.contextmanager
    def _on_device(self, model: nn.Module | None) -> Iterator[None]:
        """With ``offload_ref_reward``, bring a CPU-resident frozen model to the device for one use."""
        if model is None or not self.config.offload_ref_reward or self.device.type == "cpu":
            yield
            return
        model.to(self.device)
        try:
            yield
        finally:
            model.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _inference(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return self.strategy.inference_context(model) if self.strategy is not None else contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager:
        return self.strategy.autocast() if self.strategy is not None else contextlib.nullcontext()

    def _generation_kwargs(self, prompt_width: int) -> dict[str, Any]:
        new_tokens, max_seq_len = self.config.max_new_tokens, self.config.max_seq_len
        if new_tokens is None:
            new_tokens = max_seq_len - prompt_width
            if new_tokens < 1 and not self._warned_len:
                logger.warning("max_seq_len %d leaves no room after a %d-token prompt batch; generating 1 token "
                               "(raise --max_seq_len or set --max_new_tokens)", max_seq_len, prompt_width)
                self._warned_len = True
            new_tokens = max(1, new_tokens)
        return {**self.sampling, "max_new_tokens": new_tokens}

    def decode_responses(self, sequences: torch.Tensor, action_mask: torch.Tensor) -> list[str]:
        """Response texts without EOS, padding and other special tokens."""
        actions = sequences[:, -action_mask.size(1):]
        return [self.tokenizer.decode([t for t, m in zip(row, mask) if m], skip_special_tokens=True)
                for row, mask in zip(actions.tolist(), action_mask.tolist())]

    def _clipped(self, rollout: Rollout) -> torch.Tensor:
        """1.0 for responses cut by the token limit (neither an EOS among their valid tokens nor a stop string)."""
        actions, action_mask = rollout.sequences[:, -rollout.num_actions:], rollout.action_mask
        eos = torch.as_tensor(self.eos_token_id, device=actions.device).reshape(-1)
        ended = (torch.isin(actions, eos) & action_mask.bool()).any(-1)
        if rollout.stopped is not None:
            ended |= rollout.stopped
        return (~ended).float()

    @torch.no_grad()
    def _sequence_reward(self, batch: dict[str, Any], sequences: torch.Tensor, attention_mask: torch.Tensor,
                         action_mask: torch.Tensor) -> torch.Tensor:
        if self.reward_model is not None:
            with self._on_device(self.reward_model), self._autocast():
                return self._unwrap(self.reward_model)(sequences, attention_mask).float()
        prompts = batch.get("prompts")
        if prompts is None:
            prompts = self.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        responses = self.decode_responses(sequences, action_mask)
        extras = {k: v for k, v in batch.items() if k not in _BATCH_KEYS}
        scores = call_reward_fn(self.reward_fn, list(prompts), responses, self.config.n_samples_per_prompt,
                                **extras)
        return torch.tensor(scores, dtype=torch.float32, device=sequences.device)

    @torch.no_grad()
    def _ref_log_probs(self, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int) -> torch.Tensor:
        if self.initial_model is not None:
            with self._on_device(self.initial_model), self._autocast():
                return self._unwrap(self.initial_model)(sequences, attention_mask, num_actions=num_actions,
                                                        temperature=self.temperature)
        actor = self._unwrap(self.actor)
        with actor.disable_adapter(), self._autocast():
            return actor(sequences, attention_mask, num_actions=num_actions, temperature=self.temperature)

    # ----- the stages: generate -> score -> shape -> advantages ----------------------------------------------
    def _group_ids(self, num_prompts: int, device: torch.device) -> torch.Tensor:
        """One id per prompt, unique over the run and over processes (``groups_made``, saved in
        :meth:`state_dict`, counts this process's prompts), repeated for its samples."""
        rank, world = (self.strategy.dp_rank, self.strategy.dp_size) if self.strategy is not None else (0, 1)
        ids = (torch.arange(num_prompts, device=device) + self.groups_made) * world + rank
        self.groups_made += num_prompts
        return ids.repeat_interleave(self.config.n_samples_per_prompt)

    def generate(self, batch: dict[str, Any]) -> Rollout:
        """Sample the responses of a (repeated) prompt batch and, unless the update scores them itself, their
        log-probs under the actor."""
        input_ids = batch["input_ids"].to(self.device)
        prompt_mask = batch["attention_mask"].to(self.device)
        with self._inference(self.actor):  # one gather of the actor for generating and scoring
            rollout = self.engine.generate(input_ids, prompt_mask, self._generation_kwargs(input_ids.size(1)),
                                           return_log_probs=self.old_log_probs)
            if rollout.weight_version is not None and rollout.weight_version != self.weight_version:
                raise RuntimeError(f"a rollout came from weight version {rollout.weight_version}, the trainer is at "
                                   f"{self.weight_version}: the engine missed a weight sync")
            if self.config.stop:
                # without clean-up a prefix decodes to a prefix of the longer text (cut_at_stop_strings relies on it)
                decode = lambda ids: self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
                rollout = cut_at_stop_strings(rollout, self.config.stop, decode, self.pad_token_id)
            if rollout.engine_log_probs is not None and rollout.log_probs is None:
                # another engine sampled: the trainer's log-probs of its tokens (old log-probs, the log-prob
                # diff and the rollout correction all need them)
                with self._autocast():
                    rollout.log_probs = self._unwrap(self.actor)(
                        rollout.sequences, rollout.attention_mask, num_actions=rollout.num_actions,
                        temperature=self.temperature).float()
            return rollout

    @torch.no_grad()
    def score(self, batch: dict[str, Any], rollout: Rollout) -> Scored:
        """What the frozen models say about a rollout: each sequence's score (reward model or function), the
        critic's values and the reference log-probs, where the algorithm uses them."""
        sequences, attention_mask, num_actions = rollout.sequences, rollout.attention_mask, rollout.num_actions
        values = ref_log_probs = None
        if self.critic is not None:
            with self._inference(self.critic), self._autocast():
                values = self._unwrap(self.critic)(sequences, attention_mask, num_actions=num_actions).float()
            values = values * rollout.action_mask.float()
        if self.config.uses_reference:
            ref_log_probs = self._ref_log_probs(sequences, attention_mask, num_actions).float()
        score = self._sequence_reward(batch, sequences, attention_mask, rollout.action_mask)
        return Scored(score, values, ref_log_probs)

    @torch.no_grad()
    def shape(self, rollout: Rollout, scored: Scored) -> Shaped:
        """From scores to rewards: DAPO's overlong penalty (against the configured budget, never a batch's
        width), reward normalisation, the KL penalty in the reward, the sequence reward on the last token."""
        cfg, action_mask = self.config, rollout.action_mask
        reward, penalty = scored.score, None
        if cfg.overlong_buffer_len:
            penalty = overlong_penalty(action_mask.float().sum(-1), cfg.max_new_tokens, cfg.overlong_buffer_len,
                                       cfg.overlong_penalty_factor)
            reward = reward + penalty
        if cfg.normalize_reward:
            self.reward_stats.update(reward)
            reward = (reward - self.reward_stats.mean) / (self.reward_stats.std + 1e-8)
        kl_coef = self.kl_ctl.value if cfg.kl_placement == "reward" and scored.ref_log_probs is not None else 0.0
        if kl_coef:
            token_rewards = compute_reward(reward, kl_coef, rollout.log_probs, scored.ref_log_probs, action_mask,
                                           reward_clip=cfg.reward_clip, kl_estimator=cfg.kl_estimator)
            # a KL penalty in the reward reaches the sequence-level estimators too (RLOO's r - beta * KL, as
            # TRL's RLOOTrainer does): the score minus kl_coef x the response's summed KL
            seq_reward = token_rewards.sum(-1)
        else:  # the same numbers without a KL term: the sequence reward on the last valid token
            no_kl = torch.zeros_like(action_mask, dtype=torch.float32)
            token_rewards = compute_reward(reward, 0.0, no_kl, no_kl, action_mask, reward_clip=cfg.reward_clip)
            seq_reward = reward if cfg.reward_clip is None else reward.clamp(-cfg.reward_clip, cfg.reward_clip)
        return Shaped(token_rewards, seq_reward, penalty, kl_coef)

    @torch.no_grad()
    def advantages(self, rollout: Rollout, scored: Scored, shaped: Shaped,
                   group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(advantages, returns)`` of the configured estimator (:data:`coati.rl.ADV_ESTIMATORS`)."""
        cfg = self.config
        return ADV_ESTIMATORS[cfg.adv_estimator](
            token_rewards=shaped.token_rewards, values=scored.values, mask=rollout.action_mask,
            scores=shaped.seq_reward, group=group, gamma=cfg.gamma, lam=cfg.lam,
            whiten_advantages=cfg.whiten_advantages,
            reduce_sum=None if self.strategy is None else lambda t: self.strategy.all_reduce(t, op="sum"))

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Actor and critic in eval mode while making experience, back to what they were after."""
        models = [m for m in (self._unwrap(self.actor), self._unwrap(self.critic)) if m is not None]
        was_training = [m.training for m in models]
        for m in models:
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip(models, was_training):
                m.train(mode)

    @torch.no_grad()
    def make_experience(self, batch: dict[str, Any]) -> Experience:
        """``batch`` is a PromptCollator batch (left-padded ``input_ids``, ``attention_mask``, ``prompts``,
        extras) on any device; each prompt yields ``n_samples_per_prompt`` samples of one group. The stages'
        seconds come back in ``Experience.timings`` (``generate``: sampling and the old log-probs;
        ``make_experience``: scoring, shaping and advantages)."""
        group = self._group_ids(batch["input_ids"].size(0), self.device)
        batch = _repeat_batch(batch, self.config.n_samples_per_prompt)
        with self._eval_mode():
            t0 = time.perf_counter()
            rollout = self.generate(batch)
            t1 = time.perf_counter()
            scored = self.score(batch, rollout)
            shaped = self.shape(rollout, scored)
            advantages, returns = self.advantages(rollout, scored, shaped, group)
        return self._experience(rollout, scored, shaped, advantages, returns, group,
                                timings={"generate": t1 - t0, "make_experience": time.perf_counter() - t1})

    def _experience(self, rollout: Rollout, scored: Scored, shaped: Shaped, advantages: torch.Tensor,
                    returns: torch.Tensor, group: torch.Tensor, timings: dict[str, float]) -> Experience:
        """The experience and its per-sample logging ``info`` (see PPOTrainer's metric names)."""
        cfg, action_mask, log_probs, ref = self.config, rollout.action_mask, rollout.log_probs, scored.ref_log_probs
        mask = action_mask.float()
        prompt_width = rollout.sequences.size(1) - rollout.num_actions
        info = {
            "group": group,
            "score": scored.score,
            "reward": shaped.token_rewards.sum(-1),
            "advantage": masked_mean(advantages, action_mask, dim=-1),
            "response_length": mask.sum(-1),
            "prompt_length": rollout.attention_mask[:, :prompt_width].float().sum(-1),
            "response_clipped": self._clipped(rollout),
        }
        if ref is not None and log_probs is not None:
            log_ratio = (log_probs - ref) * mask
            info["kl"] = masked_mean(log_ratio, action_mask, dim=-1)
            info["kl_seq"] = log_ratio.sum(-1)
        if shaped.kl_coef:
            info["kl_clamped"] = kl_clamped_share(log_probs, ref, cfg.kl_estimator, action_mask, dim=-1)
        if scored.values is not None:
            info["return"] = masked_mean(returns, action_mask, dim=-1)
            info["value"] = masked_mean(scored.values, action_mask, dim=-1)
        if shaped.overlong_penalty is not None:
            info["overlong_penalty"] = shaped.overlong_penalty
        version = self.weight_version if rollout.weight_version is None else rollout.weight_version
        info["weight_version"] = torch.full_like(mask[:, 0], float(version))
        is_weights = None
        if rollout.engine_log_probs is not None and log_probs is not None:
            engine_lp = rollout.engine_log_probs.to(log_probs.device)
            info.update(logprob_diff_stats(log_probs, engine_lp, action_mask, cfg.logprob_diff_threshold))
            is_weights = rollout_is_weights(cfg.rollout_is, log_probs, engine_lp, action_mask,
                                            cap=cfg.rollout_is_cap, mask_threshold=cfg.rollout_mask_threshold)
            if is_weights is not None:
                info["rollout_is_weight"] = masked_mean(is_weights, action_mask, dim=-1)
        keep_ref = ref is not None and cfg.kl_placement == "loss"
        return Experience(
            sequences=rollout.sequences,
            attention_mask=rollout.attention_mask,
            action_mask=action_mask,
            action_log_probs=log_probs * mask if log_probs is not None else None,
            values=scored.values,
            returns=returns if scored.values is not None else None,
            advantages=advantages,
            ref_log_probs=ref * mask if keep_ref else None,
            group=group,
            rollout_is_weights=is_weights,
            info=info,
            timings=timings,
        )

    # ----- state ------------------------------------------------------------------------------------------
    def update_weights(self, actor: nn.Module, version: int | None = None) -> None:
        """The next rollouts' policy: hand the trained actor to the rollout engine; ``version`` (the optimizer
        step) is the weight version rollouts must come from from now on (engines without versions ignore it).
        Every process calls it together: the strategy-wrapped actor's shards are gathered by the engine as it
        loads them (the vLLM engine all-gathers FSDP parameters one at a time)."""
        if "version" in inspect.signature(self.engine.update_weights).parameters:
            self.engine.update_weights(self._unwrap(actor), version=version)
        else:
            self.engine.update_weights(self._unwrap(actor))
        # only after the sync succeeded; an engine that keeps versions says which one it holds now
        held = getattr(self.engine, "weight_version", None)
        if held is not None or version is not None:
            self.weight_version = held if held is not None else version

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly: the running reward statistics and the group count."""
        return {"reward_stats": self.reward_stats.state_dict(), "groups_made": self.groups_made}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reward_stats.load_state_dict(state["reward_stats"])
        self.groups_made = state["groups_made"]


def load_reward_fn(spec: str) -> RewardFn:
    """``"module:function"`` (module importable from ``sys.path`` / PYTHONPATH) or ``"path/to/file.py:function"``.

    The function is called as ``f(prompts: list[str], responses: list[str], **extras) -> list[float]``, per batch
    or (marked with :func:`coati.rewards.per_group`) per group, and may be ``async def`` (see :mod:`coati.rewards`).
    """
    import importlib
    import importlib.util
    from pathlib import Path

    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise UsageError(f"--reward_fn must look like module:function or path/to/file.py:function, got {spec!r}")
    if module_name.endswith(".py") or Path(module_name).is_file():
        path = Path(module_name)
        if not path.is_file():
            raise MissingInputError(f"--reward_fn: no file {path}")
        mod_spec = importlib.util.spec_from_file_location(f"coati_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is None or not (module_name + ".").startswith(err.name + "."):
                raise  # the reward module exists but imports something missing: its own traceback helps
            raise UsageError(f"--reward_fn: no module {module_name!r} on sys.path / PYTHONPATH") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UsageError(f"--reward_fn: {module_name} has no function {func_name!r}")
    return fn
