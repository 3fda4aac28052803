"""The pipeline runner behind ``python -m coati.pipeline``: SFT -> reward model -> PPO end to end, on CPU,
with nothing downloaded.

By default coati generates its arithmetic task (:mod:`coati.pipeline.task`) and a character tokenizer and
trains a tiny LLaMA from scratch: SFT on imperfect demonstrations, a reward model on (correct, slipped) answer
pairs, then PPO against that reward model, all through coati's datasets and trainers (the code path of
``examples/train_*.py``). The reward model is standardised (mean 0, std 1 over the SFT policy's answers to the
training prompts) so that ``--kl_coef`` weighs the KL against a reward of known spread. After each stage a
table reports held-out task accuracy, the reward model's held-out pair accuracy, the mean reward of the
policy's samples and their KL to the SFT policy; ``summary.json`` keeps the numbers.

``--algo`` replaces the last two stages: a critic-free method (``grpo``, ``rloo`` ...) rewarded 1 / 0 by the
task's checker, or a DPO-family loss (``dpo``, ``ipo``, ``orpo``, ``simpo``) on the reward model's pairs with
the SFT model as the reference. Their reward column is the checker's mean reward (the sampled accuracy); for
the DPO family ``rm_pair_acc`` is the held-out pair accuracy of the implicit reward.

``--pretrain`` / ``--dataset`` / ``--preference_dataset`` / ``--prompt_dataset`` run the same stages on your
own model and data (the rest stay built-in); task accuracy is reported only for the built-in prompts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from .. import rl
from ..dataset import (PackingCollator, PackingPreferenceCollator, PackingRewardCollator, PreferenceCollator,
                       PreferenceDataset, PromptCollator, PromptDataset, RewardCollator, RewardDataset, SFTCollator,
                       SFTDataset, split_dataset)
from ..errors import UsageError
from ..models import Actor, Critic, RewardModel, packing_attention
from ..models.loading import checkpoint_model_type
from ..models.families import resolve_packing
from ..plot import plot_run_if_possible
from ..trainer import DPOTrainer, PPOTrainer, PreferenceConfig, RewardModelTrainer, SFTTrainer, TrainConfig
from ..trainer.strategies import NaiveStrategy
from ..utils.config import BoolFlag, Bounded, Parser, add_config_args
from ..utils.optim import OPTIMIZERS
from .evaluation import evaluate_policy, standardize_reward_model
from .task import WRONG_KINDS, ArithmeticTask, exact_match_reward, write_jsonl
from .tokenizer import build_tokenizer

logger = logging.getLogger("coati")

# Sizes. "default" is the README run (about 2 minutes on one CPU core); "quick" is the test-suite run. The rl_*
# sizes are those of the critic-free methods (--algo grpo ...), the dpo_* ones those of the DPO family.
_DEFAULT_SIZES = dict(hidden_size=64, num_layers=4, num_eval=300, sft_per_question=16, sft_steps=1500,
                      sft_batch_size=64, sft_lr=3e-3, rm_per_question=9, rm_steps=4800, rm_batch_size=32,
                      rm_lr=7e-4, rm_patience=2, ppo_episodes=250, ppo_batch_size=64, ppo_train_batch_size=64,
                      ppo_lr=1e-4, critic_lr=1e-4, eval_samples=4, rl_episodes=250, rl_batch_size=16,
                      n_samples_per_prompt=8, rl_lr=1e-4, dpo_steps=600, dpo_batch_size=32, dpo_lr=3e-5)
SIZES: dict[str, dict[str, Any]] = {
    "default": _DEFAULT_SIZES,
    "quick": {**_DEFAULT_SIZES, "num_eval": 200, "sft_steps": 800, "rm_steps": 2400, "rm_patience": 0,
              "ppo_episodes": 80, "eval_samples": 2, "rl_episodes": 120, "dpo_steps": 200, "dpo_lr": 1e-4},
}
# --algo: PPO against the reward model, a critic-free method of coati.rl rewarded by the task's checker, or a
# DPO-family loss on the preference pairs.
CRITIC_FREE = tuple(name for name, preset in rl.PRESETS.items()
                    if not rl.ADV_ESTIMATORS[preset["adv_estimator"]].needs_critic)
PREFERENCE = ("dpo", "ipo", "orpo", "simpo")
ALGOS = ("ppo", *CRITIC_FREE, *PREFERENCE)
CURVE_POINTS = 25  # RL stages log (and curves.png draws) this many points
ENGINE_GROUP = "rollout engine"  # RLConfig's flag group of --rollout_engine and its settings
# vLLM's CPU attention kernels start at head size 32: the built-in model's heads have that size under vLLM
VLLM_HEAD_SIZE = 32


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m coati.pipeline",
        description="RLHF end to end: SFT -> reward model -> PPO. With no arguments: a tiny LLaMA learns "
                    "two-number addition from imperfect demonstrations, a reward model learns to check the "
                    "answers, and PPO raises the policy's accuracy. --algo grpo (or another critic-free method) "
                    "runs SFT -> GRPO with the task's checker as the reward; --algo dpo runs SFT -> DPO on the "
                    "reward model's pairs. CPU only, nothing downloaded.")
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="./coati_pipeline",
                   help="where data files, models (sft/, rm/, ppo/ or one dir named after --algo), metrics and "
                        "summary.json go")
    g.add_argument("--algo", default="ppo", choices=ALGOS,
                   help="stages after SFT: ppo = reward model, then PPO against it; a critic-free method (README: "
                        "Algorithms) = its --algo preset of train_prompts.py, rewarded 1 / 0 by the built-in task's "
                        "checker, no reward model or critic; dpo / ipo / orpo / simpo = that loss of train_dpo.py on "
                        "the reward model's preference pairs, no reward model")
    g.add_argument("--seed", type=Bounded(int, ">= 0"), default=42, help="seed for data generation, initialisation and sampling")
    g.add_argument("--preset", default="default", choices=sorted(SIZES),
                   help="size preset; the flags below override single values (None = from the preset)")
    g.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="same as --preset quick: the reduced run of the test suite (a few minutes)")
    g.add_argument("--threads", type=Bounded(int, ">= 1"), default=1,
                   help="torch CPU threads; the tiny default model runs fastest on 1 (more threads only contend)")
    g.add_argument("--log_interval", type=Bounded(int, ">= 1"), default=100, help="print trainer metrics every N steps")
    g.add_argument("--optim", default="adamw_torch", choices=list(OPTIMIZERS),
                   help="every stage's optimizer (README: Memory-light training); the presets' learning rates are "
                        "AdamW's: give lomo / adalomo their own with the --*_lr flags")
    _add_data_args(p.add_argument_group("your own model and data (each optional; the built-in task fills the rest)"))
    t = p.add_argument_group("built-in task")
    t.add_argument("--low", type=Bounded(int, ">= 0"), default=10, help="smallest number in a question")
    t.add_argument("--high", type=Bounded(int, ">= 0"), default=49, help="largest number in a question")
    t.add_argument("--slip_rate", type=Bounded(float, "[0, 1]"), default=0.3,
                   help="share of SFT demonstrations whose last digit is off by 1 or 2")
    t.add_argument("--num_eval", type=Bounded(int, ">= 1"), default=None, help="held-out questions (never trained on)")
    t.add_argument("--hidden_size", type=Bounded(int, ">= 4"), default=None, help="tiny LLaMA hidden size")
    t.add_argument("--num_layers", type=Bounded(int, ">= 1"), default=None, help="tiny LLaMA layers")
    _add_stage_args(p.add_argument_group("stage sizes and learning rates"))
    # train_prompts.py's rollout-engine flags, declared once in RLConfig; they apply to the RL stage
    add_config_args(p, rl.RLConfig, only_groups=[ENGINE_GROUP])
    return p


def _add_data_args(d: argparse._ArgumentGroup) -> None:
    d.add_argument("--pretrain", default=None,
                   help="HF causal-LM dir to fine-tune instead of a tiny LLaMA trained from scratch")
    d.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --pretrain's, else the built-in one)")
    d.add_argument("--dataset", default=None, help="SFT data (any format SFTDataset reads)")
    d.add_argument("--preference_dataset", default=None,
                   help="reward-model pairs (any format RewardDataset reads); --eval_ratio of it is held out")
    d.add_argument("--prompt_dataset", default=None,
                   help="PPO prompts (any format PromptDataset reads); --eval_ratio of it is held out")
    d.add_argument("--prompt_template", default=None, choices=["auto", "alpaca", "chatml", "none"],
                   help="prompt format for every stage (default: none for the built-in data, else auto)")
    d.add_argument("--eval_ratio", type=Bounded(float, "[0, 1)"), default=0.1,
                   help="share of your --preference_dataset / --prompt_dataset held out for the table")
    d.add_argument("--max_len", type=Bounded(int, ">= 1"), default=512, help="max tokens of an SFT / reward sample")
    d.add_argument("--packing", action=BoolFlag, default="auto",
                   help="SFT, reward and preference batches packed without padding (train_sft.py's --packing); "
                        "auto = where the architecture keeps packed samples apart (the built-in LLaMA does)")
    d.add_argument("--max_new_tokens", type=Bounded(int, ">= 1"), default=None,
                   help="response tokens generated in PPO and evaluation (default: 4 built-in, 64 otherwise)")


def _add_stage_args(s: argparse._ArgumentGroup) -> None:
    s.add_argument("--sft_per_question", type=Bounded(int, ">= 1"), default=None, help="SFT demonstrations per training question")
    s.add_argument("--sft_steps", type=Bounded(int, ">= 1"), default=None, help="SFT optimizer steps")
    s.add_argument("--sft_batch_size", type=Bounded(int, ">= 1"), default=None, help="SFT batch size")
    s.add_argument("--sft_lr", type=Bounded(float, "> 0"), default=None, help="SFT peak learning rate (warmup + cosine)")
    s.add_argument("--rm_per_question", type=Bounded(int, ">= 1"), default=None, help="preference pairs per training question")
    s.add_argument("--rm_steps", type=Bounded(int, ">= 1"), default=None, help="reward-model optimizer steps")
    s.add_argument("--rm_batch_size", type=Bounded(int, ">= 1"), default=None, help="reward-model batch size (pairs)")
    s.add_argument("--rm_lr", type=Bounded(float, "> 0"), default=None, help="reward-model peak learning rate")
    s.add_argument("--rm_patience", type=Bounded(int, ">= 0"), default=None,
                   help="stop the reward model when its held-out pair accuracy has gained less than 0.005 over its "
                        "best in this many epochs in a row (train_reward_model.py's --early_stop_patience; 0 = "
                        "all --rm_steps)")
    s.add_argument("--ppo_episodes", type=Bounded(int, ">= 1"), default=None,
                   help="PPO episodes (each: one batch of rollouts, then one pass of updates)")
    s.add_argument("--ppo_batch_size", type=Bounded(int, ">= 1"), default=None, help="prompts per PPO episode")
    s.add_argument("--ppo_train_batch_size", type=Bounded(int, ">= 1"), default=None, help="PPO update micro-batch size")
    s.add_argument("--ppo_lr", type=Bounded(float, "> 0"), default=None, help="actor learning rate in PPO")
    s.add_argument("--critic_lr", type=Bounded(float, "> 0"), default=None, help="critic learning rate in PPO")
    s.add_argument("--kl_coef", type=Bounded(float, ">= 0"), default=1.0,
                   help="KL coefficient of the RL stage: ppo's per-token KL penalty against rewards standardised to "
                        "mean 0, std 1 over the SFT policy's answers; a critic-free method's KL term where its preset "
                        "puts it (their own 0-0.05 trade held-out greedy answers for sampled ones; at 1.0 grpo, gspo "
                        "and dapo keep them all, rloo, reinforce_pp and dr_grpo lose 2-4 of 200 on --quick)")
    s.add_argument("--rl_episodes", type=Bounded(int, ">= 1"), default=None,
                   help="critic-free --algo: episodes (each: one batch of rollouts, then one optimizer step)")
    s.add_argument("--rl_batch_size", type=Bounded(int, ">= 1"), default=None, help="critic-free --algo: prompts per episode")
    s.add_argument("--n_samples_per_prompt", type=Bounded(int, ">= 2"), default=None,
                   help="critic-free --algo: answers sampled per prompt (one group)")
    s.add_argument("--rl_lr", type=Bounded(float, "> 0"), default=None, help="critic-free --algo: policy learning rate")
    s.add_argument("--dpo_steps", type=Bounded(int, ">= 1"), default=None, help="DPO-family --algo: optimizer steps")
    s.add_argument("--dpo_batch_size", type=Bounded(int, ">= 1"), default=None, help="DPO-family --algo: pairs per batch")
    s.add_argument("--dpo_lr", type=Bounded(float, "> 0"), default=None, help="DPO-family --algo: peak learning rate")
    s.add_argument("--beta", type=Bounded(float, "> 0"), default=None,
                   help="DPO-family --algo: inverse temperature of the implicit reward (train_dpo.py's --beta; "
                        "unset: the --algo's own)")
    s.add_argument("--sft_coef", type=Bounded(float, ">= 0"), default=3.0,
                   help="DPO-family --algo: weight of an NLL term on the chosen answers (train_dpo.py's --sft_coef, "
                        "RPO): without it DPO lowers the right answers' likelihood too and costs greedy answers "
                        "(at 1.0 with --dpo_lr 1e-4, DPO lost 1-5 of 300 on seeds 42, 1, 7; at 3.0 with 3e-5, none)")
    s.add_argument("--eval_samples", type=Bounded(int, ">= 1"), default=None,
                   help="sampled answers per held-out prompt for the accuracy / reward / KL columns")


def resolve_sizes(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left at None from the preset."""
    for key, value in SIZES[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


# ----- data --------------------------------------------------------------------------------------------

def write_builtin_data(task: ArithmeticTask, args: argparse.Namespace, data_dir: Path) -> dict[str, Path]:
    """Generate the task's files; held-out questions appear only in the ``*_eval`` files."""
    train_q, eval_q = task.split(args.seed, args.num_eval)
    rng = random.Random(args.seed)
    return {
        "sft": write_jsonl(data_dir / "sft.jsonl", task.sft_records(train_q, args.sft_per_question, rng)),
        "preference": write_jsonl(data_dir / "preference.jsonl",
                                  task.preference_records(train_q, args.rm_per_question, rng)),
        "preference_eval": write_jsonl(data_dir / "preference_eval.jsonl",
                                       task.preference_records(eval_q, len(WRONG_KINDS), rng)),
        "prompts": write_jsonl(data_dir / "prompts.jsonl", task.prompt_records(train_q)),
        "prompts_eval": write_jsonl(data_dir / "prompts_eval.jsonl", task.prompt_records(eval_q)),
    }


def _check_answer(prompt: str, response: str, extras: dict) -> bool:
    answer = extras.get("answer")
    if answer is not None:
        return response.strip() == str(answer).strip()
    return ArithmeticTask.is_correct(prompt, response)


def tiny_llama(tokenizer: Any, hidden_size: int, num_layers: int, for_vllm: bool = False) -> Any:
    """The built-in model; under vLLM its heads have vLLM's CPU head size."""
    from transformers import LlamaConfig

    heads = hidden_size // VLLM_HEAD_SIZE if for_vllm else 4
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=tokenizer.model_max_length, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


# ----- the table ---------------------------------------------------------------------------------------

COLUMNS = (("stage", "{}"), ("acc(sampled)", "{:.3f}"), ("acc(greedy)", "{:.3f}"), ("rm_pair_acc", "{:.3f}"),
           ("reward", "{:+.3f}"), ("kl", "{:.3f}"), ("time_s", "{:.0f}"))


def format_table(rows: list[dict[str, Any]]) -> str:
    header = [name for name, _ in COLUMNS]
    body = [[fmt.format(r[name]) if r.get(name) is not None else "-" for name, fmt in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(b) for b in body])


# ----- the stages after SFT without a reward model -----------------------------------------------------------

class _Run:
    """One pipeline run: its data, tokenizer and held-out prompts, then the stages in order, each adding a row to
    the table and its numbers to ``summary``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.algo = args, args.algo
        self.out = Path(args.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        for stage in ("sft", "rm", "ppo") if self.algo == "ppo" else ("sft", self.algo):
            (self.out / stage / "metrics.jsonl").unlink(missing_ok=True)  # trainers append: start afresh
        self.strategy = NaiveStrategy(seed=args.seed)
        self.builtin_model = args.pretrain is None
        if args.tokenizer or args.pretrain:
            from ..utils.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(args.tokenizer or args.pretrain)
        else:
            self.tokenizer = build_tokenizer()
        task = ArithmeticTask(low=args.low, high=args.high, slip_rate=args.slip_rate)
        self.files = write_builtin_data(task, args, self.out / "data")
        builtin_prompts = args.prompt_dataset is None
        self.template = args.prompt_template or ("none" if args.dataset is None and args.preference_dataset is None
                                                 and builtin_prompts else "auto")
        self.max_new_tokens = args.max_new_tokens or (4 if builtin_prompts else 64)
        self.checker = _check_answer if builtin_prompts else None
        self.timings: dict[str, float] = {}
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {"seed": args.seed, "preset": args.preset, "algo": self.algo,
                                        "prompt_template": self.template}
        # held-out prompts, through the same dataset class the RL stage uses
        prompt_kw = dict(prompt_template=self.template, seed=args.seed)
        if builtin_prompts:
            self.train_prompts = PromptDataset(self.files["prompts"], self.tokenizer, **prompt_kw)
            held = PromptDataset(self.files["prompts_eval"], self.tokenizer, **prompt_kw)
            self.eval_items = [held[i] for i in range(len(held))]
        else:
            prompts_all = PromptDataset(args.prompt_dataset, self.tokenizer, **prompt_kw)
            self.train_prompts, held = split_dataset(prompts_all, args.eval_ratio, args.seed)
            held = held if held is not None else self.train_prompts
            self.eval_items = [held[i] for i in range(min(len(held), args.num_eval))]
        model_type = "llama" if self.builtin_model else checkpoint_model_type(args.pretrain)
        self.packing = resolve_packing(args.packing, "auto", model_type)
        self.uses_vllm = args.rollout_engine == "vllm"

    def rollout_engine(self, policy: Actor) -> Any:
        """vLLM on the saved SFT model (the RL stage's starting weights), in the policy's precision; None for HF
        generate on the policy itself."""
        if not self.uses_vllm:
            return None
        from ..rollout.vllm import VLLMEngine

        args, tokenizer = self.args, self.tokenizer
        config = policy.model.config
        max_len = min(getattr(config, "max_position_embeddings", None) or 10**9, args.max_len + self.max_new_tokens)
        cpu = {} if torch.cuda.is_available() else dict(
            enforce_eager=True, kv_cache_memory_bytes=_kv_cache_bytes(config, policy, max_len * self.rollout_rows))
        return VLLMEngine(self.out / "sft", eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          dtype=str(next(policy.parameters()).dtype).removeprefix("torch."), seed=args.seed,
                          gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                          tensor_parallel_size=args.vllm_tensor_parallel_size, sleep=args.vllm_sleep,
                          sync_timeout_s=args.vllm_sync_timeout_s, max_model_len=max_len, **cpu)

    @property
    def rollout_rows(self) -> int:
        """Responses sampled in one RL episode."""
        args = self.args
        return args.ppo_batch_size if self.algo == "ppo" else args.rl_batch_size * args.n_samples_per_prompt

    def table(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        print("\n" + format_table(self.rows) + "\n", flush=True)

    def evaluate(self, actor: Actor, reward_model: RewardModel | None = None, reference: Actor | None = None,
                 tag: str = "") -> dict[str, float]:
        t0 = time.perf_counter()
        res = evaluate_policy(actor, self.tokenizer, self.eval_items, max_new_tokens=self.max_new_tokens,
                              checker=self.checker, reward_model=reward_model, reference=reference,
                              samples_per_prompt=self.args.eval_samples, seed=self.args.seed + 1)
        self.timings[f"eval_{tag}"] = time.perf_counter() - t0
        return res

    def train_config(self, stage: str, loader: Any, save_as: str | None = None) -> TrainConfig:
        """The supervised loop's config of ``stage`` ("sft", "rm", "dpo"): its ``--{stage}_steps`` and
        ``--{stage}_lr``, as many epochs over ``loader`` as the steps need, saved under ``output_dir/save_as``."""
        steps = getattr(self.args, f"{stage}_steps")
        return TrainConfig(batch_size=loader.batch_size, lr=getattr(self.args, f"{stage}_lr"), max_steps=steps,
                           optim=self.args.optim,
                           max_epochs=max(1, math.ceil(steps / max(1, len(loader)))),
                           save_path=str(self.out / (save_as or stage)), log_interval=self.args.log_interval,
                           early_stop_patience=getattr(self.args, f"{stage}_patience", 0))

    def _data_kw(self) -> dict[str, Any]:
        return dict(max_len=self.args.max_len, prompt_template=self.template, seed=self.args.seed)

    def _pair_loaders(self, dataset_cls: type, collator_cls: type, packing_cls: type, model: Any,
                      batch_size: int) -> tuple[Any, Any]:
        """Training and held-out loaders of preference pairs: ``--preference_dataset`` split by ``--eval_ratio``,
        else the task's pairs and held-out pairs; training batches packed where ``--packing`` is on."""
        args, tokenizer, strategy = self.args, self.tokenizer, self.strategy
        if args.preference_dataset:
            train, held = split_dataset(dataset_cls(args.preference_dataset, tokenizer, **self._data_kw()),
                                        args.eval_ratio, args.seed)
        else:
            train = dataset_cls(self.files["preference"], tokenizer, **self._data_kw())
            held = dataset_cls(self.files["preference_eval"], tokenizer, **self._data_kw())
        collate = collator_cls(tokenizer.pad_token_id)
        train_collate = (packing_cls(tokenizer.pad_token_id, args.max_len, attention=packing_attention(model))
                         if self.packing else collate)
        train_dl = strategy.setup_dataloader(train, min(batch_size, len(train)), shuffle=True,
                                             collate_fn=train_collate, drop_last=True)
        held_dl = strategy.setup_dataloader(held, 256, shuffle=False, collate_fn=collate) if held is not None else None
        return train_dl, held_dl

    # ----- stage 1: SFT ------------------------------------------------------------------------------------
    def sft(self) -> Actor:
        args, strategy, tokenizer = self.args, self.strategy, self.tokenizer
        t0 = time.perf_counter()
        strategy.set_seed(args.seed)
        actor = (Actor.from_config(tiny_llama(tokenizer, args.hidden_size, args.num_layers, self.uses_vllm))
                 if self.builtin_model else Actor.from_pretrained(args.pretrain))
        actor = strategy.prepare_model(actor)
        data = SFTDataset(args.dataset or self.files["sft"], tokenizer, **self._data_kw())
        pad_id = tokenizer.pad_token_id
        collate = (PackingCollator(pad_id, args.max_len, attention=packing_attention(actor)) if self.packing
                   else SFTCollator(pad_id))
        loader = strategy.setup_dataloader(data, min(args.sft_batch_size, len(data)), shuffle=True,
                                           collate_fn=collate, drop_last=True)
        sft = SFTTrainer(actor, strategy, loader, train_config=self.train_config("sft", loader), tokenizer=tokenizer)
        sft.fit()
        self.timings["sft"] = time.perf_counter() - t0
        res = self.sft_eval = self.evaluate(actor, tag="sft")
        self.summary.update(sft_accuracy=res.get("accuracy"), sft_accuracy_greedy=res.get("accuracy_greedy"),
                            sft_loss_start=sft.history[0]["loss"], sft_loss_end=sft.history[-1]["loss"])
        # without a reward model the reward column is the checker's mean reward, i.e. the sampled accuracy
        self.table({"stage": "sft", "acc(sampled)": res.get("accuracy"), "acc(greedy)": res.get("accuracy_greedy"),
                    "reward": None if self.algo == "ppo" else res.get("accuracy"), "kl": 0.0,
                    "time_s": self.timings["sft"]})
        return actor

    # ----- stage 2: reward model ----------------------------------------------------------------------------
    def reward_model(self, actor: Actor) -> RewardModel:
        args, strategy, tokenizer, out = self.args, self.strategy, self.tokenizer, self.out
        t0 = time.perf_counter()
        strategy.set_seed(args.seed)
        reward_model = strategy.prepare_model(RewardModel.from_pretrained(out / "sft"))
        rm_dl, rm_eval_dl = self._pair_loaders(RewardDataset, RewardCollator, PackingRewardCollator, reward_model,
                                               args.rm_batch_size)
        trainer = RewardModelTrainer(reward_model, strategy, rm_dl, rm_eval_dl,
                                     train_config=self.train_config("rm", rm_dl), tokenizer=tokenizer)
        trainer.fit()
        self.timings["rm"] = time.perf_counter() - t0
        self.rm_metrics = trainer.eval_history[-1] if trainer.eval_history else {}
        # Scores on the scale --kl_coef is measured in: mean 0, std 1 over the SFT policy's training answers.
        n_scale = min(len(self.train_prompts), 1024)
        rm_scale = standardize_reward_model(strategy.unwrap(reward_model), actor, tokenizer,
                                            [self.train_prompts[i]["input_ids"] for i in range(n_scale)],
                                            max_new_tokens=self.max_new_tokens, seed=args.seed + 2)
        strategy.save_model(reward_model, out / "rm", tokenizer=tokenizer)
        scored = self.sft_scored = self.evaluate(actor, reward_model=reward_model, tag="rm")
        self.summary.update(rm_accuracy=self.rm_metrics.get("acc"), rm_margin=self.rm_metrics.get("margin"),
                            rm_steps_trained=trainer.global_step,
                            rm_raw_score_mean=rm_scale["mean"], rm_raw_score_std=rm_scale["std"],
                            sft_reward=scored["reward"])
        self.table({"stage": "rm", "acc(sampled)": scored.get("accuracy"), "acc(greedy)": scored.get("accuracy_greedy"),
                    "rm_pair_acc": self.rm_metrics.get("acc"), "reward": scored["reward"], "kl": 0.0,
                    "time_s": self.timings["rm"]})
        return reward_model

    # ----- stage 3: PPO against the reward model --------------------------------------------------------------
    def ppo(self, reward_model: RewardModel) -> None:
        args, strategy, tokenizer, out = self.args, self.strategy, self.tokenizer, self.out
        t0 = time.perf_counter()
        strategy.set_seed(args.seed)
        policy = Actor.from_pretrained(out / "sft")
        reference = Actor.from_pretrained(out / "sft")
        critic = Critic.from_pretrained(out / "rm")
        prompt_dl = strategy.setup_dataloader(self.train_prompts, min(args.ppo_batch_size, len(self.train_prompts)),
                                              shuffle=True, collate_fn=PromptCollator(tokenizer.pad_token_id),
                                              drop_last=True)
        ppo = PPOTrainer(strategy, policy, critic, reward_model, reference, tokenizer=tokenizer,
                         engine=self.rollout_engine(policy), **engine_settings(args),
                         kl_coef=args.kl_coef, ptx_coef=0.0, num_episodes=args.ppo_episodes, num_collect_steps=1,
                         num_update_steps=1, max_epochs=1, train_batch_size=args.ppo_train_batch_size,
                         lr=args.ppo_lr, critic_lr=args.critic_lr, optim=args.optim, max_new_tokens=self.max_new_tokens,
                         save_path=str(out / "ppo"), log_interval=max(1, args.ppo_episodes // CURVE_POINTS), log_entropy=False)
        history = ppo.fit(prompt_dl)
        self.timings["ppo"] = time.perf_counter() - t0
        res = self.evaluate(ppo.actor, reward_model=reward_model, reference=reference, tag="ppo")
        scores = [h.get("critic/score/mean") for h in history]
        self.summary.update(ppo_accuracy=res.get("accuracy"), ppo_accuracy_greedy=res.get("accuracy_greedy"),
                            ppo_reward_start=self.sft_scored["reward"], ppo_reward_end=res["reward"],
                            ppo_kl=res["kl"], ppo_train_score_first=scores[0] if scores else None,
                            ppo_train_score_last=scores[-1] if scores else None)
        self.table({"stage": "ppo", "acc(sampled)": res.get("accuracy"), "acc(greedy)": res.get("accuracy_greedy"),
                    "rm_pair_acc": self.rm_metrics.get("acc"), "reward": res["reward"], "kl": res["kl"],
                    "time_s": self.timings["ppo"]})

    # ----- stage 2': a critic-free method or a DPO-family loss -------------------------------------------------
    def algorithm(self) -> None:
        algo, out = self.algo, self.out
        reference = Actor.from_pretrained(out / "sft")  # the KL column's reference (and the trainers')
        t0 = time.perf_counter()
        if algo in CRITIC_FREE:
            final, pair_acc = self.critic_free(reference).actor, None
        else:
            trainer = self.preference(reference)
            final, pair_acc = trainer.model, (trainer.eval_history[-1].get("rewards/accuracies")
                                              if trainer.eval_history else None)
        self.timings[algo] = time.perf_counter() - t0
        res = self.evaluate(final, reference=reference, tag=algo)
        self.summary.update({"sft_reward": self.sft_eval.get("accuracy"), f"{algo}_accuracy": res.get("accuracy"),
                             f"{algo}_accuracy_greedy": res.get("accuracy_greedy"),
                             f"{algo}_reward": res.get("accuracy"), f"{algo}_kl": res["kl"],
                             f"{algo}_pair_accuracy": pair_acc})
        self.table({"stage": algo, "acc(sampled)": res.get("accuracy"), "acc(greedy)": res.get("accuracy_greedy"),
                    "rm_pair_acc": pair_acc, "reward": res.get("accuracy"), "kl": res["kl"],
                    "time_s": self.timings[algo]})

    def critic_free(self, reference: Actor) -> PPOTrainer:
        """SFT -> ``--algo`` (GRPO, RLOO, ...): train_prompts.py's preset on the training prompts, every answer
        rewarded 1 / 0 by the task's checker; one optimizer step per episode over all its samples (on-policy)."""
        args, strategy, tokenizer, prompts = self.args, self.strategy, self.tokenizer, self.train_prompts
        strategy.set_seed(args.seed)
        policy = Actor.from_pretrained(self.out / "sft")
        prompt_dl = strategy.setup_dataloader(prompts, min(args.rl_batch_size, len(prompts)), shuffle=True,
                                              collate_fn=PromptCollator(tokenizer.pad_token_id), drop_last=True)
        trainer = PPOTrainer(strategy, policy, None, None, reference, tokenizer=tokenizer,
                             engine=self.rollout_engine(policy), **engine_settings(args),
                             reward_fn=exact_match_reward, algo=args.algo,
                             n_samples_per_prompt=args.n_samples_per_prompt,
                             kl_coef=args.kl_coef, ptx_coef=0.0, num_episodes=args.rl_episodes, num_collect_steps=1,
                             num_update_steps=1, max_epochs=1,
                             train_batch_size=prompt_dl.batch_size * args.n_samples_per_prompt, lr=args.rl_lr,
                             optim=args.optim,
                             max_new_tokens=self.max_new_tokens, save_path=str(self.out / args.algo),
                             log_interval=max(1, args.rl_episodes // CURVE_POINTS), log_entropy=False)
        trainer.fit(prompt_dl)
        return trainer

    def preference(self, reference: Actor) -> DPOTrainer:
        """SFT -> ``--algo`` (DPO, IPO, ORPO, SimPO): train_dpo.py's trainer on the pairs the reward model would
        train on (``--preference_dataset``, else the task's), the SFT model as the reference."""
        args, strategy, tokenizer = self.args, self.strategy, self.tokenizer
        strategy.set_seed(args.seed)
        policy = strategy.prepare_model(Actor.from_pretrained(self.out / "sft"))
        train_dl, held_dl = self._pair_loaders(PreferenceDataset, PreferenceCollator, PackingPreferenceCollator,
                                               policy, args.dpo_batch_size)
        config = PreferenceConfig(loss_type=args.algo, beta=args.beta, sft_coef=args.sft_coef)
        trainer = DPOTrainer(policy, strategy, train_dl, held_dl, config=config,
                             ref_model=reference if config.uses_reference else None,
                             train_config=self.train_config("dpo", train_dl, save_as=args.algo), tokenizer=tokenizer)
        trainer.fit()
        return trainer

    def finish(self, t_start: float) -> dict[str, Any]:
        out, timings = self.out, self.timings
        models = ({"sft": str(out / "sft"), "reward_model": str(out / "rm"), "ppo": str(out / "ppo")}
                  if self.algo == "ppo" else {"sft": str(out / "sft"), self.algo: str(out / self.algo)})
        timings["total"] = time.perf_counter() - t_start
        self.summary.update(timings_s=timings, models=models, data={k: str(v) for k, v in self.files.items()},
                            threads=torch.get_num_threads(), args={k: v for k, v in vars(self.args).items()})
        self.summary["curves"] = plot_run_if_possible(out, self.summary)
        (out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        print(f"summary: {out / 'summary.json'} (total {timings['total']:.0f} s on {torch.get_num_threads()} "
              f"thread(s))", flush=True)
        return self.summary


def _kv_cache_bytes(config: Any, policy: Actor, tokens: int) -> int:
    """vLLM's KV cache for ``tokens`` positions at once (K and V, every layer), at least 64 MiB: on CPU vLLM would
    otherwise reserve a share of the machine's memory."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * next(policy.parameters()).element_size()
    return max(per_token * tokens, 64 * 2**20)


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The RL stage's --rollout_engine settings, as RLConfig fields."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(rl.RLConfig)
            if f.metadata.get("group") == ENGINE_GROUP}


def check_engine(args: argparse.Namespace) -> None:
    """Refuse --rollout_engine settings the run cannot use, before any data or model is made (one line each)."""
    engine = engine_settings(args)
    if args.algo in PREFERENCE:
        if args.rollout_engine != "hf":
            raise UsageError(f"--rollout_engine picks what samples the RL stage's rollouts; --algo {args.algo} "
                             f"samples none")
        return
    groups = args.n_samples_per_prompt if args.algo in CRITIC_FREE else 1
    rl.make_config(algo=args.algo, n_samples_per_prompt=groups, **engine)  # what RLConfig refuses (--rollout_is + hf)
    if args.rollout_engine != "vllm":
        return
    from ..rollout.vllm import import_vllm

    import_vllm()
    if args.vllm_sleep and not torch.cuda.is_available():
        raise UsageError("--vllm_sleep frees vLLM's GPU memory during updates: it needs a GPU (none here)")
    if args.pretrain is None and (args.hidden_size or SIZES[args.preset]["hidden_size"]) % VLLM_HEAD_SIZE:
        raise UsageError(f"--rollout_engine vllm gives the built-in model heads of size {VLLM_HEAD_SIZE}: "
                         f"--hidden_size must be a multiple of {VLLM_HEAD_SIZE}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """SFT, then the reward model and PPO (``--algo ppo``) or the one stage of ``--algo``; the table after each."""
    args = resolve_sizes(args)
    if args.algo in CRITIC_FREE and args.prompt_dataset is not None:
        raise UsageError(f"--algo {args.algo} is rewarded by the built-in task's checker, which cannot check answers "
                         f"to --prompt_dataset; run examples/train_prompts.py --algo {args.algo} --reward_fn ... "
                         f"instead")
    check_engine(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    stages = _Run(args)
    actor = stages.sft()
    if args.algo == "ppo":
        stages.ppo(stages.reward_model(actor))
    else:
        stages.algorithm()
    return stages.finish(t_start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return run(args)


