"""SFT training throughput and peak memory: coati's SFTTrainer vs TRL's SFTTrainer, same model/data/batch.

What it measures
  A random-weight LLaMA (``--config`` preset, default "small": hidden 256, 4 layers, LLaMA-2 tokenizer and
  32k vocab) is saved once; both frameworks load those weights. The Alpaca demo set
  (``../shared/data/sft/alpaca_en_demo.json``) is tokenized once by coati's ``SFTDataset`` (Alpaca template,
  loss on responses only, truncated to ``--seq_len``), and both frameworks train on exactly those token ids
  and labels, in file order (no shuffling), ``--batch_size`` samples a step, padded to the longest sample of
  the batch (``--packing``: coati packs each batch's samples as ``packing_attention`` lays them out,
  TRL's SFTConfig ``padding_free=True`` flattens the same batch into one row; the same samples a step either
  way), no accumulation, AdamW, grad-clip 1.0, fp32 (or bf16 autocast in both with
  ``--precision bf16``), no gradient checkpointing (TRL's default of gradient checkpointing and bf16 is
  switched off so both do the same arithmetic). Each framework runs in its own subprocess: ``--warmup_steps``
  untimed optimizer steps, then ``--steps`` timed ones, measured from the end of the last warmup step to the
  end of the last timed step (data loading, forward, backward, clipping, optimizer and per-step logging all
  inside the window).

Figures, per framework
  tokens_per_s        real (non-pad) tokens of the timed batches / timed seconds
  padded_tokens_per_s batch x padded length, same window
  step_s              mean seconds per timed optimizer step
  peak_rss_mb         the worker process's RSS high-water mark (CPU; includes imports and the model)
  rss_before_train_mb RSS just before training started (so peak - this = what training added)
  peak_gpu_mem_mb     torch.cuda.max_memory_allocated during training (``--device cuda``)
  model_tflops_per_s  model FLOPs of the timed steps / timed seconds (coati and plain; coati.utils.flops:
                      every weight matmul on real tokens, the LM head on labelled positions, causal attention
                      within each sample, backward 2x forward)
  mfu                 model_tflops_per_s / the accelerator's dense bf16 peak (CUDA, or ``--peak_tflops``)
  first_loss          loss of the first step: both frameworks see the same batch and weights, so they agree
                      to ~1e-4 in fp32 (a check that they train on the same thing)

Plain loop
  A third worker, ``plain``, trains the same model on the same batches in a hand-written PyTorch loop
  (``harness.plain_loop``: the same AdamW, schedule and clipping as coati's trainer), running the LM head
  and cross-entropy only on the labelled positions' hidden states. ``ratio_coati_over_plain_loop`` compares
  coati with it: 1.0 means coati adds no overhead over the loop one would write by hand.

How to read the ratio
  ``ratio_coati_over_trl.tokens_per_s`` > 1 means coati is faster (1.10 = 10% more tokens per second);
  for ``peak_rss_mb`` / ``peak_gpu_mem_mb`` a ratio < 1 means coati uses less memory. On a shared CPU the
  noise between runs is a few percent: use ``--repeats 3`` (alternating runs, median kept) before reading
  small differences.

Example
  OMP_NUM_THREADS=1 python benchmarks/bench_sft.py --config small --batch_size 8 --seq_len 256 --steps 10
  (GPU, the 1B MFU check: benchmarks/gpu_check.sh)
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

DATA = harness.SHARED_DATA / "sft" / "alpaca_en_demo.json"


def prepare(args, workdir: Path) -> dict:
    """Tokenize with coati's SFTDataset once; both workers read the same ids and labels."""
    from coati.dataset import SFTDataset

    ds = SFTDataset(str(DATA), harness.llama_tokenizer(), max_len=args.seq_len, prompt_template="alpaca",
                    overlong="truncate")
    need = (args.warmup_steps + args.steps) * args.batch_size
    n = len(ds)
    rows = [{"input_ids": ds[i]["input_ids"].tolist(), "labels": ds[i]["labels"].tolist()} for i in range(n)]
    path = workdir / "sft_data.json"
    path.write_text(json.dumps(rows))
    lengths = [len(r["input_ids"]) for r in rows]
    return {"data_file": str(path), "data_source": str(DATA.relative_to(harness.SHARED_DATA.parent)),
            "data_samples": n, "data_mean_len": round(sum(lengths) / n, 1),
            "data_truncated": ds.num_truncated, "data_samples_used": need}


# ----- coati -----------------------------------------------------------------------------------------------

def worker_coati(job: dict) -> None:
    import torch

    from coati.dataset import PackingCollator, SFTCollator
    from coati.dataset.packing import batch_token_counts
    from coati.models import Actor, packing_attention
    from coati.trainer import SFTTrainer
    from coati.trainer.strategies import NaiveStrategy

    harness.setup_worker(job)
    device = job["device"]
    strategy = NaiveStrategy(seed=job["seed"], mixed_precision="bf16" if job["precision"] == "bf16" else None)
    actor = strategy.prepare_model(Actor.from_pretrained(job["model_dir"], **attn_kwargs(job)))
    rows = harness.load_rows(job)
    items = [{"input_ids": torch.tensor(r["input_ids"]), "labels": torch.tensor(r["labels"])} for r in rows]
    # sdpa: one row attended sample by sample; flex / flash attention: rows fill --seq_len
    collate = PackingCollator(0, job["seq_len"], packing_attention(actor)) if job["packing"] else SFTCollator(0)
    loader = strategy.setup_dataloader(items, job["batch_size"], shuffle=False, collate_fn=collate)
    total = job["warmup_steps"] + job["steps"]
    clock = harness.StepClock(device)
    step_tokens: list[int] = []
    step_padded: list[int] = []
    step_flops: list[float] = []

    class TimedSFTTrainer(SFTTrainer):
        def _train_step(self, micro_batches):
            counts = [batch_token_counts(b) for b in micro_batches]
            step_tokens.append(sum(real for real, _ in counts))
            step_padded.append(sum(slots for _, slots in counts))
            step_flops.append(sum(self.model_flops(b) for b in micro_batches))
            metrics = super()._train_step(micro_batches)
            clock.tick()
            return metrics

    trainer = TimedSFTTrainer(actor, strategy, loader, lr=job["lr"], max_steps=total, log_interval=1,
                              max_epochs=math.ceil(total / len(loader)) + 1,
                              optimizer=harness.coati_optimizer(job, actor.parameters(), job["lr"]))
    probe = harness.MemoryProbe(device)
    probe.start()
    history = trainer.fit()
    losses = [h["loss"] for h in history]
    harness.finish(job, clock, {"tokens": step_tokens, "padded_tokens": step_padded, "model_flops": step_flops},
                   losses, probe,
            {"optimizer": f"AdamW ({job['coati_optim']})", "device_used": str(strategy.device),
             "attn_implementation": actor.config._attn_implementation})


# ----- TRL -------------------------------------------------------------------------------------------------

def worker_trl(job: dict) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    harness.setup_worker(job)
    device = job["device"]
    rows = harness.load_rows(job)
    dataset = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]})
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    tok.pad_token = tok.unk_token
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], **attn_kwargs(job))
    total = job["warmup_steps"] + job["steps"]
    clock = harness.StepClock(device)
    step_tokens: list[int] = []
    step_padded: list[int] = []
    losses: list[float] = []

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, *a, **kw):
            # padding-free batches carry no mask: one row of real tokens only
            step_tokens.append(int(inputs["attention_mask"].sum()) if "attention_mask" in inputs
                               else int(inputs["input_ids"].numel()))
            step_padded.append(int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *a, **kw)

    config = SFTConfig(
        output_dir=str(Path(job["workdir"]) / "trl_out"), per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=1, max_steps=total, learning_rate=job["lr"], weight_decay=0.0,
        max_grad_norm=1.0, gradient_checkpointing=False, bf16=job["precision"] == "bf16", fp16=False,
        logging_steps=1, save_strategy="no", report_to="none",
        # padding-free leaves max_length to the inputs, already truncated to --seq_len by prepare()
        max_length=None if job["packing"] else job["seq_len"], padding_free=job["packing"],
        shuffle_dataset=False, train_sampling_strategy="sequential", seed=job["seed"],
        use_cpu=device == "cpu", dataloader_num_workers=0,
    )
    trainer = CountingSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                                 callbacks=[harness.trl_clock(clock, losses)])
    probe = harness.MemoryProbe(device)
    probe.start()
    trainer.train()
    harness.finish(job, clock, {"tokens": step_tokens, "padded_tokens": step_padded}, losses, probe,
            {"optimizer": f"AdamW ({config.optim})",
             "device_used": str(trainer.args.device),
             "attn_implementation": model.config._attn_implementation})


# ----- plain PyTorch loop ---------------------------------------------------------------------------------

def worker_plain(job: dict) -> None:
    """The same batches and optimizer settings in a hand-written loop; the LM head and cross-entropy run only
    on the labelled positions' hidden states."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from coati.dataset import SFTCollator
    from coati.utils.flops import DecoderShape

    harness.setup_worker(job)
    device = job["device"]
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], **attn_kwargs(job))
    shape = DecoderShape.of(model)
    items = [{"input_ids": torch.tensor(r["input_ids"]), "labels": torch.tensor(r["labels"])}
             for r in harness.load_rows(job)]
    loader = torch.utils.data.DataLoader(items, batch_size=job["batch_size"], shuffle=False,
                                         collate_fn=SFTCollator(0))
    clock = harness.StepClock(device)
    step_tokens: list[int] = []
    step_padded: list[int] = []
    step_flops: list[float] = []

    def count(batch):
        step_tokens.append(int(batch["attention_mask"].sum()))
        step_padded.append(int(batch["input_ids"].numel()))
        step_flops.append(shape.batch_flops(batch))

    def loss_fn(batch):
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        targets = batch["labels"][:, 1:]
        picked = targets.ne(-100)
        logits = model.lm_head(hidden[:, :-1][picked])
        return F.cross_entropy(logits.float(), targets[picked])

    harness.run_plain(job, model, loader, loss_fn, clock, count,
                      {"tokens": step_tokens, "padded_tokens": step_padded, "model_flops": step_flops},
                      {"attn_implementation": model.config._attn_implementation})


def attn_kwargs(job: dict) -> dict:
    """``from_pretrained`` keywords for ``--attn_implementation`` (none: transformers' default, sdpa)."""
    return {"attn_implementation": job["attn_implementation"]} if job["attn_implementation"] else {}


WORKERS = {"coati": worker_coati, "trl": worker_trl, "plain": worker_plain}


def main() -> None:
    parser = harness.common_parser(__doc__, steps=10, batch_size=8, seq_len=256, plain_loop=True)
    parser.add_argument("--packing", action="store_true",
                        help="no padding: coati packs each batch (coati.models.packing_attention), TRL runs "
                             "padding_free on the same batch")
    parser.add_argument("--attn_implementation", default=None,
                        choices=["sdpa", "eager", "flex_attention", "flash_attention_2"],
                        help="every framework loads the model with this attention (default: transformers')")
    args = parser.parse_args()
    if args._worker:
        job = json.loads(Path(args._job).read_text())
        WORKERS[args._worker](job)
        return
    harness.main(args, script=__file__, bench="sft", prepare=prepare,
                 key_metrics=["tokens_per_s", "tokens_per_cpu_s"],
                 ratio_keys=["tokens_per_s", "tokens_per_cpu_s", "padded_tokens_per_s", "peak_rss_mb",
                             "peak_gpu_mem_mb", "mfu"],
                 notes="tokens_per_s counts non-pad tokens; ratio > 1 = coati faster; memory ratio < 1 = "
                       "coati smaller. Same weights, token ids, labels, batch order, optimizer settings. "
                       "plain_loop: a hand-written PyTorch loop, LM head on labelled positions only.")


if __name__ == "__main__":
    main()
