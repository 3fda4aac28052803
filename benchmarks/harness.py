"""Shared plumbing for the coati-vs-TRL benchmarks: model presets, worker subprocesses, clocks, memory.

Each ``bench_*.py`` prepares one model directory and one tokenized data file in the parent process, then
runs every framework in its own child process (``--_worker coati|trl|plain``) so that peak memory is per
framework and none pays for another's imports. ``plain`` is a plain PyTorch loop on the same batches with
the same optimizer settings (:func:`plain_loop`), the head run only where the loss needs it: the bar coati's
own overhead is measured against. Children report one ``BENCH_RESULT {...}`` line; the parent prints one
JSON line that holds every result and the ratios ``ratio_coati_over_trl`` / ``ratio_coati_over_plain_loop``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout
from coati.utils.config import Bounded  # noqa: E402  (light: argparse and coati.errors only)

# the real data beside the repository; COATI_SHARED_DATA points elsewhere (a device machine gets a copy)
SHARED_DATA = Path(os.environ.get("COATI_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULT_TAG = "BENCH_RESULT "
FRAMEWORKS = ("coati", "trl", "plain")

# LLaMA shapes. "small" is the recorded CPU config; "1b" is TinyLlama-1.1B's shape (GPU only).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
}


# ----- command line ---------------------------------------------------------------------------------------

def common_parser(description: str, *, steps: int, batch_size: int, seq_len: int,
                  plain_loop: bool = False) -> argparse.ArgumentParser:
    """The flags every benchmark shares; ``plain_loop``: the script has a ``plain`` worker too."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(PRESETS), default="small", help="LLaMA shape preset")
    p.add_argument("--hidden", type=Bounded(int, ">= 4"), default=None, help="override the preset's hidden size")
    p.add_argument("--layers", type=Bounded(int, ">= 1"), default=None, help="override the preset's layer count")
    p.add_argument("--steps", type=Bounded(int, ">= 1"), default=steps, help="timed optimizer steps")
    p.add_argument("--warmup_steps", type=Bounded(int, ">= 0"), default=2, help="untimed optimizer steps before timing")
    p.add_argument("--batch_size", type=Bounded(int, ">= 1"), default=batch_size)
    p.add_argument("--seq_len", type=Bounded(int, ">= 2"), default=seq_len, help="max tokens per sequence (truncation length)")
    p.add_argument("--lr", type=Bounded(float, "> 0"), default=1e-5, help="learning rate of every worker")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where every worker runs")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32 weights either way; bf16 = autocast in both frameworks")
    p.add_argument("--threads", type=Bounded(int, ">= 1"), default=1, help="torch/OMP threads per worker process")
    p.add_argument("--peak_tflops", type=Bounded(float, "> 0"), default=None,
                   help="the accelerator's dense bf16 peak for MFU (default: COATI_PEAK_TFLOPS, else looked up "
                        "from the CUDA device name, coati.utils.flops.PEAK_BF16_TFLOPS)")
    p.add_argument("--repeats", type=Bounded(int, ">= 1"), default=1,
                   help="run each framework this many times, alternating, and keep the median run")
    p.add_argument("--seed", type=Bounded(int, ">= 0"), default=0, help="seed of the model init and the data order")
    p.add_argument("--coati_optim", choices=["default", "fused", "foreach"], default="default",
                   help="default: the optimizer coati's trainer builds itself; fused/foreach: hand it "
                        "torch.optim.AdamW(fused=True / foreach=True) instead (TRL's default is fused)")
    p.add_argument("--skip_trl", action="store_true", help="do not measure TRL")
    p.add_argument("--skip_coati", action="store_true", help="do not measure coati")
    if plain_loop:
        p.add_argument("--skip_plain", action="store_true", help="do not measure the plain PyTorch loop")
    p.add_argument("--output", default=None, help="also write the JSON line to this file")
    p.add_argument("--keep_workdir", action="store_true", help="keep the temp dir (model, data, worker logs)")
    p.add_argument("--_worker", choices=FRAMEWORKS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_job", default=None, help=argparse.SUPPRESS)
    return p


def model_config(args: argparse.Namespace, vocab_size: int = 32000) -> dict[str, Any]:
    cfg = dict(PRESETS[args.config])
    if args.hidden is not None:
        cfg["hidden_size"] = args.hidden
        cfg["intermediate_size"] = int(round(args.hidden * 2.6875 / 8)) * 8
    if args.layers is not None:
        cfg["num_hidden_layers"] = args.layers
    cfg.update(vocab_size=vocab_size, max_position_embeddings=max(2048, args.seq_len * 2), bos_token_id=1,
               eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, rms_norm_eps=1e-5)
    return cfg


# ----- model and tokenizer --------------------------------------------------------------------------------

def llama_tokenizer():
    """The LLaMA-2 tokenizer as tests/tiny.py loads it (pad = <unk>, id 0)."""
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(SHARED_DATA / "tokenizers" / "llama2"))
    tok.pad_token = tok.unk_token
    return tok


def write_model_dir(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """A random-weight LLaMA (seeded) + tokenizer as a save_pretrained dir both frameworks load."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model_config(args)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(str(path))
    llama_tokenizer().save_pretrained(str(path))
    n_params = sum(p.numel() for p in model.parameters())
    return {"family": "llama", **{k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                       "num_attention_heads", "num_key_value_heads",
                                                       "vocab_size")},
            "params_m": round(n_params / 1e6, 2)}


def coati_optimizer(job: dict[str, Any], params: Any, lr: float) -> Any:
    """None (the trainer builds its own AdamW) or the AdamW variant ``--coati_optim`` asks for."""
    if job.get("coati_optim", "default") == "default":
        return None
    import torch

    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **{job["coati_optim"]: True})


# ----- measurement ----------------------------------------------------------------------------------------

def setup_worker(job: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def cap_gpu_memory(gb: float | None) -> None:
    """Let this process allocate at most ``gb`` GiB of the GPU (torch's per-process fraction): what fits a
    smaller card."""
    import torch

    if gb:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 2**30 / total))


def rss_mb() -> float:
    """Current resident set size of this process."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """High-water RSS of this process since it started (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemoryProbe:
    """Peak memory of the training phase: CPU = process RSS high-water, GPU = max_memory_allocated."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.rss_before = 0.0

    def start(self) -> None:
        self.rss_before = rss_mb()
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def report(self) -> dict[str, float]:
        out = {"peak_rss_mb": round(peak_rss_mb(), 1), "rss_before_train_mb": round(self.rss_before, 1)}
        if self.device == "cuda":
            import torch

            out["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out


class StepClock:
    """Wall and process-CPU timestamps at the end of every optimizer step.

    Wall time is the headline figure. On a shared CPU, other processes stretch wall time but not the CPU
    time this (single-threaded) process spends, so the ``*_per_cpu_s`` figures are the steadier comparison
    there; they are reported for ``--device cpu`` only (on a GPU the host CPU time means little).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        sync(self.device)
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def __len__(self) -> int:
        return len(self.wall)

    def window(self, warmup: int, steps: int) -> tuple[float, float]:
        """(wall s, CPU s) from the end of the last warmup step to the end of the last timed step."""
        if len(self.wall) < warmup + steps:
            raise RuntimeError(f"only {len(self.wall)} steps ran, expected {warmup + steps}")
        a, b = warmup - 1, warmup + steps - 1
        return self.wall[b] - self.wall[a], self.cpu[b] - self.cpu[a]

    def rates(self, warmup: int, steps: int, counts: dict[str, float]) -> dict[str, float]:
        """``{name}_per_s`` (wall) and, on CPU, ``{name}_per_cpu_s`` for each count over the timed window."""
        wall, cpu = self.window(warmup, steps)
        out = {f"{k}_per_s": round(v / wall, 3) for k, v in counts.items()}
        if self.device == "cpu":
            out.update({f"{k}_per_cpu_s": round(v / cpu, 3) for k, v in counts.items()})
        out.update(step_s=round(wall / steps, 4), timed_s=round(wall, 3))
        if self.device == "cpu":
            out["timed_cpu_s"] = round(cpu, 3)
        return out


def plain_loop(job: dict[str, Any], model: Any, batches: Iterable[dict[str, Any]], loss_fn: Callable[[dict], Any],
               clock: StepClock, on_batch: Callable[[dict], None] | None = None) -> list[float]:
    """A plain PyTorch training loop with coati's trainer settings: AdamW (fused, as coati builds it, or
    ``--coati_optim``'s), warmup 3% + cosine, bf16 autocast with ``--precision bf16``, grad-clip 1.0;
    ``warmup_steps + steps`` optimizer steps, one batch each. Returns the per-step losses."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    device = job["device"]
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = coati_optimizer(job, params, job["lr"]) or torch.optim.AdamW(
        params, lr=job["lr"], weight_decay=0.0, fused=True)
    total = job["warmup_steps"] + job["steps"]
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(total * 0.03), total)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=job["precision"] == "bf16")
    losses: list[float] = []
    for batch in batches:
        if len(losses) == total:
            break
        if on_batch is not None:
            on_batch(batch)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(float(loss))
        clock.tick()
    return losses


def run_plain(job: dict[str, Any], model: Any, loader: Iterable[dict[str, Any]], loss_fn: Callable[[dict], Any],
              clock: StepClock, on_batch: Callable[[dict], None], counts: dict[str, list[float]],
              extra: dict[str, Any] | None = None) -> None:
    """A ``plain`` worker's measured part: :func:`plain_loop` over the loader's batches, epoch after epoch,
    under a memory probe, then :func:`finish` (``counts`` are the lists ``on_batch`` fills)."""
    probe = MemoryProbe(job["device"])
    probe.start()
    losses = plain_loop(job, model, cycle_batches(loader), loss_fn, clock, on_batch=on_batch)
    finish(job, clock, counts, losses, probe, {"optimizer": f"AdamW ({job['coati_optim']})",
                                               "device_used": job["device"], **(extra or {})})


def trainable_params_m(model: Any) -> float:
    """Trainable parameters in millions, as each worker reports them."""
    return round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2)


def cycle_batches(loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The loader's batches in order, epoch after epoch (as coati's trainer goes over it)."""
    while True:
        yield from loader


def emit(result: dict[str, Any]) -> None:
    print(RESULT_TAG + json.dumps(result), flush=True)


def trl_clock(clock: StepClock, losses: list[float] | None = None) -> Any:
    """A transformers ``TrainerCallback`` that ticks ``clock`` at every optimizer step's end and appends each
    logged loss to ``losses``: how the TRL workers are timed."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if losses is not None and logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return Clock()


def load_rows(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The tokenized rows the parent prepared once for every worker."""
    return json.loads(Path(job["data_file"]).read_text())


def finish(job: dict[str, Any], clock: StepClock, counts: dict[str, list[float]], losses: list[float],
           probe: "MemoryProbe", extra: dict[str, Any]) -> None:
    """Emit a training worker's result: the rates of each per-step count over the timed window (and its
    ``timed_*`` total), the first and last loss, peak memory and ``extra``."""
    w, s = job["warmup_steps"], job["steps"]
    totals = {k: sum(v[w:w + s]) for k, v in counts.items()}
    out = clock.rates(w, s, totals)
    out.update({f"timed_{k}": v for k, v in totals.items()})
    out.update(first_loss=round(losses[0], 5) if losses else None,
               last_loss=round(losses[w + s - 1], 5) if len(losses) >= w + s else None)
    out.update(probe.report())
    if "model_flops" in totals:
        out.update(utilisation(job, out["model_flops_per_s"]))
    out.update(extra)
    emit(out)


def utilisation(job: dict[str, Any], flops_per_s: float) -> dict[str, float]:
    """Achieved model TFLOP/s and, where the peak is known (``--peak_tflops``, else
    :func:`coati.utils.flops.device_peak_tflops`), MFU."""
    import torch

    from coati.utils.flops import device_peak_tflops

    out = {"model_tflops_per_s": round(flops_per_s / 1e12, 4)}
    peak = job.get("peak_tflops") or device_peak_tflops(torch.device(job["device"]))
    if peak:
        out.update(peak_bf16_tflops=peak, mfu=round(flops_per_s / (peak * 1e12), 4))
    return out


# ----- the parent: jobs, workers, the report line -----------------------------------------------------------

def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "accelerate", "peft", "coati"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_worker(script: str, framework: str, job_path: Path, threads: int, device: str,
               log_path: Path) -> dict[str, Any]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = "1"
    env["WANDB_DISABLED"] = "true"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, script, "--_worker", framework, "--_job", str(job_path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(REPO))
    log_path.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    results = [line[len(RESULT_TAG):] for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not results:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        sys.stderr.write(f"[{framework}] worker failed (rc={proc.returncode}); log: {log_path}\n{tail}\n")
        return {"error": f"worker exited with {proc.returncode}", "log_tail": tail[-2000:]}
    result = json.loads(results[-1])
    result["process_wall_s"] = round(time.perf_counter() - t0, 2)
    return result


def run_frameworks(args: argparse.Namespace, script: str, job: dict[str, Any], workdir: Path,
                   key_metrics: list[str]) -> dict[str, dict[str, Any]]:
    """Run the coati, TRL and plain-loop workers (alternating when repeating). With repeats, every numeric
    figure is the median over the runs, and ``runs`` keeps each run's ``key_metrics``."""
    frameworks = [f for f in FRAMEWORKS if not getattr(args, f"skip_{f}", True)]
    job_path = workdir / "job.json"
    job_path.write_text(json.dumps(job))
    runs: dict[str, list[dict[str, Any]]] = {f: [] for f in frameworks}
    for r in range(args.repeats):
        for fw in frameworks:
            sys.stderr.write(f"[bench] {fw} run {r + 1}/{args.repeats} ...\n")
            res = run_worker(script, fw, job_path, args.threads, args.device, workdir / f"{fw}_{r}.log")
            runs[fw].append(res)
            if "error" not in res:
                sys.stderr.write(f"[bench] {fw}: " + ", ".join(f"{k} = {res.get(k)}" for k in key_metrics) + "\n")
    combined: dict[str, dict[str, Any]] = {}
    for fw, rs in runs.items():
        ok = [x for x in rs if "error" not in x]
        if not ok:
            combined[fw] = rs[-1]
            continue
        merged = dict(ok[0])
        if len(ok) > 1:
            for k, v in ok[0].items():
                if isinstance(v, int) and not isinstance(v, bool):
                    merged[k] = int(statistics.median(x[k] for x in ok))
                elif isinstance(v, float):
                    merged[k] = round(statistics.median(x[k] for x in ok), 4)
                elif isinstance(v, dict) and all(isinstance(u, (int, float)) for u in v.values()):
                    merged[k] = {kk: round(statistics.median(x[k][kk] for x in ok), 4) for kk in v}
            merged["runs"] = [{k: x.get(k) for k in key_metrics} for x in ok]
        combined[fw] = merged
    return combined


def ratios(coati: dict[str, Any], trl: dict[str, Any], keys: list[str]) -> dict[str, float]:
    out = {}
    for k in keys:
        a, b = coati.get(k), trl.get(k)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            out[k] = round(a / b, 3)
    return out


def main(args: argparse.Namespace, *, script: str, bench: str, prepare: Callable[[argparse.Namespace, Path],
         dict[str, Any]], key_metrics: list[str], ratio_keys: list[str], notes: str,
         report_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Parent flow: build the model dir and data file, run the workers, print one JSON line."""
    if args.warmup_steps < 1:
        raise SystemExit("--warmup_steps must be >= 1 (the first step compiles and allocates)")
    tmp = tempfile.mkdtemp(prefix=f"coati_{bench}_")
    workdir = Path(tmp)
    model_dir = workdir / "model"
    model_info = write_model_dir(args, model_dir)
    job = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    job.update(model_dir=str(model_dir), workdir=str(workdir))
    job.update(prepare(args, workdir))
    results = run_frameworks(args, script, job, workdir, key_metrics)
    report: dict[str, Any] = {
        "bench": bench,
        "model": model_info,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.steps,
        "device": args.device,
        "precision": args.precision,
        "threads": args.threads,
        "repeats": args.repeats,
        "coati_optim": args.coati_optim,
        **{k: getattr(args, k) for k in report_args},
        **{k: v for k, v in job.items() if k.startswith("data_") and k != "data_file"},
        "coati": results.get("coati"),
        "trl": results.get("trl"),
        "plain_loop": results.get("plain"),
    }
    if "coati" in results and "trl" in results:
        report["ratio_coati_over_trl"] = ratios(results["coati"], results["trl"], ratio_keys)
    if "coati" in results and "plain" in results:
        report["ratio_coati_over_plain_loop"] = ratios(results["coati"], results["plain"], ratio_keys)
    report["notes"] = notes
    report["versions"] = versions()
    report["machine"] = machine(args.device)
    report["command"] = "python " + " ".join([os.path.relpath(script, REPO)] + sys.argv[1:])
    line = json.dumps(report)
    print(line, flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(line + "\n")
    if not args.keep_workdir:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        sys.stderr.write(f"[bench] kept {workdir}\n")
    return report


