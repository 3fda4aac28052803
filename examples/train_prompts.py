"""Stage 3: PPO (PPO-ptx with --pretrain_dataset), GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO or GSPO (--algo) of an
SFT model against a reward model or a Python reward.

    torchrun --standalone --nproc_per_node=2 examples/train_prompts.py --pretrain SFT_OUT --model llama \
        --rm_pretrain SFT_OUT --rm_path RM_OUT --strategy ddp --prompt_dataset prompts.jsonl \
        --pretrain_dataset pretrain.jsonl --num_episodes 10 --num_collect_steps 10 --num_update_steps 5 \
        --experience_batch_size 8 --train_batch_size 8 --lora_rank 16 --save_path PPO_OUT

    # a verifiable reward instead of a reward model (GSM8K-style: the record's `answer` reaches the function)
    python examples/train_prompts.py --pretrain SFT_OUT --prompt_dataset gsm8k_train.jsonl \
        --reward_fn my_rewards.py:gsm8k_correct --save_path PPO_OUT

    # GRPO with the built-in GSM8K checker: no critic, no reward model
    python examples/train_prompts.py --algo grpo --n_samples_per_prompt 8 --pretrain SFT_OUT \
        --prompt_dataset ../shared/data/eval/gsm8k_train.jsonl --reward_fn coati.rewards:gsm8k --save_path GRPO_OUT

Outputs: the trained actor as the HF model dir ``{save_path}`` (as train_sft.py writes it),
``{save_path}/critic`` (+ value head; only for --adv_estimator gae, the critic-free methods have none),
``{save_path}/metrics.jsonl`` and, with --save_interval,
``{save_path}/checkpoints/step_{episode}/{actor,critic,trainer_state}``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from coati.dataset import PackingCollator, PretrainDataset, PromptCollator, PromptDataset, SFTCollator
from coati.errors import UsageError
from coati.experience.maker import load_reward_fn
from coati.models import FAMILIES, Actor, Critic, RewardModel, packing_attention
from coati.models.lora import check_ppo_train_bias
from coati.models.quant import check_strategy_support, quant_mode
from coati.models.sharing import SharedBaseRewardModel, shared_critic_and_reward
from coati.trainer import resolve_resume
from coati.trainer.ppo import PPOTrainer
from coati.rl import RLConfig
from coati import cli, compat
from coati.utils.config import add_config_args, config_from_args
from coati.utils.tokenizer import load_tokenizer

log = logging.getLogger("coati")


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser("coati stage 3: PPO / PPO-ptx, or a critic-free method (--algo grpo, dr_grpo, rloo, "
                        "reinforce_pp, dapo, gspo), of a causal LM against a reward model or reward function. "
                        "Every dropout of actor and critic (the model's own and --lora_dropout) is off during PPO, "
                        "so rollouts are scored and updated under one policy")
    cli.add_model_args(p)
    cli.add_lora_args(p)
    cli.add_quant_args(p)
    cli.add_strategy_args(p)
    r = p.add_argument_group("reward and critic")
    r.add_argument("--rm_pretrain", default=None,
                   help="base model dir of the reward model (its LM weights); default: --pretrain")
    r.add_argument("--rm_model", default=None, choices=sorted(FAMILIES),
                   help="reward model family (default: --model)")
    r.add_argument("--rm_path", default=None,
                   help="trained reward model: a dir from train_reward_model.py, or a state-dict / value-head file "
                        "loaded on top of --rm_pretrain")
    r.add_argument("--reward_fn", default=None,
                   help="Python reward instead of a reward model: module:function or path/to/file.py:function, "
                        "called as f(prompts, responses, **record_fields) -> list[float] on a whole rollout batch, or "
                        "once per prompt on its n_samples_per_prompt responses when the function has "
                        "reward_per_group = True (decorator coati.rewards.per_group); an async def function is "
                        "awaited, the calls of a batch concurrently (coati/rewards.py)")
    r.add_argument("--critic_pretrain", default=None,
                   help="critic start point (--adv_estimator gae only); default: the reward model (--rm_path / "
                        "--rm_pretrain), else --pretrain")
    d = p.add_argument_group("data")
    d.add_argument("--prompt_dataset", required=True, help="prompt file or dir (prompt / instruction / question / "
                                                           "text / messages records)")
    d.add_argument("--pretrain_dataset", default=None,
                   help="data for the PPO-ptx LM loss (off when absent): any SFT format (Alpaca, messages, ShareGPT, "
                        "source/target ...; loss on the responses, prompts rendered with --prompt_template) or "
                        "{text} lines / .txt (loss on every token)")
    d.add_argument("--max_datasets_size", type=cli.Bounded(int, ">= 1"), default=None,
                   help="use at most this many prompt / pretrain records")
    d.add_argument("--max_input_len", type=cli.Bounded(int, ">= 1"), default=96, help="max prompt tokens (longer prompts are skipped)")
    d.add_argument("--ptx_max_len", type=cli.Bounded(int, ">= 1"), default=None,
                   help="max tokens per pretraining sample (default: --max_seq_len)")
    d.add_argument("--prompt_template", default="auto", choices=["auto", "alpaca", "chatml", "none"],
                   help="prompt format; must match the SFT stage")
    cli.add_empty_records_arg(d)
    cli.add_batching_args(d)
    groups = add_config_args(p, RLConfig, {"data": d})
    t, m = groups["PPO"], groups["memory"]
    t.add_argument("--experience_batch_size", type=cli.Bounded(int, ">= 1"), default=8, help="prompts per generation batch per process")
    t.add_argument("--ptx_batch_size", type=cli.Bounded(int, ">= 1"), default=1, help="pretraining samples per micro-batch (PPO-ptx)")
    m.add_argument("--share_critic_reward_base", action=cli.BoolFlag, default=False,
                   help="critic and reward model share one frozen base (quantized with --quant): the critic trains "
                        "a LoRA adapter on the reward model's weights, which the reward model runs with that adapter "
                        "off (or with its own frozen adapter when --rm_path is a LoRA dir); needs --lora_rank > 0")
    cli.add_logging_args(p, save_unit="episodes", log_interval=1)
    compat.add_flag_aliases(p, hf_trainer=False)
    return p


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "config.json").is_file() or (path / "adapter_config.json").is_file())


def _load_state_file(model: torch.nn.Module, path: Path) -> None:
    """A value-head file (``weight``/``bias``) or a full reward-model state dict (Coati's ``--rm_path``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if set(state) <= {"weight", "bias"}:
        model.value_head.load_state_dict(state)
        return
    if quant_mode(model) or isinstance(model, SharedBaseRewardModel):
        raise UsageError(f"{path}: a full reward-model state dict cannot load into a quantized or shared base; "
                         f"give --rm_path a reward model dir (train_reward_model.py's output) or a value-head file")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or not any(k.startswith("value_head") for k in state):
        raise UsageError(f"{path}: not a reward model state dict (unexpected keys {result.unexpected_keys[:5]})")


def load_value_model(cls, base: str, weights: str | None, **kwargs: Any):
    """``cls`` (RewardModel / Critic) from ``weights`` when it is a model dir, else from ``base`` with the
    ``weights`` file (value head or full state dict) loaded on top."""
    if weights and _is_model_dir(Path(weights)):
        return cls.from_pretrained(weights, **kwargs)
    model = cls.from_pretrained(base, **kwargs)
    if weights:
        _load_state_file(model, Path(weights))
    elif not (Path(base) / "value_head.safetensors").is_file():
        log.warning("%s: no value_head.safetensors; %s starts with a random value head", base, cls.__name__)
    return model


def build_shared_critic_reward(args: argparse.Namespace, lora: Any, **load_kwargs: Any) -> tuple[Critic, RewardModel]:
    """--share_critic_reward_base: one frozen base (the reward model's) under the critic's adapter and the
    reward model (its full weights with the adapter off, or its own LoRA adapter as a second, frozen one)."""
    if args.reward_fn is not None or (args.rm_path is None and args.rm_pretrain is None):
        raise UsageError("--share_critic_reward_base shares the reward model's base: give --rm_path / --rm_pretrain")
    if args.critic_pretrain:
        raise UsageError("--share_critic_reward_base starts the critic from the reward model; drop --critic_pretrain")
    kw = dict(lora=lora, family=args.rm_model or args.model, grad_checkpoint=args.grad_checkpoint, **load_kwargs)
    rm_path = Path(args.rm_path) if args.rm_path else None
    if rm_path is not None and (rm_path / "adapter_config.json").is_file():
        from peft import PeftConfig

        base = args.rm_pretrain or PeftConfig.from_pretrained(str(rm_path)).base_model_name_or_path
        return shared_critic_and_reward(base, reward_adapter=rm_path, **kw)
    if rm_path is not None and _is_model_dir(rm_path):
        return shared_critic_and_reward(rm_path, **kw)
    critic, reward_model = shared_critic_and_reward(args.rm_pretrain or args.pretrain, **kw)
    if rm_path is not None:  # a value-head file on top of --rm_pretrain
        _load_state_file(reward_model, rm_path)
        critic.value_head.load_state_dict(reward_model.value_head.state_dict())
    return critic, reward_model


def rl_config(args: argparse.Namespace) -> RLConfig:
    """The flags' RLConfig with the --algo preset filled in (a bad combination is a UsageError)."""
    return config_from_args(RLConfig, args).resolve()


def build_models(args: argparse.Namespace) -> tuple[Actor, Critic | None, RewardModel | None]:
    """Actor from --pretrain; reward model from --rm_path/--rm_pretrain (unless --reward_fn); for an estimator
    with a critic (gae), the critic from --critic_pretrain, else initialised from the reward model, else from
    --pretrain with a fresh value head; no critic otherwise. With --share_critic_reward_base the critic and
    reward model share the reward model's frozen base."""
    needs_critic = rl_config(args).needs_critic
    if not needs_critic and (args.critic_pretrain or args.share_critic_reward_base):
        raise UsageError(f"--adv_estimator {rl_config(args).adv_estimator} trains no critic: drop "
                         f"--critic_pretrain / --share_critic_reward_base")
    lora = cli.lora_settings(args)
    quant = cli.quant_kwargs(args)
    if args.share_critic_reward_base:
        with cli.flag_errors():
            check_strategy_support(args.strategy, share_base=True)
    hf = dict(trust_remote_code=args.trust_remote_code, frozen_dtype=args.frozen_dtype, **cli.attn_kwargs(args))
    actor = Actor.from_pretrained(args.pretrain, family=args.model, lora=lora,
                                  grad_checkpoint=args.grad_checkpoint, **hf, **quant)
    if args.share_critic_reward_base:
        critic, reward_model = build_shared_critic_reward(args, lora, **hf, **quant)
        return actor, critic, reward_model
    rm_family = args.rm_model or args.model
    rm_base = args.rm_pretrain or args.pretrain
    has_rm = args.rm_path is not None or args.rm_pretrain is not None
    reward_model = None
    if args.reward_fn is None:
        if not has_rm:
            raise UsageError("give a reward: --rm_path / --rm_pretrain (reward model) or --reward_fn (Python function)")
        # frozen (inference only): --frozen_dtype, or quantized too with --quant (no LoRA needed)
        reward_model = load_value_model(RewardModel, rm_base, args.rm_path, family=rm_family, frozen=True, **hf,
                                        **quant)
    elif args.rm_path is not None:
        raise UsageError("--reward_fn and --rm_path both give a reward; use one (--critic_pretrain sets the critic)")
    if not needs_critic:
        return actor, None, reward_model
    critic_kw = dict(lora=lora, grad_checkpoint=args.grad_checkpoint, **hf, **quant)
    if args.critic_pretrain:
        critic = Critic.from_pretrained(args.critic_pretrain, family=rm_family, **critic_kw)
    elif has_rm:
        critic = load_value_model(Critic, rm_base, args.rm_path, family=rm_family, **critic_kw)
    else:
        critic = Critic.from_pretrained(args.pretrain, family=args.model, **critic_kw)
    return actor, critic, reward_model


def build_reference(args: argparse.Namespace) -> Actor | None:
    """Full fine-tuning: the starting policy loaded again as the frozen KL reference, in --frozen_dtype. With
    LoRA the actor's base with the adapter off is the reference (None); without a KL term there is none."""
    if cli.lora_settings(args).enabled or not rl_config(args).uses_reference:
        return None
    return Actor.from_pretrained(args.pretrain, family=args.model, frozen=True, frozen_dtype=args.frozen_dtype,
                                 trust_remote_code=args.trust_remote_code, **cli.attn_kwargs(args))


def check_engine(args: argparse.Namespace, strategy: Any) -> None:
    """Refuse a --rollout_engine vllm run that cannot work, before any model loads (one line each)."""
    cfg = rl_config(args)
    if cfg.rollout_engine != "vllm":
        return
    if strategy.tp_size > 1:  # the ranks of a tp group must sample alike; vLLM engines are per process
        raise UsageError(f"--rollout_engine vllm with --tp_size {strategy.tp_size}: each process would run its own "
                         "engine and sample its own responses; use --rollout_engine hf under tensor parallelism")
    from coati.rollout.vllm import import_vllm

    if cfg.vllm_sleep and not torch.cuda.is_available():
        raise UsageError("--vllm_sleep frees vLLM's GPU memory during updates: it needs a GPU (none here)")
    import_vllm()
    if strategy.world_size > 1 and cfg.vllm_tensor_parallel_size > 1:
        raise UsageError("--vllm_tensor_parallel_size > 1 under torchrun is not supported: each trainer process "
                         "runs its own single-device engine")
    if args.quant and cfg.vllm_lora == "adapter":
        raise UsageError(f"--vllm_lora adapter would run the adapter on --pretrain's full-precision base, not the "
                         f"--quant {args.quant} one the actor computes with: use --vllm_lora merge")
    if cfg.vllm_lora == "adapter" and args.lora_rank > 0 and args.lora_train_bias != "none":
        raise UsageError(f"--vllm_lora adapter sends only the LoRA adapter: --lora_train_bias "
                         f"{args.lora_train_bias} trains biases it cannot carry (use --vllm_lora merge)")
    if not (Path(args.pretrain) / "config.json").is_file():
        raise UsageError(f"--rollout_engine vllm starts from a local checkpoint dir: --pretrain {args.pretrain} is "
                         f"none")


def build_engine(args: argparse.Namespace, tokenizer: Any, strategy: Any, actor: Actor) -> Any:
    """The vLLM rollout engine on --pretrain (the actor's starting weights), or None for HF generate: one per
    process under torchrun. It computes in the trainer's precision (vLLM's own default would run an fp32
    checkpoint in bf16); with --vllm_lora adapter it serves the actor's LoRA adapter on that base. A --quant
    actor's dequantized base replaces --pretrain's weights before the first rollout."""
    cfg = rl_config(args)
    if cfg.rollout_engine != "vllm":
        return None
    from coati.rollout.vllm import VLLMEngine

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(strategy.compute_precision) or \
        str(next(actor.parameters()).dtype).removeprefix("torch.")
    engine = VLLMEngine(args.pretrain, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, seed=args.seed,
                        dtype=dtype, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                        tensor_parallel_size=cfg.vllm_tensor_parallel_size, sleep=cfg.vllm_sleep,
                        sync_timeout_s=cfg.vllm_sync_timeout_s,
                        lora_rank=args.lora_rank if cfg.vllm_lora == "adapter" else 0,
                        enforce_eager=not torch.cuda.is_available())
    if args.quant:  # the actor computes with its quantized base: the first rollouts must too
        engine.update_weights(actor, version=0)
    return engine


def trainer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """PPOTrainer's arguments besides the models: the RL config and the logging / checkpoint options."""
    names = ("save_path", "save_interval", "save_total_limit", "log_interval", "log_dir", "use_tensorboard", "use_wandb",
             "need_optim_ckpt")
    return {"config": rl_config(args), "merge_lora": args.merge_lora_weights, **{n: getattr(args, n) for n in names}}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    args = build_parser().parse_args(argv)
    cli.quant_kwargs(args)  # refuse --quant without LoRA / on a sharding strategy before any work
    cli.attn_kwargs(args)  # and an attention kernel this machine lacks
    rl_config(args)  # and a bad --algo combination
    strategy = cli.strategy_from_args(args)
    check_engine(args, strategy)
    cli.setup_logging(strategy.is_rank0())
    with cli.flag_errors():
        strategy.check_ppo(args.offload_ref_reward)
        if args.lora_rank > 0:  # the reference policy is the actor's base with its adapter off
            check_ppo_train_bias(args.lora_train_bias)
    tokenizer = load_tokenizer(args.tokenizer or args.pretrain, args.trust_remote_code)
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None

    prompts = PromptDataset(args.prompt_dataset, tokenizer, max_input_len=args.max_input_len,
                            max_datasets_size=args.max_datasets_size, prompt_template=args.prompt_template,
                            seed=args.seed, empty=args.empty_records)
    prompt_dl = strategy.setup_dataloader(prompts, args.experience_batch_size, shuffle=True,
                                          collate_fn=PromptCollator(tokenizer.pad_token_id))
    ptx = None
    if args.pretrain_dataset:  # read, and --packing checked, before any model loads
        ptx_max_len = args.ptx_max_len or args.max_seq_len
        ptx = PretrainDataset(args.pretrain_dataset, tokenizer, max_len=ptx_max_len,
                              max_datasets_size=args.max_datasets_size, prompt_template=args.prompt_template,
                              seed=args.seed, empty=args.empty_records)
        packing = cli.packing_from_args(args)

    actor, critic, reward_model = build_models(args)
    pretrain_dl = None
    if ptx is not None:
        collate = (PackingCollator(tokenizer.pad_token_id, ptx_max_len, attention=packing_attention(actor))
                   if packing else SFTCollator(tokenizer.pad_token_id))
        pretrain_dl = strategy.setup_dataloader(ptx, args.ptx_batch_size, shuffle=True, drop_last=True,
                                                collate_fn=collate, lengths=cli.group_lengths(args, ptx))
    trainer = PPOTrainer(strategy, actor, critic, reward_model, initial_model=build_reference(args),
                         tokenizer=tokenizer, reward_fn=reward_fn, run_config=vars(args),
                         engine=build_engine(args, tokenizer, strategy, actor), **trainer_kwargs(args))
    return trainer.fit(prompt_dl, pretrain_dl, resume_from=resolve_resume(args.resume, args.save_path))


if __name__ == "__main__":
    cli.run(main)
