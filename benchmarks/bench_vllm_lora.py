"""A LoRA actor's weight sync into vLLM: merged into the full weights vs served as a vLLM LoRA adapter.

What it measures
  A random-weight LLaMA (``--config`` preset of harness.py, default "small": hidden 256, 4 layers, 32k vocab,
  fp32) is saved once; an Actor loads it with a LoRA adapter (``--lora_rank``, the family's targets) whose B
  matrices are random, as after training. For each mode, in a process of its own, a :class:`VLLMEngine` starts
  on the saved base and then, ``--syncs`` times, the adapter changes (B += noise, as an optimizer step would),
  ``update_weights`` sends it and ``generate`` samples ``--batch_size`` prompts of ``--prompt_len`` random
  tokens for ``--gen_len`` tokens (greedy, every row to full length):

  merge     every full weight goes to vLLM, a LoRA layer's as W + B A scaling (fp32), through reload_weights;
  adapter   only the adapter's tensors go: written to a fresh directory and loaded under a fresh adapter id,
            vLLM applying it at every forward (its LoRA kernels) on the untouched base.

Figures, per mode (medians over the syncs after the first, which pays one-off costs)
  sync_s                 seconds of update_weights
  generate_s             seconds of one generate call
  tokens_per_s           generated tokens per second
  matches_hf             whether the greedy tokens after the last sync equal HF generate of the LoRA actor

Example
  OMP_NUM_THREADS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/bench_vllm_lora.py --config small \
      --lora_rank 8 --syncs 4 --batch_size 8 --gen_len 32
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402
from coati.utils.config import Bounded  # noqa: E402

MODES = ("merge", "adapter")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(harness.PRESETS), default="small", help="LLaMA shape preset")
    p.add_argument("--hidden", type=Bounded(int, ">= 4"), default=None, help="override the preset's hidden size")
    p.add_argument("--layers", type=Bounded(int, ">= 1"), default=None, help="override the preset's layer count")
    p.add_argument("--lora_rank", type=Bounded(int, ">= 1"), default=8, help="rank of the actor's LoRA adapter")
    p.add_argument("--syncs", type=Bounded(int, ">= 1"), default=4,
                   help="update + sync + generate rounds per mode (the first one is untimed when there are more)")
    p.add_argument("--batch_size", type=Bounded(int, ">= 1"), default=8, help="prompts per generate call")
    p.add_argument("--prompt_len", type=Bounded(int, ">= 1"), default=16, help="tokens per random prompt")
    p.add_argument("--gen_len", type=Bounded(int, ">= 1"), default=32, help="generated tokens per prompt")
    p.add_argument("--seed", type=Bounded(int, ">= 0"), default=0, help="seed of the model, adapter and prompts")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.seq_len = args.prompt_len + args.gen_len
    return args


def worker(args: argparse.Namespace) -> dict:
    import torch

    from coati.models import Actor, LoraSettings
    from coati.rollout import HFRolloutEngine, VLLMEngine

    path = Path(args.workdir) / "base"
    torch.manual_seed(args.seed)
    actor = Actor.from_pretrained(str(path), lora=LoraSettings(rank=args.lora_rank, alpha=2 * args.lora_rank)).eval()
    lora_b = [p for n, p in actor.named_parameters() if "lora_B" in n]
    engine = VLLMEngine(path, eos_token_id=2, pad_token_id=0, dtype="float32", enforce_eager=True,
                        max_model_len=args.seq_len, kv_cache_memory_bytes=256 << 20, seed=args.seed,
                        lora_rank=args.lora_rank if args.worker == "adapter" else 0)
    ids = torch.randint(3, 32000, (args.batch_size, args.prompt_len))
    mask = torch.ones_like(ids)
    greedy = {"do_sample": False, "max_new_tokens": args.gen_len, "min_new_tokens": args.gen_len}
    sync_s, gen_s = [], []
    for _ in range(args.syncs):
        with torch.no_grad():
            for p in lora_b:
                p.add_(torch.randn_like(p) * 0.05)
        t0 = time.perf_counter()
        engine.update_weights(actor)
        sync_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = engine.generate(ids, mask, greedy)
        gen_s.append(time.perf_counter() - t0)
    hf = HFRolloutEngine(actor, eos_token_id=2, pad_token_id=0).generate(ids, mask, greedy, return_log_probs=False)
    timed = slice(1, None) if args.syncs > 1 else slice(None)
    gen = statistics.median(gen_s[timed])
    return {"sync_s": round(statistics.median(sync_s[timed]), 4), "first_sync_s": round(sync_s[0], 4),
            "generate_s": round(gen, 4), "tokens_per_s": round(args.batch_size * args.gen_len / gen, 1),
            "matches_hf": bool(torch.equal(out.sequences, hf.sequences))}


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    command = "OMP_NUM_THREADS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/bench_vllm_lora.py " + \
        " ".join(argv if argv is not None else sys.argv[1:])
    result = {"bench": "vllm_lora_sync", "command": command, "load_avg_1m": round(os.getloadavg()[0], 2),
              "lora_rank": args.lora_rank, "syncs": args.syncs,
              "batch_size": args.batch_size, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
              "precision": "fp32", "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0)}
    with tempfile.TemporaryDirectory() as tmp:
        result["model"] = harness.write_model_dir(args, Path(tmp) / "base")
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
        for mode in MODES:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", mode,
                   "--workdir", tmp]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{mode} worker failed:\n{proc.stderr[-4000:]}")
            result[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["adapter_over_merge"] = {k: round(result["adapter"][k] / result["merge"][k], 3)
                                    for k in ("sync_s", "generate_s")}
    result["versions"] = harness.versions()
    import vllm

    result["versions"]["vllm"] = vllm.__version__
    result["machine"] = harness.machine("cpu")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
