"""Reward-model training throughput and peak memory: coati's RewardModelTrainer vs TRL's RewardTrainer.

What it measures
  A random-weight LLaMA (``--config`` preset, default "small": hidden 256, 4 layers, 32k vocab) is saved
  once. coati loads it as ``RewardModel`` (transformer body + fp32 ``Linear(hidden, 1)`` value head, reward
  at the last non-pad token); TRL loads it as ``AutoModelForSequenceClassification(num_labels=1)`` (body +
  ``score`` head, reward at the last non-pad token): the same transformer arithmetic, heads of the same size.
  The preference demo set (``../shared/data/preference/dpo_en_demo.json``, ShareGPT-style pairs) is
  tokenized once by coati's ``RewardDataset`` (Alpaca template, each side truncated to ``--seq_len``), and
  both frameworks train on exactly those chosen/rejected token ids, in file order, ``--batch_size`` pairs a
  step. Both run chosen and rejected as one concatenated forward of 2 x batch rows, right-padded to the
  longest row, with the pairwise loss -log sigmoid(r_chosen - r_rejected), AdamW, grad-clip 1.0, fp32 (or
  bf16 autocast in both), no gradient checkpointing (TRL's default checkpointing and bf16 are switched off).
  Each framework runs in its own subprocess: ``--warmup_steps`` untimed optimizer steps, then ``--steps``
  timed ones, from the end of the last warmup step to the end of the last timed step.

Figures, per framework
  pairs_per_s         preference pairs trained per second in the timed window
  tokens_per_s        non-padding tokens (chosen + rejected) per second
  step_s              mean seconds per timed optimizer step
  peak_rss_mb         worker process RSS high-water (CPU); rss_before_train_mb: RSS when training started
  peak_gpu_mem_mb     torch.cuda.max_memory_allocated during training (``--device cuda``)
  first_loss          first-step loss (~0.69 for both: the heads are random and differ, so not equal)

Packing (``--packing``)
  coati packs each batch's pairs into one row, each pair's prompt once (segment attention: the rejected side
  reads the prompt the chosen side ran, each side attending by itself); TRL's RewardTrainer and the plain
  loop stay padded.

Plain loop
  A third worker, ``plain``, trains the same body on the same pairs in a hand-written PyTorch loop
  (``harness.plain_loop``: coati's AdamW, schedule and clipping), the value head only on each row's last
  non-pad token; ``ratio_coati_over_plain_loop`` compares coati with it (1.0 = no overhead over it).

How to read the ratio
  ``ratio_coati_over_trl.pairs_per_s`` > 1 means coati trains more pairs per second (1.10 = 10% faster);
  a memory ratio < 1 means coati uses less. Use ``--repeats 3`` on a shared CPU before reading differences
  of a few percent.

Example
  OMP_NUM_THREADS=1 python benchmarks/bench_rm.py --config small --batch_size 4 --seq_len 256 --steps 10
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

DATA = harness.SHARED_DATA / "preference" / "dpo_en_demo.json"


def prepare(args, workdir: Path) -> dict:
    """Tokenize with coati's RewardDataset once; both workers read the same pairs."""
    from coati.dataset import RewardDataset

    ds = RewardDataset(str(DATA), harness.llama_tokenizer(), max_len=args.seq_len, prompt_template="alpaca",
                       overlong="truncate")
    rows = [{"chosen": ds[i]["chosen_input_ids"].tolist(), "rejected": ds[i]["rejected_input_ids"].tolist()}
            for i in range(len(ds))]
    path = workdir / "rm_data.json"
    path.write_text(json.dumps(rows))
    lengths = [len(r["chosen"]) for r in rows] + [len(r["rejected"]) for r in rows]
    return {"data_file": str(path), "data_source": str(DATA.relative_to(harness.SHARED_DATA.parent)),
            "data_pairs": len(rows), "data_mean_len": round(sum(lengths) / len(lengths), 1),
            "data_truncated": ds.num_truncated,
            "data_pairs_used": (args.warmup_steps + args.steps) * args.batch_size}


# ----- coati -----------------------------------------------------------------------------------------------

def worker_coati(job: dict) -> None:
    import torch

    from coati.dataset import PackingRewardCollator, RewardCollator
    from coati.dataset.packing import batch_token_counts
    from coati.models import RewardModel, packing_attention
    from coati.trainer import RewardModelTrainer
    from coati.trainer.strategies import NaiveStrategy

    harness.setup_worker(job)
    device = job["device"]
    strategy = NaiveStrategy(seed=job["seed"], mixed_precision="bf16" if job["precision"] == "bf16" else None)
    model = strategy.prepare_model(RewardModel.from_pretrained(job["model_dir"]))
    items = [{"chosen_input_ids": torch.tensor(r["chosen"]), "rejected_input_ids": torch.tensor(r["rejected"])}
             for r in harness.load_rows(job)]
    collate = (PackingRewardCollator(0, job["seq_len"], packing_attention(model)) if job["packing"]
               else RewardCollator(0))
    loader = strategy.setup_dataloader(items, job["batch_size"], shuffle=False, collate_fn=collate)
    total = job["warmup_steps"] + job["steps"]
    clock = harness.StepClock(device)
    step_pairs: list[int] = []
    step_tokens: list[int] = []

    class TimedRMTrainer(RewardModelTrainer):
        def _train_step(self, micro_batches):
            step_pairs.append(sum(int(self.count_units(b)) for b in micro_batches))
            # the pairs' own tokens (a shared prompt counted on both sides, as TRL's and the plain loop's are)
            step_tokens.append(sum(int(b["packed"].seq_lens.sum()) if "packed" in b else batch_token_counts(b)[0]
                                   for b in micro_batches))
            metrics = super()._train_step(micro_batches)
            clock.tick()
            return metrics

    trainer = TimedRMTrainer(model, strategy, loader, lr=job["lr"], max_steps=total, log_interval=1,
                             max_epochs=math.ceil(total / len(loader)) + 1,
                             optimizer=harness.coati_optimizer(job, model.parameters(), job["lr"]))
    probe = harness.MemoryProbe(device)
    probe.start()
    history = trainer.fit()
    harness.finish(job, clock, {"pairs": step_pairs, "tokens": step_tokens}, [h["loss"] for h in history], probe,
            {"optimizer": f"AdamW ({job['coati_optim']})", "device_used": str(strategy.device),
             "trainable_params_m": harness.trainable_params_m(model)})


# ----- TRL -------------------------------------------------------------------------------------------------

def worker_trl(job: dict) -> None:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    harness.setup_worker(job)
    device = job["device"]
    rows = harness.load_rows(job)
    dataset = Dataset.from_dict({"chosen_ids": [r["chosen"] for r in rows],
                                 "rejected_ids": [r["rejected"] for r in rows]})
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    tok.pad_token = tok.unk_token
    model = AutoModelForSequenceClassification.from_pretrained(job["model_dir"], num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    total = job["warmup_steps"] + job["steps"]
    clock = harness.StepClock(device)
    step_pairs: list[int] = []
    step_tokens: list[int] = []
    losses: list[float] = []

    class CountingRewardTrainer(RewardTrainer):
        def training_step(self, model, inputs, *a, **kw):
            step_pairs.append(int(inputs["input_ids"].shape[0]) // 2)
            step_tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *a, **kw)

    config = RewardConfig(
        output_dir=str(Path(job["workdir"]) / "trl_out"), per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=1, max_steps=total, learning_rate=job["lr"], weight_decay=0.0,
        max_grad_norm=1.0, gradient_checkpointing=False, bf16=job["precision"] == "bf16", fp16=False,
        logging_steps=1, save_strategy="no", report_to="none", max_length=job["seq_len"],
        train_sampling_strategy="sequential", seed=job["seed"], use_cpu=device == "cpu",
        dataloader_num_workers=0,
    )
    trainer = CountingRewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                                    callbacks=[harness.trl_clock(clock, losses)])
    probe = harness.MemoryProbe(device)
    probe.start()
    trainer.train()
    harness.finish(job, clock, {"pairs": step_pairs, "tokens": step_tokens}, losses, probe,
            {"optimizer": f"AdamW ({config.optim})", "device_used": str(trainer.args.device),
             "trainable_params_m": harness.trainable_params_m(model)})


# ----- plain PyTorch loop ---------------------------------------------------------------------------------

def worker_plain(job: dict) -> None:
    """The same pairs and optimizer settings in a hand-written loop: the transformer body on chosen + rejected
    as one batch, the value head only on each row's last token."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from transformers import AutoModel

    from coati.dataset import RewardCollator

    harness.setup_worker(job)
    device = job["device"]
    body = AutoModel.from_pretrained(job["model_dir"])
    hidden = body.config.hidden_size
    model = nn.ModuleDict({"body": body, "head": nn.Linear(hidden, 1)})
    nn.init.normal_(model["head"].weight, std=1.0 / math.sqrt(hidden + 1))
    nn.init.zeros_(model["head"].bias)
    items = [{"chosen_input_ids": torch.tensor(r["chosen"]), "rejected_input_ids": torch.tensor(r["rejected"])}
             for r in harness.load_rows(job)]
    loader = torch.utils.data.DataLoader(items, batch_size=job["batch_size"], shuffle=False,
                                         collate_fn=RewardCollator(0))
    clock = harness.StepClock(device)
    step_pairs: list[int] = []
    step_tokens: list[int] = []

    def count(batch):
        step_pairs.append(int(batch["chosen_input_ids"].shape[0]))
        step_tokens.append(int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()))

    def loss_fn(batch):
        length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        ids = torch.cat([F.pad(batch[f"{s}_input_ids"], (0, length - batch[f"{s}_input_ids"].shape[1]))
                         for s in ("chosen", "rejected")])
        mask = torch.cat([F.pad(batch[f"{s}_attention_mask"], (0, length - batch[f"{s}_attention_mask"].shape[1]))
                          for s in ("chosen", "rejected")])
        states = model["body"](input_ids=ids, attention_mask=mask).last_hidden_state
        last = states[torch.arange(ids.shape[0], device=ids.device), mask.sum(1) - 1]  # right padding
        reward = model["head"](last.float()).squeeze(-1)
        n = batch["chosen_input_ids"].shape[0]
        return -F.logsigmoid(reward[:n] - reward[n:]).mean()

    harness.run_plain(job, model, loader, loss_fn, clock, count, {"pairs": step_pairs, "tokens": step_tokens},
                      {"trainable_params_m": harness.trainable_params_m(model)})


WORKERS = {"coati": worker_coati, "trl": worker_trl, "plain": worker_plain}


def main() -> None:
    parser = harness.common_parser(__doc__, steps=10, batch_size=4, seq_len=256, plain_loop=True)
    parser.add_argument("--packing", action="store_true",
                        help="coati packs each batch's pairs without padding (coati.models.packing_attention), "
                             "each pair's shared prompt once (TRL's RewardTrainer has no padding-free mode and "
                             "stays padded)")
    args = parser.parse_args()
    if args._worker:
        job = json.loads(Path(args._job).read_text())
        WORKERS[args._worker](job)
        return
    harness.main(args, script=__file__, bench="rm", prepare=prepare,
                 key_metrics=["pairs_per_s", "pairs_per_cpu_s"],
                 ratio_keys=["pairs_per_s", "pairs_per_cpu_s", "tokens_per_s", "peak_rss_mb",
                             "peak_gpu_mem_mb"],
                 notes="pairs_per_s = preference pairs per second; ratio > 1 = coati faster; memory ratio < 1 "
                       "= coati smaller. Same weights (heads differ: both random), token ids, batch order. "
                       "plain_loop: a hand-written PyTorch loop, value head on each row's last token only.")


if __name__ == "__main__":
    main()
