"""Every stage under ``kill -9``: a run checkpointing at every step (episode) is killed while it writes the
checkpoint after a seeded random one, then ``--resume`` finishes it; the final weights, metrics.jsonl and (RL) rollouts.jsonl must equal those of the
same run left alone. What an in-process resume cannot show: state that lives only in files the killed process was
writing (the metrics log and rollout dump run ahead of the last checkpoint), a checkpoint cut short mid-save
(``step_N.tmp``), and ``--resume`` picking the newest checkpoint by itself."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
DROPOUT = dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
# metrics that measure the machine, not the run
_CLOCK = ("perf/", "timing_s/")

WORDS = "apple river stone cloud maple orbit velvet harbor candle meadow piano lantern".split()
REWARD = '''
def parity(prompts, responses, **kw):
    """1 for a response of odd length in characters: about half the samples, so some groups of 2 tie."""
    return [float(len(r) % 2) for r in responses]
'''


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny GPT-2 with dropout 0.1 (a resume must restore the RNG to draw the same masks), SFT records,
    preference pairs, prompts and a reward function."""
    d = tmp_path_factory.mktemp("kill_inputs")
    tiny.save_tiny_model("gpt2", d / "model", **DROPOUT)
    sft = [{"instruction": f"Name the {WORDS[i % 12]} number {i}.", "input": "",
            "output": f"{WORDS[i * 5 % 12]} {WORDS[i * 7 % 12]} is {i}."} for i in range(16)]
    (d / "sft.json").write_text(json.dumps(sft))
    pairs = [{"chosen": f"\n\nHuman: Say {WORDS[i % 12]}.\n\nAssistant: {WORDS[i % 12]} {i}.",
              "rejected": f"\n\nHuman: Say {WORDS[i % 12]}.\n\nAssistant: {WORDS[(i + 3) % 12]} no."}
             for i in range(16)]
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    prompts = [{"prompt": f"Tell me about the {WORDS[i % 12]} number {i}."} for i in range(12)]
    (d / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (d / "reward.py").write_text(REWARD)
    return d


_SUPERVISED = ["--max_len", "64", "--lr", "1e-3", "--warmup_ratio", "0", "--seed", "3", "--log_interval", "1"]
_RL = ["--prompt_template", "none", "--max_input_len", "32", "--max_new_tokens", "6", "--lr", "1e-3",
       "--critic_lr", "1e-3", "--seed", "3", "--num_episodes", "5", "--num_collect_steps", "1",
       "--num_update_steps", "1", "--train_batch_size", "2", "--rollout_log_interval", "1", "--log_interval", "1"]

# name: (script, arguments given the inputs dir, processes). Supervised runs take 2 epochs with an eval at each
# epoch's end (written after that step's checkpoint); RL runs take 5 episodes of fresh samples.
CASES = {
    "sft": ("train_sft.py", lambda d: [*_SUPERVISED, "--dataset", d / "sft.json", "--eval_ratio", "0.25",
                                       "--batch_size", "2", "--accumulation_steps", "2", "--max_epochs", "2"], 1),
    "rm": ("train_reward_model.py", lambda d: [*_SUPERVISED, "--dataset", d / "pairs.jsonl", "--eval_ratio", "0.25",
                                               "--batch_size", "2", "--accumulation_steps", "1", "--max_epochs", "2"],
           1),
    "dpo_precomputed_ref": ("train_dpo.py", lambda d: [
        *_SUPERVISED, "--dataset", d / "pairs.jsonl", "--eval_ratio", "0.25", "--precompute_ref_logps",
        "--batch_size", "2", "--accumulation_steps", "1", "--max_epochs", "2"], 1),
    "sft_lora": ("train_sft.py", lambda d: [*_SUPERVISED, "--dataset", d / "sft.json", "--eval_ratio", "0.25",
                                            "--lora_rank", "4", "--lora_dropout", "0.1", "--batch_size", "2",
                                            "--accumulation_steps", "1", "--max_epochs", "2"], 1),
    "ppo_adaptive_kl": ("train_prompts.py", lambda d: [
        *_RL, "--prompt_dataset", d / "prompts.jsonl", "--reward_fn", f"{d / 'reward.py'}:parity", "--algo", "ppo",
        "--kl_coef", "0.05", "--target_kl", "0.01", "--kl_horizon", "20", "--experience_batch_size", "2"], 1),
    "grpo_groups": ("train_prompts.py", lambda d: [
        *_RL, "--prompt_dataset", d / "prompts.jsonl", "--reward_fn", f"{d / 'reward.py'}:parity", "--algo", "grpo",
        "--n_samples_per_prompt", "4", "--experience_batch_size", "2", "--train_batch_size", "4"], 1),
    "dapo_dynamic_sampling": ("train_prompts.py", lambda d: [
        *_RL, "--prompt_dataset", d / "prompts.jsonl", "--reward_fn", f"{d / 'reward.py'}:parity", "--algo", "dapo",
        "--n_samples_per_prompt", "2", "--experience_batch_size", "2", "--max_sampling_rounds", "3"], 1),
    "ddp_grpo": ("train_prompts.py", lambda d: [
        *_RL, "--prompt_dataset", d / "prompts.jsonl", "--reward_fn", f"{d / 'reward.py'}:parity", "--algo", "grpo",
        "--n_samples_per_prompt", "2", "--experience_batch_size", "1", "--strategy", "ddp"], 2),
}

# what each case is there for, seen in the uninterrupted run: otherwise a passing case may cover nothing
_FEATURE = {
    "ppo_adaptive_kl": lambda rows, rollouts: len({r["actor/reward_kl_penalty_coeff"] for r in rows}) == len(rows),
    "grpo_groups": lambda rows, rollouts: _group_sizes(rollouts) == {4},
    # groups whose samples tie are dropped and topped up from more prompt batches than one per episode
    "dapo_dynamic_sampling": lambda rows, rollouts: any(r["sampling/generation_rounds"] > 1 for r in rows),
    "ddp_grpo": lambda rows, rollouts: _group_sizes(rollouts) == {2} and all(
        sum(r["step"] == s for r in rollouts) == 4 for s in range(1, len(rows) + 1)),  # both processes' samples
}


def _group_sizes(rollouts: list[dict]) -> set[int]:
    sizes: dict[tuple[int, int], int] = {}
    for r in rollouts:
        sizes[r["step"], r["group"]] = sizes.get((r["step"], r["group"]), 0) + 1
    return set(sizes.values())


def _command(case: str, inputs: Path, save_path: Path, *extra: str) -> list[str]:
    script, args, procs = CASES[case]
    launch = [sys.executable, str(ROOT / "examples" / script)]
    if procs > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                  str(ROOT / "examples" / script)]
    return [*launch, "--pretrain", str(inputs / "model"), *map(str, args(inputs)), "--save_interval", "1",
            "--save_path", str(save_path), *extra]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _run(cmd: list[str], log: Path) -> None:
    proc = _start(cmd, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]


def _steps(save_path: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (save_path / "checkpoints").glob("step_*")
                  if p.name.split("_")[1].isdigit())


def _job(pid: int) -> list[int]:
    """``pid`` and its descendants: torchrun starts each worker in a session of its own, so killing torchrun's
    process group would leave them running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    job, todo = [], [pid]
    while todo:
        job.append(todo.pop())
        todo += children.get(job[-1], [])
    return job


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_mid_save(cmd: list[str], save_path: Path, log: Path, at: int) -> None:
    """Start the run and SIGKILL every process of it once it starts writing the checkpoint after ``at``: by then
    the metrics log and (RL) the rollout dump hold that step, the checkpoints do not. A kill anywhere else in a
    step leaves a prefix of what is on disk here: less to set right."""
    proc = _start(cmd, log)
    target = save_path / "checkpoints" / f"step_{at + 1}.tmp"
    deadline = time.monotonic() + 600
    while not target.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    job = _job(proc.pid)  # the whole job at once, as when its machine or an OOM killer takes it
    for pid in job:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    while any(_alive(pid) for pid in job[1:]):  # workers are torchrun's children, reaped by init
        time.sleep(0.01)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill\n{log.read_text()[-4000:]}"


def _weights(save_path: Path) -> dict[str, torch.Tensor]:
    """Every final weight file under the run's dir (actor and, for PPO, critic), checkpoints aside."""
    files = sorted(p for p in save_path.rglob("*.safetensors") if "checkpoints" not in p.relative_to(save_path).parts)
    return {f"{f.relative_to(save_path)}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def _metrics(save_path: Path) -> list[dict]:
    rows = [json.loads(line) for line in (save_path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(_CLOCK)} for r in rows]


def _rollouts(save_path: Path) -> list[dict]:
    path = save_path / "rollouts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.dist) if CASES[c][2] > 1 else c for c in CASES])
def test_kill_9_then_resume_gives_the_uninterrupted_run(case, inputs, tmp_path):
    """Killed while saving the checkpoint after a random one, ``--resume`` ends with the
    uninterrupted run's weights bit for bit, its metrics.jsonl (one record per step and eval, none twice, none
    missing) and, for RL, its rollouts.jsonl."""
    if not Path("/proc/self/stat").is_file():
        pytest.skip("finds a job's processes in /proc")
    ref, run = tmp_path / "reference", tmp_path / "killed"
    _run(_command(case, inputs, ref), tmp_path / "reference.log")
    total = _steps(ref)[-1]
    assert _steps(ref) == list(range(1, total + 1)) and total >= 4

    if case in _FEATURE:
        assert _FEATURE[case]([r for r in _metrics(ref) if r["split"] == "ppo"], _rollouts(ref))

    at = random.Random(f"{case}-kill").randint(1, total - 1)  # seeded: a failure reproduces
    _kill_mid_save(_command(case, inputs, run), run, tmp_path / "killed.log", at)
    assert not (run / "model.safetensors").exists()  # killed before the final model
    assert _steps(run)[-1] == at and (run / "checkpoints" / f"step_{at + 1}.tmp").is_dir()  # and mid-save

    newest = run / "checkpoints" / f"step_{_steps(run)[-1]}"
    _run(_command(case, inputs, run, "--resume"), tmp_path / "resumed.log")
    assert f"resumed from {newest} at " in (tmp_path / "resumed.log").read_text()  # not a fresh run
    want, got = _weights(ref), _weights(run)
    assert want and got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} of {len(want)} tensors differ, e.g. {different[:3]}"

    ref_metrics, metrics = _metrics(ref), _metrics(run)
    assert [r["step"] for r in ref_metrics if r["split"] in ("train", "ppo")] == list(range(1, total + 1))
    assert [(r["split"], r["step"]) for r in metrics] == [(r["split"], r["step"]) for r in ref_metrics]
    assert metrics == ref_metrics

    if CASES[case][0] == "train_prompts.py":
        want_rollouts = _rollouts(ref)
        assert sorted({r["step"] for r in want_rollouts}) == list(range(1, total + 1))
        assert _rollouts(run) == want_rollouts
