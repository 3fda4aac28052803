"""Peak memory and step time per strategy at equal global batch: what sharding and offload save.

What it measures
  A random-weight LLaMA (``--config`` preset from ``harness.PRESETS``: "tiny", "small" for CPU, "1b" =
  TinyLlama-1.1B's shape for a GPU) is trained as an ``Actor`` for ``--warmup_steps`` + ``--steps`` optimizer
  steps on random token batches (LM loss on every token, grad-clip 1.0). Every strategy sees the same
  global batch (``--batch_size`` sequences of ``--seq_len`` tokens per step): ``naive`` runs one process
  with all of it, the others ``--nproc`` torchrun processes with ``batch_size / nproc`` each. Each strategy
  runs in its own job, so peaks are never shared.

Optimizers (``--optim``, comma separated: coati's ``--optim`` names)
  Every strategy runs once with each (results keyed ``strategy/optimizer`` when more than one is given); a
  combination coati refuses (e.g. LOMO under ddp) records its one-line reason as the error.

Strategies (``--strategies``, comma separated)
  naive, ddp, fsdp_z2, fsdp_z3, fsdp_z2_offload, fsdp_z3_offload, colossalai_zero2, colossalai_zero2_cpu,
  colossalai_gemini, colossalai_gemini_auto (the colossalai ones need a GPU and ``pip install
  coati[colossalai]``; on failure the result holds the error instead of figures).

Figures, per strategy (maximum over ranks)
  peak_gpu_mem_mb      torch.cuda.max_memory_allocated over the whole job (model build included), GPU only
  steady_gpu_mem_mb    torch.cuda.memory_allocated after the last step: parameters + optimizer state per GPU
  peak_rss_mb          the process's RSS high-water mark (CPU memory, imports included)
  rss_before_model_mb  RSS before the model was built, so peak_rss_mb - this = what the model and training took
  state_cpu_mb / state_gpu_mb  this rank's parameters + gradients + optimizer state (local shards, fp32
                       masters included) by where they live: the memory sharding and offload promise
  steady_rss_mb        RSS after the last step: on CPU the live parameters + optimizer state (+ imports), where
                       sharding shows (the peak includes building the full model on every rank first)
  params_mb / peak_grad_mb / optim_state_mb   this rank's weights, the most gradient bytes alive at once
                       (measured as each gradient lands, where LOMO updates, and before each optimizer step),
                       and the optimizer's state (AdaLomo's moments included) after the last step
  x_params             (params + peak gradients + optimizer state) / params: AdamW about 4, 8-bit AdamW 2.5,
                       LOMO 1 + its largest single gradient (one weight's, not the model's)
  step_s               mean wall seconds per timed optimizer step
  tokens_per_s         global tokens per timed second
  last_loss            loss of the last step (every strategy trains the same batches from the same weights)

PPO memory per variant (``--ppo full,lora,lora_8bit,lora_4bit,lora_4bit_shared``)
  full fine-tuning vs LoRA vs 8-bit / 4-bit LoRA PPO at equal settings, each in its own process; the
  variants and figures are described in ``ppo_memory.py``.

Examples
  OMP_NUM_THREADS=1 python benchmarks/bench_memory.py --config small --nproc 2 --batch_size 4 --seq_len 128 \\
      --strategies naive,ddp,fsdp_z2,fsdp_z3
  python benchmarks/bench_memory.py --device cuda --config 1b --nproc 1 --batch_size 4 --seq_len 512 \\
      --precision bf16 --strategies ddp,fsdp_z3,fsdp_z3_offload,colossalai_zero2,colossalai_zero2_cpu,colossalai_gemini
  OMP_NUM_THREADS=1 python benchmarks/bench_memory.py --config small --strategies naive \\
      --optim adamw_torch,adamw_bnb_8bit,adafactor,lomo,adalomo
  OMP_NUM_THREADS=1 python benchmarks/bench_memory.py --ppo full,lora,lora_8bit,lora_4bit,lora_4bit_shared \\
      --config small --hidden 512 --intermediate 1408 --layers 8 --batch_size 4 --seq_len 64
  python benchmarks/bench_memory.py --device cuda --llama7b --ppo lora_4bit_shared --batch_size 1 --seq_len 512 \\
      --precision bf16 --steps 1 --warmup_steps 1
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from harness import Bounded  # noqa: E402
import ppo_memory  # noqa: E402
from coati.utils.optim import OPTIMIZERS  # noqa: E402

# spec -> (strategy name, extra make_strategy kwargs)
SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "naive": ("naive", {}),
    "ddp": ("ddp", {}),
    "fsdp_z2": ("fsdp", {"zero_stage": 2}),
    "fsdp_z3": ("fsdp", {"zero_stage": 3}),
    "fsdp_z2_offload": ("fsdp", {"zero_stage": 2, "cpu_offload": True}),
    "fsdp_z3_offload": ("fsdp", {"zero_stage": 3, "cpu_offload": True}),
    "colossalai_zero2": ("colossalai_zero2", {}),
    "colossalai_zero2_cpu": ("colossalai_zero2_cpu", {}),
    "colossalai_gemini": ("colossalai_gemini", {"placement_policy": "static"}),
    "colossalai_gemini_auto": ("colossalai_gemini", {"placement_policy": "auto"}),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", default="naive,ddp,fsdp_z2,fsdp_z3",
                   help=f"comma-separated, from: {', '.join(SPECS)}")
    p.add_argument("--optim", default="adamw_torch",
                   help="comma-separated optimizers every strategy (or --ppo variant) runs with, from: "
                        + ", ".join(OPTIMIZERS))
    p.add_argument("--gpu_mem_cap_gb", type=Bounded(float, "> 0"), default=None,
                   help="cap each worker's GPU memory (torch's per-process fraction): what fits a smaller GPU")
    p.add_argument("--config", choices=sorted(harness.PRESETS), default="small", help="LLaMA shape preset")
    p.add_argument("--hidden", type=Bounded(int, ">= 4"), default=None, help="override the preset's hidden size")
    p.add_argument("--layers", type=Bounded(int, ">= 1"), default=None, help="override the preset's layer count")
    p.add_argument("--nproc", type=Bounded(int, ">= 1"), default=2, help="processes for every strategy but naive")
    p.add_argument("--batch_size", type=Bounded(int, ">= 1"), default=4, help="global sequences per step (divisible by --nproc)")
    p.add_argument("--seq_len", type=Bounded(int, ">= 2"), default=128, help="tokens per sequence")
    p.add_argument("--steps", type=Bounded(int, ">= 1"), default=3, help="timed optimizer steps")
    p.add_argument("--warmup_steps", type=Bounded(int, ">= 0"), default=1, help="untimed optimizer steps before timing")
    p.add_argument("--lr", type=Bounded(float, "> 0"), default=1e-5, help="learning rate of every worker")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where every worker runs")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="the strategy's mixed precision")
    p.add_argument("--grad_checkpoint", action="store_true", help="gradient checkpointing in every strategy")
    p.add_argument("--threads", type=Bounded(int, ">= 1"), default=1, help="torch/OMP threads per process")
    p.add_argument("--seed", type=Bounded(int, ">= 0"), default=0, help="seed of the model init and the data order")
    p.add_argument("--port", type=Bounded(int, "[1, 65535]"), default=29671, help="rendezvous port for the torchrun jobs")
    p.add_argument("--output", default=None, help="also write the JSON line to this file")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_optim", default="adamw_torch", help=argparse.SUPPRESS)
    ppo_memory.add_args(p)  # --ppo full,lora,lora_8bit,lora_4bit,...: PPO memory per variant instead
    return p


# ----- one strategy, inside its own (torchrun) job ------------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig

    from coati.models import Actor
    from coati.models.loss import GPTLMLoss
    from coati.trainer.optim import make_optimizer
    from coati.trainer.strategies import make_strategy

    torch.set_num_threads(args.threads)
    name, extra = SPECS[args._worker]
    rss_before = harness.rss_mb()
    precision = "bf16" if args.precision == "bf16" else None
    strategy = make_strategy(name, seed=args.seed, mixed_precision=precision, **extra)
    if args.device == "cuda":
        harness.cap_gpu_memory(args.gpu_mem_cap_gb)
        torch.cuda.reset_peak_memory_stats()
    config = LlamaConfig(**harness.model_config(args, vocab_size=args.vocab_size))
    model = Actor.from_config(config, grad_checkpoint=args.grad_checkpoint)
    params = sum(p.numel() for p in model.parameters())
    model = strategy.prepare_model(model)
    optimizer = make_optimizer(args._optim, model, args.lr, strategy=strategy)
    model, optimizer = strategy.prepare_optimizer(model, optimizer)
    grad_peak = track_gradients(model, optimizer)
    model.train()

    per_rank = args.batch_size // strategy.world_size
    gen = torch.Generator().manual_seed(args.seed)
    loss_fn = GPTLMLoss()
    clock = harness.StepClock(args.device)
    loss = torch.zeros(())
    for _ in range(args.warmup_steps + args.steps):
        ids = torch.randint(3, config.vocab_size, (args.batch_size, args.seq_len), generator=gen)
        mine = ids[strategy.rank * per_rank:(strategy.rank + 1) * per_rank].to(strategy.device)
        with strategy.autocast():
            logits = model(mine, attention_mask=torch.ones_like(mine))
        loss = loss_fn(logits, mine)
        strategy.backward(loss, model, optimizer)
        grad_peak()
        strategy.optimizer_step(optimizer, model)
        loss = strategy.all_reduce(loss.detach().float(), op="mean")
        clock.tick()
    gc.collect()
    figures: dict[str, Any] = {"peak_rss_mb": round(harness.peak_rss_mb(), 1),
                               "rss_before_model_mb": round(rss_before, 1),
                               "steady_rss_mb": round(harness.rss_mb(), 1)}
    if args.device == "cuda":
        figures["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        figures["steady_gpu_mem_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
    figures.update(state_mb(model, optimizer))
    figures.update(memory_mb(model, optimizer, grad_peak.peak))
    per_rank_figures = strategy.all_gather_object(figures)
    result = {k: max(f[k] for f in per_rank_figures) for k in figures}
    result.update(clock.rates(args.warmup_steps, args.steps,
                              {"tokens": args.batch_size * args.seq_len * args.steps}))
    result.update(world_size=strategy.world_size, params_m=round(params / 1e6, 2), last_loss=round(float(loss), 5),
                  optimizer=args._optim)
    if strategy.is_rank0():
        harness.emit(result)
    strategy.barrier()


def state_mb(model, optimizer) -> dict[str, float]:
    """This rank's parameters + gradients + optimizer state, in MiB, by device type (shards counted locally)."""
    import torch
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    sizes: dict[str, float] = {}

    def add(t) -> None:
        if not torch.is_tensor(t):
            return
        t = t.to_local() if isinstance(t, DTensor) else t
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or t.is_meta:
            return
        seen.add(storage.data_ptr())
        key = f"state_{'gpu' if t.device.type == 'cuda' else 'cpu'}_mb"
        sizes[key] = sizes.get(key, 0.0) + storage.nbytes() / 2**20

    for p in model.parameters():
        add(p)
        add(p.grad)
    inner = getattr(optimizer, "optim", optimizer)
    for group in inner.param_groups:
        for p in group["params"]:  # ZeRO masters live here
            add(p)
    for state in inner.state.values():
        for v in state.values():
            add(v)
    return {k: round(v, 1) for k, v in sizes.items()}


def _nbytes(t) -> int:
    """This rank's bytes of ``t`` (its shard of a DTensor; a view into a bigger buffer counts only itself)."""
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def track_gradients(model, optimizer):
    """A callable that records the gradient bytes alive now (its ``peak``: the most seen): called as each
    gradient lands, where LOMO / AdaLomo update what backward left (FSDP2 hands their shards over only then),
    and by the loop before each optimizer step."""
    params = [p for p in model.parameters() if p.requires_grad]

    def measure(*_):
        measure.peak = max(measure.peak, sum(_nbytes(p.grad) for p in params if p.grad is not None))

    measure.peak = 0
    for p in params:
        p.register_post_accumulate_grad_hook(measure)
    if hasattr(optimizer, "grad_func"):  # lomo-optim's update of every gradient present, called after backward
        update = optimizer.grad_func
        optimizer.grad_func = lambda x: (measure(), update(x))[1]
    return measure


def memory_mb(model, optimizer, peak_grad_bytes: int) -> dict[str, float]:
    """This rank's weights, peak gradients and optimizer state (AdaLomo keeps its moments outside ``state``), MiB,
    and their sum over the weights."""
    import torch

    def total(tensors) -> int:
        seen: dict[int, int] = {}
        for t in tensors:
            if torch.is_tensor(t) and not t.is_meta:
                seen[id(t)] = _nbytes(t)
        return sum(seen.values())

    inner = getattr(optimizer, "optim", optimizer)
    state = [v for s in inner.state.values() for v in s.values()]
    state += [v for k in ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col") for v in getattr(inner, k, {}).values()]
    params, state_bytes = total(model.parameters()), total(state)
    return {"params_mb": round(params / 2**20, 1), "peak_grad_mb": round(peak_grad_bytes / 2**20, 1),
            "optim_state_mb": round(state_bytes / 2**20, 1),
            "x_params": round((params + peak_grad_bytes + state_bytes) / max(params, 1), 3)}


# ----- the parent: one job per strategy, one JSON line ---------------------------------------------------------

def run_spec(args: argparse.Namespace, spec: str, argv: list[str], log: Path, optim: str) -> dict[str, Any]:
    # the options travel in the environment: torchrun would take abbreviations like --nproc as its own
    env = dict(os.environ, PYTHONPATH=str(harness.REPO), TOKENIZERS_PARALLELISM="false",
               BENCH_MEMORY_ARGV=json.dumps(argv))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    script = [str(Path(__file__).resolve()), "--_worker", spec, "--_optim", optim]
    if spec == "naive":
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={args.nproc}",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{args.port}", *script]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    lines = log.read_text().splitlines()
    for line in lines:
        if line.startswith(harness.RESULT_TAG):
            return json.loads(line[len(harness.RESULT_TAG):])
    errors = [ln for ln in lines if "Error: " in ln and "ChildFailedError" not in ln]
    return {"error": (errors[-1] if errors else (lines[-1] if lines else f"exit code {proc.returncode}"))[-400:]}


def optimizers(args: argparse.Namespace) -> list[str]:
    names = [o.strip() for o in args.optim.split(",") if o.strip()]
    unknown = [o for o in names if o not in OPTIMIZERS]
    if unknown or not names:
        raise SystemExit(f"unknown optimizers {unknown}; choose from {', '.join(OPTIMIZERS)}")
    return names


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--_worker" in argv and "BENCH_MEMORY_ARGV" in os.environ:
        argv = json.loads(os.environ["BENCH_MEMORY_ARGV"]) + argv
    args = build_parser().parse_args(argv)
    if args._worker in ppo_memory.VARIANTS:
        return ppo_memory.worker(args)
    if args._worker:
        return worker(args)
    if args.ppo:
        line = json.dumps(ppo_memory.run(args, argv))
        print(line)
        if args.output:
            Path(args.output).write_text(line + "\n")
        return None
    specs = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in specs if s not in SPECS]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {', '.join(SPECS)}")
    if args.batch_size % args.nproc:
        raise SystemExit("--batch_size must be divisible by --nproc (equal global batch for every strategy)")
    optims = optimizers(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for spec in specs:
            for optim in optims:
                key = spec if len(optims) == 1 else f"{spec}/{optim}"
                t0 = time.perf_counter()
                results[key] = run_spec(args, spec, argv, Path(tmp) / f"{spec}_{optim}.log", optim)
                results[key]["job_s"] = round(time.perf_counter() - t0, 1)
    model = {"family": "llama", **{k: v for k, v in harness.model_config(args, vocab_size=args.vocab_size).items()
                                    if k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads", "vocab_size")}}
    shown = [a for i, a in enumerate(argv) if a != "--output" and (i == 0 or argv[i - 1] != "--output")]
    command = "OMP_NUM_THREADS=%d python benchmarks/bench_memory.py %s" % (args.threads, " ".join(shown))
    line = json.dumps({"bench": "memory", "command": command, "model": model, "global_batch": args.batch_size,
                       "seq_len": args.seq_len,
                       "nproc": args.nproc, "optimizers": optims, "warmup_steps": args.warmup_steps,
                       "timed_steps": args.steps,
                       "device": args.device, "precision": args.precision, "grad_checkpoint": args.grad_checkpoint,
                       "threads": args.threads, "results": results, "versions": harness.versions(),
                       "machine": harness.machine(args.device)})
    print(line)
    if args.output:
        Path(args.output).write_text(line + "\n")


if __name__ == "__main__":
    main()
