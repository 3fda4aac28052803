"""PPO memory at equal settings: full fine-tuning vs LoRA vs 8-bit / 4-bit LoRA (``bench_memory.py --ppo``).

What it measures
  One random-weight LLaMA (``--config`` preset with ``--hidden`` / ``--layers`` / ``--intermediate`` /
  ``--vocab_size`` overrides, or ``--llama7b``) is written once; every variant loads it and runs
  ``--warmup_steps`` + ``--steps`` PPO episodes with the naive strategy in its own process: ``--batch_size``
  prompts of ``--seq_len / 2`` random tokens, ``--seq_len / 2`` sampled tokens, reference forward, reward
  model, critic values, one actor and one critic step of ``--optim`` (each optimizer in its own process). Same
  weights, prompts, lengths and optimizer in every variant; only how the PPO models hold their weights changes.

Variants (``--ppo`` comma separated)
  full               actor and critic fully trained; a frozen copy of the actor as reference; frozen RM
  lora               LoRA actor (reference = its adapter disabled) and LoRA critic; frozen RM
  lora_8bit          as lora, every base (actor, critic, reward model) LLM.int8-quantized
  lora_4bit          as lora, every base NF4-quantized (double quantization)
  *_shared           (lora_shared, lora_8bit_shared, lora_4bit_shared) critic and reward model share one
                     frozen base (--share_critic_reward_base)
  grpo               GRPO (--algo grpo, 2 samples per prompt): the actor fully trained, its frozen copy as
                     reference (the KL loss), the frozen RM, no critic; with --optim adalomo and --gpu_mem_cap_gb
                     it shows a step that fits where AdamW's runs out of memory

Figures, per variant
  peak_gpu_mem_mb     torch.cuda.max_memory_allocated during the PPO episodes (models already loaded), GPU only
  peak_step_rss_mb    CPU: the process's RSS high-water mark during the PPO episodes (reset after loading)
  rss_at_start_mb     RSS when the episodes start (imports + loaded models): the peak minus this is what
                      generation and training added
  model_mb            distinct storages of every parameter and buffer of actor, critic, reward model and
                      reference (shared bases counted once): what the weights occupy
  trainable_mb / optim_state_mb   trained parameters and their optimizer state (AdaLomo's moments included)
  base_copies         distinct frozen base weight sets in memory (4 = nothing shared, 2 = the minimum)
  step_s              wall seconds per timed PPO episode

  On CPU, RSS keeps what the allocator took while loading (a quantized load reads the fp32 checkpoint first)
  and the imported libraries, so compare weights by ``model_mb`` there; on a GPU ``peak_gpu_mem_mb`` is exact.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

VARIANTS = ("full", "lora", "lora_shared", "lora_8bit", "lora_8bit_shared", "lora_4bit", "lora_4bit_shared", "grpo")
DEFAULT = "full,lora,lora_8bit,lora_4bit,lora_4bit_shared"
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PPO memory (--ppo)")
    g.add_argument("--ppo", default=None, help=f"run PPO variants instead of --strategies, from: {', '.join(VARIANTS)} "
                                               f"(e.g. {DEFAULT})")
    g.add_argument("--intermediate", type=harness.Bounded(int, ">= 1"), default=None,
                   help="override the MLP width (4-bit on CPU needs multiples of 64 to quantize every layer)")
    g.add_argument("--vocab_size", type=harness.Bounded(int, ">= 2"), default=32000, help="vocabulary size of the random model")
    g.add_argument("--llama7b", action="store_true", help="LLaMA-7B's shape (GPU; writes a 13 GB fp16 model dir)")
    g.add_argument("--lora_rank", type=harness.Bounded(int, ">= 1"), default=16, help="LoRA rank of the LoRA variants")
    g.add_argument("--_model_dir", default=None, help=argparse.SUPPRESS)


def config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = harness.model_config(args, vocab_size=args.vocab_size)
    if args.intermediate is not None:
        cfg["intermediate_size"] = args.intermediate
    if args.llama7b:
        cfg.update(LLAMA_7B)
    return cfg


def write_model(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from coati.models.dtypes import dtype_kwargs

    cfg = config(args)
    torch.manual_seed(args.seed)
    dtype = torch.float16 if args.llama7b else torch.float32
    with torch.device("cuda" if args.device == "cuda" else "cpu"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), **dtype_kwargs(dtype))
    model.save_pretrained(str(path))
    harness.llama_tokenizer().save_pretrained(str(path))
    return {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "vocab_size")} | {
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the RSS high-water mark (Linux)
        f.write("5")


def _storage_mb(tensors) -> float:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and not t.is_meta:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values()) / 2**20


def build(variant: str, path: str, lora_rank: int):
    """(actor, critic, reward model) for ``variant``, loaded from ``path``."""
    from coati.models import Actor, Critic, LoraSettings, RewardModel
    from coati.models.sharing import shared_critic_and_reward

    shared = variant.endswith("_shared")
    quant = {"8bit": "8bit", "4bit": "4bit"}.get(variant.split("_")[1] if variant.count("_") >= 1 else "")
    if variant in ("full", "grpo"):
        critic = Critic.from_pretrained(path) if variant == "full" else None
        return Actor.from_pretrained(path), critic, RewardModel.from_pretrained(path)
    lora = LoraSettings(rank=lora_rank)
    qkw = {"quant": quant} if quant else {}
    actor = Actor.from_pretrained(path, lora=lora, **qkw)
    if shared:
        critic, reward_model = shared_critic_and_reward(path, lora=lora, **qkw)
    else:
        critic = Critic.from_pretrained(path, lora=lora, **qkw)
        reward_model = RewardModel.from_pretrained(path, **qkw, **({"frozen": True} if quant else {}))
    return actor, critic, reward_model


def worker(args: argparse.Namespace) -> None:
    import torch

    from coati.dataset import PromptCollator
    from coati.models.quant import base_weight_storages
    from coati.trainer.ppo import PPOTrainer
    from coati.trainer.strategies import NaiveStrategy

    torch.set_num_threads(args.threads)
    variant = args._worker
    if args.device == "cuda":
        harness.cap_gpu_memory(args.gpu_mem_cap_gb)
    strategy = NaiveStrategy(seed=args.seed, mixed_precision="bf16" if args.precision == "bf16" else None)
    actor, critic, reward_model = build(variant, args._model_dir, args.lora_rank)
    tok = harness.llama_tokenizer()
    prompt_len = args.seq_len // 2
    g = torch.Generator().manual_seed(args.seed)
    prompts = [{"input_ids": torch.randint(3, config(args)["vocab_size"], (prompt_len,), generator=g),
                "prompt": ""} for _ in range(args.batch_size * (args.warmup_steps + args.steps))]
    loader = strategy.setup_dataloader(prompts, args.batch_size, shuffle=False,
                                       collate_fn=PromptCollator(tok.pad_token_id))
    grpo = dict(algo="grpo", n_samples_per_prompt=2) if variant == "grpo" else {}
    trainer = PPOTrainer(strategy, actor, critic, reward_model, tokenizer=tok, num_episodes=args.warmup_steps
                         + args.steps, num_collect_steps=1, num_update_steps=1, max_epochs=1,
                         train_batch_size=args.batch_size * grpo.get("n_samples_per_prompt", 1),
                         max_new_tokens=args.seq_len - prompt_len,
                         max_seq_len=None, log_interval=10**9, log_entropy=False, lr=args.lr, critic_lr=args.lr,
                         optim=args._optim, **grpo)
    gen = trainer.experience_maker.sampling
    gen.update(min_new_tokens=args.seq_len - prompt_len)  # equal lengths in every variant

    models = [m for m in (trainer.actor, trainer.critic, trainer.reward_model, trainer.initial_model) if m]
    inner = [getattr(m, "model", m) for m in models]  # a shared reward model's base lives outside its modules
    tensors = [t for m in inner + models for t in list(m.parameters()) + list(m.buffers())]
    n_linear = len(base_weight_storages(inner[0], frozen_only=False))
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_start = harness.rss_mb()
    _reset_hwm()
    hist = trainer.fit(loader)
    result: dict[str, Any] = {
        "peak_step_rss_mb": round(_hwm_mb(), 1),
        "rss_at_start_mb": round(rss_start, 1),
        "model_mb": round(_storage_mb(tensors), 1),
        "trainable_mb": round(_storage_mb([p for m in models for p in m.parameters() if p.requires_grad]), 1),
        "optim_state_mb": round(_storage_mb([v for o in (trainer.actor_optim, trainer.critic_optim) if o is not None
                                             for v in [*(x for s in o.state.values() for x in s.values()),
                                                       *(x for k in ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")
                                                         for x in getattr(o, k, {}).values())]
                                             if torch.is_tensor(v)]), 1),
        "base_copies": round(len(base_weight_storages(*inner, frozen_only=False)) / n_linear, 2),
        "step_s": round(sum(h["timing_s/step"] for h in hist[args.warmup_steps:]) / max(args.steps, 1), 3),
        "last_score": round(hist[-1]["critic/score/mean"], 4),
    }
    if args.device == "cuda":
        result["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    harness.emit(result)


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Parent: write the model, run each variant in its own process, return the JSON record."""
    variants = [v.strip() for v in args.ppo.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown PPO variants {unknown}; choose from {', '.join(VARIANTS)}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_ppo_memory_") as tmp:
        model = write_model(args, Path(tmp) / "model")
        env = dict(os.environ, PYTHONPATH=str(harness.REPO), TOKENIZERS_PARALLELISM="false",
                   BENCH_MEMORY_ARGV=json.dumps(argv))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(args.threads)
        script = Path(__file__).resolve().parent / "bench_memory.py"
        optims = [o.strip() for o in args.optim.split(",") if o.strip()]
        for variant, optim in ((v, o) for v in variants for o in optims):
            key = variant if len(optims) == 1 else f"{variant}/{optim}"
            t0 = time.perf_counter()
            cmd = [sys.executable, str(script), "--_worker", variant, "--_optim", optim, "--_model_dir",
                   str(Path(tmp) / "model")]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = (proc.stdout + proc.stderr).splitlines()
            found = [json.loads(ln[len(harness.RESULT_TAG):]) for ln in lines if ln.startswith(harness.RESULT_TAG)]
            errors = [ln for ln in lines if "Error" in ln]
            results[key] = found[0] if found else {"error": (errors or lines or ["no output"])[-1][-400:]}
            results[key]["job_s"] = round(time.perf_counter() - t0, 1)
    shown = [a for i, a in enumerate(argv) if a != "--output" and (i == 0 or argv[i - 1] != "--output")]
    command = "OMP_NUM_THREADS=%d python benchmarks/bench_memory.py %s" % (args.threads, " ".join(shown))
    return {"bench": "ppo_memory", "command": command, "model": {"family": "llama", **model},
            "batch_size": args.batch_size,
            "prompt_len": args.seq_len // 2, "gen_len": args.seq_len - args.seq_len // 2,
            "episodes": {"warmup": args.warmup_steps, "timed": args.steps}, "lora_rank": args.lora_rank,
            "device": args.device, "precision": args.precision, "threads": args.threads,
            "gpu_mem_cap_gb": args.gpu_mem_cap_gb, "results": results,
            "versions": harness.versions(), "machine": harness.machine(args.device)}
