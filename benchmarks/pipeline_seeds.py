"""The main job's guarantee, measured: after PPO / GRPO / DPO no column of the table is worse than after SFT, on
the default seed and others.

Runs ``python -m coati.pipeline --algo A --seed S`` for every pair (one process each, one after another), reads
each run's ``summary.json`` and prints one JSON line: per run the SFT and final values of the table's columns
(sampled and greedy accuracy on the held-out questions; for PPO also the reward model's score), the stage
times, and ``holds`` (every column at least its SFT value). Example::

    python benchmarks/pipeline_seeds.py --algos ppo grpo dpo --seeds 42 1 7 --out /tmp/seeds
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout
from coati.utils.config import Bounded  # noqa: E402

# (column, key after SFT, key after the RL / preference stage); a key with "{algo}" names the stage
COLUMNS = (("acc(sampled)", "sft_accuracy", "{algo}_accuracy"),
           ("acc(greedy)", "sft_accuracy_greedy", "{algo}_accuracy_greedy"),
           ("reward", "sft_reward", "ppo_reward_end"))


def compare(summary: dict[str, Any]) -> dict[str, Any]:
    """The table's columns after SFT and after the run's last stage, and whether none got worse."""
    algo = summary["algo"]
    cols = {}
    for name, before, after in COLUMNS:
        b, a = summary.get(before), summary.get(after.format(algo=algo))
        if b is not None and a is not None:
            cols[name] = {"sft": b, algo: a, "holds": a >= b}
    return {"columns": cols, "holds": all(c["holds"] for c in cols.values()),
            "stage_s": {k: round(v, 1) for k, v in summary["timings_s"].items()},
            **({"rm_steps_trained": summary["rm_steps_trained"]} if "rm_steps_trained" in summary else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", default=["ppo", "grpo", "dpo"], help="pipeline --algo values to run")
    p.add_argument("--seeds", nargs="+", type=Bounded(int, ">= 0"), default=[42, 1, 7], help="seeds to run")
    p.add_argument("--out", default="pipeline_seeds", help="parent dir of the runs' output dirs")
    args = p.parse_args()
    runs = {}
    for algo in args.algos:
        for seed in args.seeds:
            out = Path(args.out) / f"{algo}_seed{seed}"
            cmd = [sys.executable, "-m", "coati.pipeline", "--algo", algo, "--seed", str(seed), "--output_dir",
                   str(out)]
            subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
            runs[f"{algo}/seed{seed}"] = compare(json.loads((out / "summary.json").read_text()))
            print(f"{algo} seed {seed}: holds={runs[f'{algo}/seed{seed}']['holds']}", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "pipeline_seeds", "holds": all(r["holds"] for r in runs.values()),
                      "runs": runs}))


if __name__ == "__main__":
    main()
