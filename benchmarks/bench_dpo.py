"""DPO training throughput and peak memory: coati's DPOTrainer vs TRL's DPOTrainer.

What it measures
  A random-weight LLaMA (``--config`` preset, default "small": hidden 256, 4 layers, 32k vocab) is saved once;
  both frameworks load it as the policy and keep a frozen reference of it (coati: a copy made in memory; TRL:
  the same checkpoint loaded again). The preference demo set (``../shared/data/preference/dpo_en_demo.json``)
  is tokenized once by coati's ``PreferenceDataset`` (Alpaca template, each side truncated to ``--seq_len``,
  loss on the final response), and both train on exactly those prompt / chosen / rejected token ids, in file
  order, ``--batch_size`` pairs a step (TRL's own tokenization is bypassed; its ``max_length`` equals
  ``--seq_len`` so it truncates nothing more). Both run sigmoid DPO with the same ``--beta``, chosen and
  rejected in one concatenated forward, a reference forward without gradients, AdamW, grad-clip 1.0, fp32
  (or bf16 autocast in both), dropout off, no gradient checkpointing. Each framework runs in its own
  subprocess: ``--warmup_steps`` untimed optimizer steps, then ``--steps`` timed ones.

Figures, per framework
  pairs_per_s / pairs_per_cpu_s   preference pairs trained per wall second / per CPU second of the worker
  tokens_per_s                     non-padding tokens (chosen + rejected rows) per second
  peak_rss_mb                      worker RSS high-water (CPU); peak_gpu_mem_mb on ``--device cuda``
  first_loss                       first-step loss: log 2 = 0.6931 for both (policy = reference)

Packing (``--packing``)
  coati packs each batch's pairs into rows, each pair's prompt once (its rejected side reads the prompt the
  chosen side ran); TRL's DPOTrainer stays padded (its ``padding_free`` needs flash attention).

Plain loop
  A third worker, ``plain``, trains the same policy on the same padded pairs in a hand-written PyTorch loop
  (``harness.plain_loop``: coati's AdamW, schedule and clipping), with a frozen reference copy, chosen and
  rejected as one batch, the LM head only on the labelled positions; ``ratio_coati_over_plain_loop`` compares
  coati with it.

How to read the ratio
  ``ratio_coati_over_trl.pairs_per_cpu_s`` > 1 means coati trains more pairs per CPU second; a memory
  ratio < 1 means coati uses less. On a shared CPU read the per-CPU-second figures, with ``--repeats 3``.

Example
  OMP_NUM_THREADS=1 python benchmarks/bench_dpo.py --config small --batch_size 4 --seq_len 256 --steps 10 --repeats 3
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
    """Tokenize with coati's PreferenceDataset once; split each pair into shared prompt + two completions."""
    from coati.dataset import PreferenceDataset

    ds = PreferenceDataset(str(DATA), harness.llama_tokenizer(), max_len=args.seq_len, prompt_template="alpaca",
                           overlong="truncate")
    rows = []
    for i in range(len(ds)):
        item = ds[i]
        starts = [next(k for k, t in enumerate(item[f"{s}_labels"].tolist()) if t != -100) for s in ("chosen", "rejected")]
        c, r = item["chosen_input_ids"].tolist(), item["rejected_input_ids"].tolist()
        if starts[0] != starts[1] or c[:starts[0]] != r[:starts[0]]:
            continue  # TRL needs one prompt per pair
        p = starts[0]
        rows.append({"prompt": c[:p], "chosen": c[p:], "rejected": r[p:]})
    path = workdir / "dpo_data.json"
    path.write_text(json.dumps(rows))
    lengths = [len(x["prompt"]) + len(x[s]) for x in rows for s in ("chosen", "rejected")]
    return {"data_file": str(path), "data_source": str(DATA.relative_to(harness.SHARED_DATA.parent)),
            "data_pairs": len(rows), "data_mean_len": round(sum(lengths) / len(lengths), 1),
            "data_truncated": ds.num_truncated,
            "data_pairs_used": (args.warmup_steps + args.steps) * args.batch_size}


# ----- coati -----------------------------------------------------------------------------------------------

def worker_coati(job: dict) -> None:
    import torch

    from coati.dataset import PackingPreferenceCollator, PreferenceCollator
    from coati.models import Actor, packing_attention
    from coati.trainer import DPOTrainer, PreferenceConfig
    from coati.trainer.strategies import NaiveStrategy

    harness.setup_worker(job)
    device = job["device"]
    strategy = NaiveStrategy(seed=job["seed"], mixed_precision="bf16" if job["precision"] == "bf16" else None)
    model = strategy.prepare_model(Actor.from_pretrained(job["model_dir"]))
    items = []
    for r in harness.load_rows(job):
        item = {}
        for side in ("chosen", "rejected"):
            item[f"{side}_input_ids"] = torch.tensor(r["prompt"] + r[side])
            item[f"{side}_labels"] = torch.tensor([-100] * len(r["prompt"]) + r[side])
        items.append(item)
    collate = (PackingPreferenceCollator(0, job["seq_len"], packing_attention(model)) if job["packing"]
               else PreferenceCollator(0))
    loader = strategy.setup_dataloader(items, job["batch_size"], shuffle=False, collate_fn=collate)
    total = job["warmup_steps"] + job["steps"]
    clock = harness.StepClock(device)
    step_pairs: list[int] = []
    step_tokens: list[int] = []

    class TimedDPOTrainer(DPOTrainer):
        def _train_step(self, micro_batches):
            step_pairs.append(sum(int(self.count_units(b)) for b in micro_batches))
            # the pairs' own tokens (a shared prompt counted on both sides, as TRL's and the plain loop's are)
            step_tokens.append(sum(int(b["packed"].seq_lens.sum()) if "packed" in b else int(b["attention_mask"].sum())
                                   for b in micro_batches))
            metrics = super()._train_step(micro_batches)
            clock.tick()
            return metrics

    trainer = TimedDPOTrainer(model, strategy, loader, config=PreferenceConfig(beta=job["beta"]), lr=job["lr"],
                              max_steps=total, log_interval=1, max_epochs=math.ceil(total / len(loader)) + 1,
                              optimizer=harness.coati_optimizer(job, model.parameters(), job["lr"]))
    probe = harness.MemoryProbe(device)
    probe.start()
    history = trainer.fit()
    harness.finish(job, clock, {"pairs": step_pairs, "tokens": step_tokens}, [h["loss"] for h in history], probe,
            {"optimizer": f"AdamW ({job['coati_optim']})", "device_used": str(strategy.device),
             "reference": trainer.reference,
             "trainable_params_m": harness.trainable_params_m(model)})


# ----- TRL -------------------------------------------------------------------------------------------------

def worker_trl(job: dict) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    harness.setup_worker(job)
    device = job["device"]
    rows = harness.load_rows(job)
    dataset = Dataset.from_dict({"prompt_ids": [r["prompt"] for r in rows], "chosen_ids": [r["chosen"] for r in rows],
                                 "rejected_ids": [r["rejected"] for r in rows]})
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    tok.pad_token = tok.unk_token
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"])
    total = job["warmup_steps"] + job["steps"]
    clock = harness.StepClock(device)
    step_pairs: list[int] = []
    step_tokens: list[int] = []
    losses: list[float] = []

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # the same token ids coati trains on

        def training_step(self, model, inputs, *a, **kw):
            step_pairs.append(int(inputs["input_ids"].shape[0]) // 2)
            step_tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *a, **kw)

    config = DPOConfig(
        output_dir=str(Path(job["workdir"]) / "trl_out"), per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=1, max_steps=total, learning_rate=job["lr"], weight_decay=0.0,
        max_grad_norm=1.0, gradient_checkpointing=False, bf16=job["precision"] == "bf16", fp16=False,
        logging_steps=1, save_strategy="no", report_to="none", max_length=job["seq_len"], beta=job["beta"],
        loss_type=["sigmoid"], train_sampling_strategy="sequential", seed=job["seed"], use_cpu=device == "cpu",
        dataloader_num_workers=0,
    )
    trainer = PreTokenizedDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                                     callbacks=[harness.trl_clock(clock, losses)])
    probe = harness.MemoryProbe(device)
    probe.start()
    trainer.train()
    harness.finish(job, clock, {"pairs": step_pairs, "tokens": step_tokens}, losses, probe,
            {"optimizer": f"AdamW ({config.optim})", "device_used": str(trainer.args.device),
             "trainable_params_m": harness.trainable_params_m(model)})


# ----- plain PyTorch loop ---------------------------------------------------------------------------------

def worker_plain(job: dict) -> None:
    """The same pairs and settings in a hand-written loop: policy and frozen reference on chosen + rejected as
    one padded batch, the LM head only on the labelled positions, sigmoid DPO."""
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from coati.dataset import PreferenceCollator

    harness.setup_worker(job)
    device = job["device"]
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"])
    reference = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    items = [{f"{side}_{k}": torch.tensor(([-100] * len(r["prompt"]) if k == "labels" else r["prompt"]) + r[side])
              for side in ("chosen", "rejected") for k in ("input_ids", "labels")} for r in harness.load_rows(job)]
    loader = torch.utils.data.DataLoader(items, batch_size=job["batch_size"], shuffle=False,
                                         collate_fn=PreferenceCollator(0))
    clock = harness.StepClock(device)
    step_pairs: list[int] = []
    step_tokens: list[int] = []

    def count(batch):
        step_pairs.append(int(batch["input_ids"].shape[0]) // 2)
        step_tokens.append(int(batch["attention_mask"].sum()))

    def logps(lm, batch):
        hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        targets = batch["labels"][:, 1:]
        picked = targets.ne(-100)
        token = torch.log_softmax(lm.lm_head(hidden[:, :-1][picked]).float(), -1)
        token = token.gather(-1, targets[picked][:, None]).squeeze(-1)
        rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[picked]
        return torch.zeros(targets.shape[0], device=targets.device).index_add(0, rows, token)

    def loss_fn(batch):
        with torch.no_grad():
            ref = logps(reference, batch)
        ratio = logps(model, batch) - ref
        n = ratio.shape[0] // 2
        return -F.logsigmoid(job["beta"] * (ratio[:n] - ratio[n:])).mean()

    harness.run_plain(job, model, loader, loss_fn, clock, count, {"pairs": step_pairs, "tokens": step_tokens},
                      {"trainable_params_m": harness.trainable_params_m(model)})


WORKERS = {"coati": worker_coati, "trl": worker_trl, "plain": worker_plain}


def main() -> None:
    parser = harness.common_parser(__doc__, steps=10, batch_size=4, seq_len=256, plain_loop=True)
    parser.add_argument("--beta", type=harness.Bounded(float, "> 0"), default=0.1, help="DPO beta in all workers")
    parser.add_argument("--packing", action="store_true",
                        help="coati packs each batch's pairs into rows, each pair's shared prompt once (TRL's "
                             "DPOTrainer and the plain loop stay padded)")
    args = parser.parse_args()
    if args._worker:
        job = json.loads(Path(args._job).read_text())
        WORKERS[args._worker](job)
        return
    harness.main(args, script=__file__, bench="dpo", prepare=prepare,
                 key_metrics=["pairs_per_s", "pairs_per_cpu_s", "peak_rss_mb"],
                 ratio_keys=["pairs_per_s", "pairs_per_cpu_s", "tokens_per_s", "peak_rss_mb",
                             "peak_gpu_mem_mb"],
                 notes="pairs_per_cpu_s = preference pairs per CPU second; ratio > 1 = coati faster; memory ratio "
                       "< 1 = coati smaller. Same weights, token ids, batch order, beta; both hold a frozen "
                       "reference. plain_loop: a hand-written PyTorch loop, the LM head on labelled positions only.",
                 report_args=("beta", "packing"))


if __name__ == "__main__":
    main()
