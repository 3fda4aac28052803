"""RLHF step throughput: coati's PPOTrainer (``--algo ppo`` or ``--algo grpo``) vs TRL's GRPOTrainer.

Two comparisons, chosen with this script's ``--algo``:

``--algo grpo`` (like for like): coati's critic-free ``--algo grpo`` preset against TRL's GRPOTrainer. Same
  algorithm on both sides, per step: generate G completions per prompt; reference forward; reward; group
  z-score advantages; one policy step with the PPO clip (0.2) and the k3 KL ``exp(ref - logp) - (ref - logp)
  - 1`` as a loss term (beta = the preset's ``kl_coef``, 0.04), per-token losses averaged per sequence, then
  over sequences (coati ``loss_agg_mode seq_mean_token_mean``, TRL ``loss_type="grpo"``), entropy logged.
  No critic exists in coati (``critic_params`` 0). One generation feeds exactly one optimizer step, so both
  skip the no-grad forward that would score the old log-probs and use the training forward's, detached (the
  same values: coati's PPOTrainer does this whenever it is exact, see ``_reuses_update_log_probs``).

``--algo ppo`` (default, recorded as ppo_cpu_small.json): coati PPO against TRL GRPO, the closest on-policy
  loop TRL ships. Different amounts of work per sample, so read the ratio as "what a user gets per second
  from each library's RL loop": coati also runs a critic forward, GAE and a critic step; the KL (0.1) is
  coati's k1 penalty in the reward and TRL's k3 loss term (TRL's default token-mean loss).

What is held equal
  * weights: one random-weight LLaMA (``--config`` preset, default "small": hidden 256, 4 layers, 32k
    vocab) saved once; both load it (coati's PPO critic starts from the same body).
  * prompts: ``../shared/data/prompts/vicuna_question_80.jsonl`` (or ``--prompts``) rendered with coati's
    ``PromptDataset`` (Alpaca template, at most ``--seq_len`` prompt tokens); TRL gets the same prompt text and
    the script checks that its tokenizer call gives the same ids. Each batch is ``--batch_size`` rows:
    batch_size / G distinct prompts, in file order, each sampled ``--num_generations`` (G >= 2) times (TRL's
    ``num_generations``; coati GRPO's ``n_samples_per_prompt``; coati PPO gets each prompt repeated G times).
  * generation: sampling at temperature 1, no top-k / top-p, exactly ``--gen_len`` new tokens per row
    (``min_new_tokens = max_new_tokens`` in both, so early EOS cannot make one side cheaper).
  * reward: the same Python function (distinct-word ratio of the response) in both, or with
    ``--reward model`` a random reward model on the same body (coati ``RewardModel``, TRL a
    sequence-classification model passed as a reward function).
  * KL: a frozen reference model in both, the coefficient above.
  * one optimizer step per batch (coati: 1 collect step, 1 update step, train_batch_size = batch; TRL:
    steps_per_generation 1, num_iterations 1), AdamW (fused in both), fp32 (or bf16 autocast in both), no
    gradient checkpointing.

Figures, per framework (over ``--steps`` timed steps after ``--warmup_steps`` untimed ones)
  samples_per_s        sequences (prompt + response) trained per second (wall)
  samples_per_cpu_s    the same per CPU-second of the worker process: the figure to read on a shared CPU
  gen_tokens_per_s     generated tokens per second of the whole step
  gen_phase_tokens_per_s  generated tokens per second of the generation phase alone (HF generate in both)
  time_split_s         mean seconds per step in generate / make_experience (old and reference log-probs,
                       reward, advantages) / train; coati's from its PPOTrainer metrics (``timing_s/*``), TRL's
                       by timing its ``_generate`` and ``_generate_and_score_completions`` calls
  peak_rss_mb, rss_before_train_mb, peak_gpu_mem_mb  as in bench_sft.py

How to read the ratio
  ``ratio_coati_over_trl.samples_per_cpu_s`` > 1 means coati's loop turns out more samples per CPU-second;
  ``gen_phase_tokens_per_s`` compares the generation engines alone (both HF generate: ~1 expected). Memory
  ratios < 1 mean coati uses less.

Rollout engines (``--rollout_engine hf vllm``): coati alone, one worker per engine on the same weights, prompts
  and settings, side by side in one JSON line (``engines``; TRL is not run). Each step splits into
  ``generate`` (the engine's sampling), ``sync`` (copying the updated weights into vLLM; 0 for HF generate, which
  samples from the trained module itself), ``make_experience`` (log-probs, reward, advantages) and ``train``.
  ``step_over_generate`` is the step time over the engine's generation time (the cost of everything but
  sampling); ``ratio_vllm_over_hf.gen_phase_tokens_per_s`` compares the engines' generation alone. Run it where
  vLLM is installed (``pip install 'coati[vllm]'``); on CPU, vLLM runs in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).

Example
  OMP_NUM_THREADS=1 python benchmarks/bench_ppo.py --algo grpo --config small --batch_size 8 \\
      --num_generations 4 --gen_len 64 --steps 5 --repeats 3
  python benchmarks/bench_ppo.py --algo grpo --rollout_engine hf vllm --steps 3
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import Bounded  # noqa: E402

PROMPTS = harness.SHARED_DATA / "prompts" / "vicuna_question_80.jsonl"


def distinct_word_reward(prompts, completions, **kwargs):
    """Same cheap, deterministic reward for both frameworks: share of distinct words in the response."""
    out = []
    for text in completions:
        words = text.split()
        out.append(len(set(words)) / max(len(words), 1))
    return out


def add_args(parser) -> None:
    parser.add_argument("--gen_len", type=Bounded(int, ">= 1"), default=64, help="new tokens generated per row (exactly)")
    parser.add_argument("--num_generations", type=Bounded(int, ">= 1"), default=2,
                        help="GRPO group size G; each prompt is repeated G times for both frameworks")
    parser.add_argument("--reward", choices=["fn", "model"], default="fn",
                        help="fn: a Python reward function; model: a (random) reward model on the same body")
    parser.add_argument("--prompts", default=str(PROMPTS), help="prompt file coati's PromptDataset reads")
    parser.add_argument("--rollout_engine", nargs="+", choices=["hf", "vllm"], default=None,
                        help="measure coati alone with each of these rollout engines, side by side (no TRL)")
    parser.add_argument("--vllm_gpu_memory_utilization", type=Bounded(float, "(0, 1]"), default=None,
                        help="--rollout_engine vllm: share of GPU memory vLLM takes (default: train_prompts.py's)")
    parser.add_argument("--algo", choices=["ppo", "grpo"], default="ppo",
                        help="coati's side: ppo (actor + critic, GAE, KL in the reward) or grpo (critic-free "
                             "--algo grpo, n_samples_per_prompt = G, k3 KL as a loss term: like for like with TRL)")


def prepare(args, workdir: Path) -> dict:
    from coati.dataset import PromptDataset

    if args.batch_size % args.num_generations:
        raise SystemExit("--batch_size must be a multiple of --num_generations")
    tok = harness.llama_tokenizer()
    ds = PromptDataset(args.prompts, tok, max_input_len=args.seq_len, prompt_template="alpaca")
    rows = [{"input_ids": ds[i]["input_ids"].tolist(), "prompt": ds[i]["prompt"]} for i in range(len(ds))]
    # TRL tokenizes the prompt text with a plain tokenizer call; coati's prompts start with BOS, which the
    # LLaMA tokenizer in transformers 5 does not add unless asked: ask when that makes the ids equal.
    add_bos = not all(tok(r["prompt"])["input_ids"] == r["input_ids"] for r in rows)
    if add_bos:
        tok.add_bos_token = True
    matched = sum(tok(r["prompt"])["input_ids"] == r["input_ids"] for r in rows)
    path = workdir / "prompts.json"
    path.write_text(json.dumps(rows))
    lengths = [len(r["input_ids"]) for r in rows]
    need = (args.warmup_steps + args.steps) * args.batch_size // args.num_generations
    try:
        source = str(Path(args.prompts).resolve().relative_to(harness.SHARED_DATA.parent))
    except ValueError:
        source = args.prompts
    return {"data_file": str(path), "data_source": source, "data_prompts": len(rows),
            "data_mean_prompt_len": round(sum(lengths) / len(lengths), 1),
            "data_prompts_used": need, "data_trl_prompt_ids_match": f"{matched}/{len(rows)}",
            "trl_add_bos": add_bos,
            "gen_len": args.gen_len, "num_generations": args.num_generations, "reward": args.reward,
            "kl_coef": _kl_coef(args.algo)}


def _kl_coef(algo: str) -> float:
    """The KL coefficient both sides use: 0.1 against PPO (as recorded before), the ``--algo grpo`` preset's
    beta for GRPO."""
    from coati.rl import PRESETS

    return 0.1 if algo == "ppo" else float(PRESETS[algo]["kl_coef"])


def _rows(job):
    rows = json.loads(Path(job["data_file"]).read_text())
    return [r for r in rows for _ in range(job["num_generations"])]


def _finish(job, clock, step_samples, step_tokens, split, probe, extra):
    w, s = job["warmup_steps"], job["steps"]
    samples = sum(step_samples[w:w + s])
    gen_tokens = samples * job["gen_len"]
    tokens = int(sum(step_tokens[w:w + s]))
    timed = {k: sum(v[w:w + s]) for k, v in split.items()}
    out = clock.rates(w, s, {"samples": samples, "gen_tokens": gen_tokens, "tokens": tokens})
    out["gen_phase_tokens_per_s"] = round(gen_tokens / timed["generate"], 1) if timed.get("generate") else None
    out.update(timed_samples=samples, timed_tokens=tokens,
               time_split_s={k: round(v / s, 4) for k, v in timed.items()})
    out.update(probe.report())
    out.update(extra)
    harness.emit(out)


# ----- coati -----------------------------------------------------------------------------------------------

def worker_coati(job: dict) -> None:
    import torch

    from coati.dataset import PromptCollator
    from coati.models import Actor, Critic, RewardModel
    from coati.trainer import PPOTrainer
    from coati.trainer.strategies import NaiveStrategy

    harness.setup_worker(job)
    device = job["device"]
    grpo = job["algo"] == "grpo"
    strategy = NaiveStrategy(seed=job["seed"], mixed_precision="bf16" if job["precision"] == "bf16" else None)
    tok = harness.llama_tokenizer()
    actor = Actor.from_pretrained(job["model_dir"])
    critic = None if grpo else Critic.from_pretrained(job["model_dir"])
    reward_model = RewardModel.from_pretrained(job["model_dir"]) if job["reward"] == "model" else None
    # PPO: each prompt repeated G times in the data (the same rows TRL sees); GRPO: G samples per prompt
    # from n_samples_per_prompt, so a loader batch holds batch_size / G distinct prompts
    rows = json.loads(Path(job["data_file"]).read_text()) if grpo else _rows(job)
    per_prompt = job["num_generations"] if grpo else 1
    items = [{"input_ids": torch.tensor(r["input_ids"]), "prompt": r["prompt"]} for r in rows]
    loader = strategy.setup_dataloader(items, job["batch_size"] // per_prompt, shuffle=False,
                                       collate_fn=PromptCollator(tok.pad_token_id))
    total = job["warmup_steps"] + job["steps"]
    clock = harness.StepClock(device)

    class TimedPPOTrainer(PPOTrainer):
        def _episode_metrics(self, *a, **kw):
            metrics = super()._episode_metrics(*a, **kw)
            clock.tick()
            return metrics

    algo = dict(algo="grpo", n_samples_per_prompt=per_prompt) if grpo else dict(
        critic_optim=harness.coati_optimizer(job, critic.parameters(), job["lr"]), critic_lr=job["lr"])
    engine_name = job.get("rollout_engine") or "hf"
    engine = _vllm_engine(job, tok) if engine_name == "vllm" else None
    trainer = TimedPPOTrainer(
        strategy, actor, critic, reward_model=reward_model, tokenizer=tok,
        actor_optim=harness.coati_optimizer(job, actor.parameters(), job["lr"]),
        reward_fn=distinct_word_reward if reward_model is None else None,
        kl_coef=job["kl_coef"], ptx_coef=0.0, num_episodes=total, num_collect_steps=1, num_update_steps=1,
        max_epochs=1, train_batch_size=job["batch_size"], lr=job["lr"], max_new_tokens=job["gen_len"],
        max_seq_len=None, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        generate_kwargs={"min_new_tokens": job["gen_len"]}, log_interval=1, engine=engine,
        rollout_engine=engine_name, **algo)
    probe = harness.MemoryProbe(device)
    probe.start()
    history = trainer.fit(loader)
    split = {"generate": [h["timing_s/generate"] for h in history],
             "sync": [h.get("timing_s/weight_sync", 0.0) for h in history],
             "make_experience": [h["timing_s/make_experience"] for h in history],
             "train": [h["timing_s/train_actor"] + h.get("timing_s/train_critic", 0.0) for h in history]}
    if not grpo:
        split.update(train_actor=[h["timing_s/train_actor"] for h in history],
                     train_critic=[h["timing_s/train_critic"] for h in history])
    samples = [job["batch_size"]] * len(history)
    tokens = [h["perf/total_num_tokens"] for h in history]
    lens = [h.get("response_length/mean") for h in history]
    models = "policy + reference" if grpo else "actor + critic + reference"
    _finish(job, clock, samples, tokens, split, probe,
            {"algorithm": f"{job['algo'].upper()} ({models}" + (" + reward model)" if reward_model else ")"),
             "mean_response_len": lens[-1], "device_used": str(strategy.device),
             "critic_params": sum(p.numel() for p in trainer.critic.parameters()) if trainer.critic else 0,
             "rollout_engine": engine_name,
             "optimizer": f"AdamW ({job['coati_optim']})" + ("" if grpo else " x2 (actor, critic)")})


def _vllm_engine(job: dict, tok):
    """vLLM on the benchmark's model dir, in the trainer's compute precision, in this process."""
    import os

    import torch

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from coati.rl import make_config
    from coati.rollout.vllm import VLLMEngine

    # on CPU vLLM would reserve a share of the machine's memory for its KV cache: 1 GiB holds the bench's batches
    cpu = {} if torch.cuda.is_available() else dict(enforce_eager=True, kv_cache_memory_bytes=2**30)
    share = job["vllm_gpu_memory_utilization"] or make_config().vllm_gpu_memory_utilization  # train_prompts.py's
    return VLLMEngine(job["model_dir"], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=job["seed"],
                      dtype="bfloat16" if job["precision"] == "bf16" else "float32",
                      max_model_len=job["seq_len"] + job["gen_len"],
                      gpu_memory_utilization=share, **cpu)


def engines_main(args) -> dict:
    """``--rollout_engine``: one coati worker per engine on the same model dir and prompts; one JSON line."""
    import os
    import shutil
    import tempfile

    if args.warmup_steps < 1:
        raise SystemExit("--warmup_steps must be >= 1 (the first step compiles and allocates)")
    workdir = Path(tempfile.mkdtemp(prefix="coati_engines_"))
    model_info = harness.write_model_dir(args, workdir / "model")
    job = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    job.update(model_dir=str(workdir / "model"), workdir=str(workdir), **prepare(args, workdir))
    results = {}
    for engine in args.rollout_engine:
        path = workdir / f"job_{engine}.json"
        path.write_text(json.dumps({**job, "rollout_engine": engine}))
        sys.stderr.write(f"[bench] coati with --rollout_engine {engine} ...\n")
        res = harness.run_worker(__file__, "coati", path, args.threads, args.device, workdir / f"coati_{engine}.log")
        if "error" not in res:
            split = res["time_split_s"]
            res["step_over_generate"] = round(res["step_s"] / split["generate"], 3) if split["generate"] else None
        results[engine] = res
    report = {"bench": f"{args.algo}_engines", "model": model_info, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "gen_len": args.gen_len, "num_generations": args.num_generations,
              "warmup_steps": args.warmup_steps, "timed_steps": args.steps, "device": args.device,
              "precision": args.precision, "threads": args.threads, "algo": args.algo, "engines": results}
    if "error" not in results.get("hf", {"error": 1}) and "error" not in results.get("vllm", {"error": 1}):
        report["ratio_vllm_over_hf"] = harness.ratios(results["vllm"], results["hf"],
                                                      ["samples_per_s", "gen_phase_tokens_per_s", "step_s"])
    report["notes"] = ("coati alone, one worker per rollout engine; time_split_s: generate / sync (weights into "
                       "vLLM) / make_experience / train per step; step_over_generate = step_s / generate.")
    report["versions"] = harness.versions()
    report["machine"] = harness.machine(args.device)
    report["command"] = "python " + " ".join([os.path.relpath(__file__, harness.REPO)] + sys.argv[1:])
    line = json.dumps(report)
    print(line, flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(line + "\n")
    if args.keep_workdir:
        sys.stderr.write(f"[bench] kept {workdir}\n")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


# ----- TRL -------------------------------------------------------------------------------------------------

# TRL's loss aggregation: its default (dapo, token mean) against PPO as recorded before; against --algo grpo
# the preset's seq_mean_token_mean, which TRL calls "grpo".
TRL_LOSS_TYPE = {"ppo": "dapo", "grpo": "grpo"}


def worker_trl(job: dict) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    harness.setup_worker(job)
    device = job["device"]
    rows = json.loads(Path(job["data_file"]).read_text())
    dataset = Dataset.from_dict({"prompt": [r["prompt"] for r in rows]})
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    tok.pad_token = tok.unk_token
    if job["trl_add_bos"]:
        tok.add_bos_token = True
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"])
    if job["reward"] == "model":
        rm = AutoModelForSequenceClassification.from_pretrained(job["model_dir"], num_labels=1)
        rm.config.pad_token_id = tok.pad_token_id
        reward_funcs, reward_tok = [rm], [tok]
    else:
        reward_funcs, reward_tok = [distinct_word_reward], None
    total = job["warmup_steps"] + job["steps"]
    clock = harness.StepClock(device)
    step_tokens: list[int] = []
    gen_s: list[float] = []
    score_s: list[float] = []

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            harness.sync(device)
            gen_s.append(time.perf_counter() - t0)
            return out

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            harness.sync(device)
            score_s.append(time.perf_counter() - t0)
            step_tokens.append(int(out["prompt_mask"].sum() + out["completion_mask"].sum()))
            return out

    config = GRPOConfig(
        output_dir=str(Path(job["workdir"]) / "trl_out"), per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        num_generations=job["num_generations"], max_completion_length=job["gen_len"],
        generation_kwargs={"min_new_tokens": job["gen_len"]}, temperature=1.0, top_k=0, top_p=1.0,
        beta=job["kl_coef"], epsilon=0.2, loss_type=TRL_LOSS_TYPE[job["algo"]], scale_rewards="group",
        max_steps=total, learning_rate=job["lr"], weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=False, bf16=job["precision"] == "bf16", fp16=False, logging_steps=1,
        save_strategy="no", report_to="none", shuffle_dataset=False, seed=job["seed"], use_cpu=device == "cpu",
        dataloader_num_workers=0, log_completions=False,
    )
    trainer = TimedGRPOTrainer(model=model, reward_funcs=reward_funcs, args=config, train_dataset=dataset,
                               processing_class=tok, reward_processing_classes=reward_tok,
                               callbacks=[harness.trl_clock(clock)])
    probe = harness.MemoryProbe(device)
    probe.start()
    trainer.train()
    n, ends = len(clock), clock.wall
    # train = step wall time minus generate-and-score (the first step has no previous end: never timed)
    split = {"generate": gen_s[:n], "make_experience": [a - b for a, b in zip(score_s, gen_s)][:n],
             "train": [ends[i] - ends[i - 1] - score_s[i] if i else float("nan") for i in range(n)]}
    _finish(job, clock, [job["batch_size"]] * n, step_tokens, split, probe,
            {"algorithm": "GRPO (policy + reference" + (" + reward model)" if job["reward"] == "model" else ")"),
             "device_used": str(trainer.args.device), "optimizer": f"AdamW ({config.optim})"})


NOTES = {
    "ppo": "coati PPO (actor+critic+ref) vs TRL GRPO (policy+ref): different algorithms, same weights, prompts, "
           "batch, generation length and reward;",
    "grpo": "coati --algo grpo vs TRL GRPOTrainer, like for like: no critic, same weights, prompts, group size, "
            "generation length, reward, k3 KL loss term (beta), clip 0.2, seq-mean-token-mean loss, one step;",
}


def main() -> None:
    parser = harness.common_parser(__doc__, steps=5, batch_size=8, seq_len=128)
    add_args(parser)
    args = parser.parse_args()
    if args._worker:
        job = json.loads(Path(args._job).read_text())
        (worker_coati if args._worker == "coati" else worker_trl)(job)
        return
    if args.rollout_engine:
        engines_main(args)
        return
    notes = NOTES[args.algo] + " samples_per_s ratio > 1 = coati faster. --seq_len is the max prompt length here."
    harness.main(args, script=__file__, bench=args.algo, prepare=prepare,
                 key_metrics=["samples_per_s", "samples_per_cpu_s"],
                 ratio_keys=["samples_per_s", "samples_per_cpu_s", "gen_tokens_per_s", "gen_phase_tokens_per_s",
                             "peak_rss_mb", "peak_gpu_mem_mb"],
                 notes=notes, report_args=("algo", "gen_len", "num_generations", "reward"))


if __name__ == "__main__":
    main()
