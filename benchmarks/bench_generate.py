"""Batched sampling throughput of the HF rollout engine's candidate paths, and whether each samples the same
tokens as today's path for the same seed.

Paths (``--paths``, all run in one process, interleaved: every repeat runs each path once, in turn)
  generate             transformers' own decoding loop: ``generate_with_masks(..., custom_generate=None)``
                       (HF ``generate``, DynamicCache), what the HF engine sampled with before
                       ``drop_finished``; every ratio and sample check is against it
  drop_finished        ``custom_generate=sample_dropping_finished`` (``generate_with_masks``' default, so
                       the HF engine's path): the model runs only on the rows still generating
  static               ``cache_implementation="static"`` (a preallocated KV cache of the full length)
  static_compile       the static cache with transformers' own ``torch.compile`` of the decoding forward
                       (``CompileConfig``, enabled on every device); its compile happens in an untimed warmup
  continuous_batching  transformers' ``generate_batch`` (paged KV cache, a scheduler that refills finished
                       slots); it samples each step over the requests scheduled, so its draws are not ``generate``'s

Workload (GRPO-shaped): ``--batch_size`` rows = batch_size / G prompts of
``../shared/data/prompts/vicuna_question_80.jsonl`` (Alpaca template, left-padded), each repeated G times,
sampled at temperature 1 (no top-k / top-p) for up to ``--max_new_tokens``. The random-weight model ends a
response with a geometric length: its LM head gets a bias on EOS, calibrated so that EOS has probability
about ``--eos_prob`` per token (0: no bias, every row runs to ``--max_new_tokens``), as rollouts of a real
policy end at different lengths. Each repeat seeds every path alike and starts with the next path in turn.

Figures per path: ``tokens_per_s`` (generated tokens up to and including EOS, per wall second) and
``tokens_per_cpu_s`` (per CPU second of this process, the steadier figure on a shared CPU), medians over
``--repeats`` (``runs`` lists each); ``ratio``: the median over repeats of path / ``generate`` in the same
repeat; ``samples_equal``: every
repeat's sequences equal ``generate``'s token for token. On a shared CPU read ``tokens_per_cpu_s``: other
jobs stretch wall time, not the CPU time this single-threaded process spends. One JSON line on stdout
(``--output`` also writes it).

Example
  python benchmarks/bench_generate.py --config small --batch_size 32 --num_generations 4 \\
      --max_new_tokens 128 --eos_prob 0.02 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import Bounded  # noqa: E402

PATHS = ("generate", "drop_finished", "static", "static_compile", "continuous_batching")
EOS, PAD = 2, 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(harness.PRESETS), default="small", help="LLaMA shape preset")
    p.add_argument("--batch_size", type=Bounded(int, ">= 1"), default=32, help="rows sampled per call")
    p.add_argument("--num_generations", type=Bounded(int, ">= 1"), default=4, help="samples per prompt (G)")
    p.add_argument("--max_new_tokens", type=Bounded(int, ">= 1"), default=128)
    p.add_argument("--max_prompt_len", type=Bounded(int, ">= 2"), default=128, help="prompt truncation length")
    p.add_argument("--eos_prob", type=Bounded(float, ">= 0"), default=0.02,
                   help="about this EOS probability per token (0: no EOS bias)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {','.join(PATHS)}")
    p.add_argument("--repeats", type=Bounded(int, ">= 1"), default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="the model's weights dtype")
    p.add_argument("--threads", type=Bounded(int, ">= 1"), default=1, help="torch threads")
    p.add_argument("--seed", type=Bounded(int, ">= 0"), default=0)
    p.add_argument("--output", default=None, help="also write the JSON line to this file")
    args = p.parse_args()
    args.paths = [x for x in args.paths.split(",") if x]
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        p.error(f"--paths: unknown {sorted(unknown)}")
    if args.batch_size % args.num_generations:
        p.error("--batch_size must be a multiple of --num_generations")
    return args


def prompts(args: argparse.Namespace) -> tuple[Any, Any]:
    """Left-padded ``(input_ids, attention_mask)``: batch_size / G prompts, each G times in a row."""
    import torch
    from coati.dataset import PromptDataset

    ds = PromptDataset(str(harness.SHARED_DATA / "prompts" / "vicuna_question_80.jsonl"), harness.llama_tokenizer(),
                       max_input_len=args.max_prompt_len, prompt_template="alpaca")
    rows = [ds[i]["input_ids"].tolist() for i in range(args.batch_size // args.num_generations)]
    rows = [r for r in rows for _ in range(args.num_generations)]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def build_model(args: argparse.Namespace, input_ids: Any, attention_mask: Any) -> Any:
    """The preset's random-weight LLaMA on ``--device``; with ``--eos_prob`` an LM head whose EOS bias puts EOS
    at about that probability (the median over the prompts' positions of log(sum of the other tokens' exp) -
    EOS logit)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = harness.model_config(argparse.Namespace(config=args.config, hidden=None, layers=None,
                                                  seq_len=args.max_prompt_len + args.max_new_tokens))
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model = model.to(device=args.device, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
    if args.eos_prob > 0:
        old = model.lm_head
        head = torch.nn.Linear(old.in_features, old.out_features, bias=True, device=args.device,
                               dtype=old.weight.dtype)
        with torch.no_grad():
            head.weight.copy_(old.weight)
            head.bias.zero_()
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[attention_mask.bool()].float()
            others = torch.cat([logits[:, :EOS], logits[:, EOS + 1:]], dim=1).logsumexp(-1)
            gap = (others - logits[:, EOS]).median()
            head.bias[EOS] = math.log(args.eos_prob / (1 - args.eos_prob)) + gap
        model.lm_head = head
    return model


def path_runner(name: str, model: Any, args: argparse.Namespace, input_ids: Any,
                attention_mask: Any) -> Callable[[], Any]:
    """A no-argument call that samples the batch with path ``name`` and returns ``(B, P + A)`` sequences whose
    tokens after the first EOS are PAD (continuous batching's ragged outputs padded the same way)."""
    import torch
    from transformers import CompileConfig, GenerationConfig

    from coati.models import Actor
    from coati.models.generation import generate_with_masks, sample_dropping_finished

    actor = Actor(model)
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    extra: dict[str, Any] = dict(custom_generate=None)  # transformers' own decoding loop
    if name == "drop_finished":
        extra = dict(custom_generate=sample_dropping_finished)
    elif name in ("static", "static_compile"):
        extra["cache_implementation"] = "static"
        if name == "static_compile":
            compile_config = CompileConfig()
            compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless asked
            extra["compile_config"] = compile_config

    if name == "continuous_batching":
        prompt_rows = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
        config = GenerationConfig(eos_token_id=EOS, pad_token_id=PAD, **sampling)

        def run() -> Any:
            out = model.generate_batch(inputs=prompt_rows, generation_config=config, progress_bar=False)
            width = input_ids.size(1) + args.max_new_tokens
            rows = []
            for (req, result), prompt in zip(out.items(), input_ids.tolist()):
                tokens = list(result.generated_tokens)[:args.max_new_tokens]
                if EOS in tokens:
                    tokens = tokens[:tokens.index(EOS) + 1]
                rows.append(prompt + tokens + [PAD] * (width - len(prompt) - len(tokens)))
            return torch.tensor(rows)
        return run

    def run() -> Any:
        seqs, _, action_mask = generate_with_masks(actor, input_ids, attention_mask, eos_token_id=EOS,
                                                   pad_token_id=PAD, **sampling, **extra)
        seqs = seqs.clone()
        seqs[:, input_ids.size(1):].masked_fill_(action_mask.eq(0), PAD)
        width = input_ids.size(1) + args.max_new_tokens  # every row stopped early: pad to the full width
        return torch.nn.functional.pad(seqs, (0, width - seqs.size(1)), value=PAD)
    return run


def main() -> None:
    import torch

    from coati.models.generation import action_mask_from_tokens

    args = parse_args()
    torch.set_num_threads(args.threads)
    input_ids, attention_mask = (t.to(args.device) for t in prompts(args))
    model = build_model(args, input_ids, attention_mask)
    names = ["generate"] + [n for n in args.paths if n != "generate"]
    runners, errors, warmup_s = {}, {}, {}
    for name in names:  # untimed warmup (compiles, allocations)
        try:
            runners[name] = path_runner(name, model, args, input_ids, attention_mask)
            torch.manual_seed(args.seed)
            t = time.perf_counter()
            runners[name]()
            harness.sync(args.device)
            warmup_s[name] = round(time.perf_counter() - t, 2)
        except Exception as e:  # a path transformers cannot run here is reported, not fatal
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
            runners.pop(name, None)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in runners}
    equal: dict[str, bool] = {n: True for n in runners}
    prompt_len = input_ids.size(1)
    order = list(runners)
    for rep in range(args.repeats):
        seqs_of = {}
        for name in order[rep % len(order):] + order[:rep % len(order)]:  # each path first in turn
            run = runners[name]
            torch.manual_seed(args.seed + 1 + rep)
            harness.sync(args.device)
            wall, cpu = time.perf_counter(), time.process_time()
            seqs = run()
            harness.sync(args.device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            generated = seqs[:, prompt_len:]
            tokens = int(action_mask_from_tokens(generated, EOS).sum())
            seqs_of[name] = seqs.cpu()
            runs[name].append({"wall_s": wall, "cpu_s": cpu, "tokens": tokens})
        for name in runners:
            equal[name] = equal[name] and bool(torch.equal(seqs_of[name], seqs_of["generate"]))
    results: dict[str, Any] = {}
    for name, rs in runs.items():
        tokens = statistics.median(r["tokens"] for r in rs)
        results[name] = {
            "tokens_per_s": round(statistics.median(r["tokens"] / r["wall_s"] for r in rs), 1),
            "tokens_per_cpu_s": round(statistics.median(r["tokens"] / r["cpu_s"] for r in rs), 1),
            "median_tokens": tokens, "mean_response_len": round(tokens / args.batch_size, 1),
            "warmup_s": warmup_s[name], "samples_equal": equal[name] if name != "generate" else None,
            "runs": [{"tokens_per_s": round(r["tokens"] / r["wall_s"], 1),
                      "tokens_per_cpu_s": round(r["tokens"] / r["cpu_s"], 1)} for r in rs]}
    base_runs = results["generate"]["runs"]
    for name, r in results.items():  # paired: each repeat's run against generate's in the same repeat
        if name != "generate":
            r["ratio"] = {k: round(statistics.median(a[k] / b[k] for a, b in zip(r["runs"], base_runs)), 3)
                          for k in ("tokens_per_s", "tokens_per_cpu_s")}
    out = {"bench": "generate", "model": {"preset": args.config, **harness.PRESETS[args.config]},
           "batch_size": args.batch_size, "num_generations": args.num_generations,
           "prompt_len": prompt_len, "max_new_tokens": args.max_new_tokens, "eos_prob": args.eos_prob,
           "sampling": "temperature 1, no top-k / top-p", "device": args.device, "precision": args.precision,
           "threads": args.threads, "repeats": args.repeats, "paths": results, "errors": errors,
           "versions": harness.versions(), "machine": harness.machine(args.device),
           "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:])}
    line = json.dumps(out)
    print(line)
    if args.output:
        Path(args.output).write_text(line + "\n")


if __name__ == "__main__":
    main()
