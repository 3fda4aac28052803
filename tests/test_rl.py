"""Stage 3 as data: PPO unchanged by the redesign, --algo presets, critic-free GRPO / RLOO / REINFORCE++ learn the
tiny task, critic-free checkpoints resume exactly, DAPO's dynamic sampling, the script with the GSM8K reward."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coati import rl
from coati.errors import UsageError
from coati.models import Critic
from coati.trainer.ppo import PPOTrainer
from coati.trainer.strategies import NaiveStrategy
from tests import dist_ppo as h
from tests import tiny
from tests.scripts import load_script, torchrun

ROOT = Path(__file__).resolve().parents[1]
NO_KL_KW = {k: v for k, v in h.PPO_KW.items() if k != "kl_coef"}  # the preset's KL


def _mean(xs):
    return sum(xs) / len(xs)




# Per optimizer step (actor/pg_loss, actor/ppo_kl) and critic/vf_loss, and per episode critic/score/mean and
# actor/reward_kl_penalty, of the run below, recorded on the code before the algorithm seam (commit 3e3d179:
# PolicyLoss, compute_gae and masked_whiten called by hand in the trainer and the experience maker).
OLD_ACTOR = [[0.022865802, 0.0], [-0.010124713, 0.005409874], [-0.152347922, 0.024921418],
             [-0.111476471, 0.031290094], [-0.018308111, 0.0], [0.037617117, 0.000991948],
             [-0.171637505, 0.007259052], [0.025171891, 0.009573238], [-0.234380238, 0.0],
             [0.122826692, 0.000363663], [0.054059479, 0.003681257], [-0.325381681, 0.028642265]]
OLD_CRITIC = [0.267905101, 0.732829809, 0.33347407, 0.195752479, 0.037023177, 0.21583873, 0.209356479, 0.065408412,
              0.054028273, 0.07609161, 0.028656301, 0.008765271]
OLD_SCORE = [0.015625, 0.041294642, 0.0234375]
OLD_KL = [0.0, 0.019991439, -0.001686817]


def test_ppo_loss_curve_is_the_one_before_the_redesign():
    """--algo ppo (the default), and the same pieces named explicitly, give the same per-step losses and
    per-episode metrics, and those of the old code (adaptive KL, gradient accumulation, GAE with whitening) to
    1e-5: the recording's CPU summed in another order (3e-6 apart after 12 steps on an AVX512 one)."""
    runs = []
    for explicit in (False, True):
        strategy = NaiveStrategy(seed=0)
        actor, critic = h.models(seed=0)
        prompts, _ = h.loaders(strategy)
        pieces = dict(algo="grpo", adv_estimator="gae", policy_loss="ppo", loss_agg_mode="seq_mean_token_mean",
                      kl_placement="reward", kl_estimator="k1", eps_clip=0.2) if explicit else {}
        trainer = PPOTrainer(strategy, actor, critic, tokenizer=tiny.tokenizer("llama"), reward_fn=h.target_share,
                             **{**h.PPO_KW, "num_episodes": 3, "target_kl": 0.5, "kl_horizon": 100,
                                "train_batch_size": 4, "accumulation_steps": 2, **pieces})
        steps = h.record_steps(trainer)
        hist = trainer.fit(prompts)
        runs.append(([[s["actor/pg_loss"], s["actor/ppo_kl"]] for s in steps[0::2]],
                     [s["critic/vf_loss"] for s in steps[1::2]],
                     [x["critic/score/mean"] for x in hist], [x["actor/reward_kl_penalty"] for x in hist]))
    assert runs[0] == runs[1]
    got_actor, got_critic, score, kl = runs[0]
    torch.testing.assert_close(torch.tensor(got_actor), torch.tensor(OLD_ACTOR), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(got_critic), torch.tensor(OLD_CRITIC), atol=1e-5, rtol=0)
    assert score == pytest.approx(OLD_SCORE, abs=1e-5)
    assert kl == pytest.approx(OLD_KL, abs=1e-5)


# ----- presets -------------------------------------------------------------------------------------------
def test_presets_fill_unset_fields_and_explicit_flags_win():
    mod = load_script("examples/train_prompts.py")
    base = ["--pretrain", "x", "--prompt_dataset", "p", "--max_new_tokens", "100"]
    for name, preset in rl.PRESETS.items():
        cfg = mod.rl_config(mod.build_parser().parse_args(base + ["--algo", name, "--n_samples_per_prompt", "4"]))
        want = {**preset, "overlong_buffer_len": 20 if name == "dapo" else 0}  # DAPO's: a fifth of the budget
        assert {k: getattr(cfg, k) for k in preset} == want
        assert cfg.needs_critic == (name == "ppo")
        assert cfg.num_update_steps == (5 if name == "ppo" else 1)
    grpo = mod.rl_config(mod.build_parser().parse_args(base + ["--algo", "grpo", "--n_samples_per_prompt", "4"]))
    assert (grpo.kl_placement, grpo.kl_estimator, grpo.kl_coef, grpo.loss_agg_mode) == (
        "loss", "k3", 0.04, "seq_mean_token_mean")
    args = mod.build_parser().parse_args(base + ["--algo", "dapo", "--n_samples_per_prompt", "2", "--eps_clip_high",
                                                 "0.3", "--kl_coef", "0.01", "--no-dynamic_sampling",
                                                 "--loss_agg_mode", "seq_mean_token_sum_norm"])
    dapo = mod.rl_config(args)
    assert (dapo.eps_clip_high, dapo.kl_coef, dapo.dynamic_sampling, dapo.loss_agg_mode) == (
        0.3, 0.01, False, "seq_mean_token_sum_norm")
    assert (dapo.eps_clip, dapo.adv_estimator, dapo.overlong_buffer_len) == (0.2, "grpo", 20)  # the rest: DAPO
    assert mod.rl_config(mod.build_parser().parse_args(base + ["--adv_estimator", "rloo", "--n_samples_per_prompt",
                                                               "2"])).kl_placement == "reward"  # ppo's, explicit rloo
    with pytest.raises(UsageError, match="--n_samples_per_prompt >= 2"):
        mod.rl_config(mod.build_parser().parse_args(base + ["--algo", "grpo"]))
    assert "k3: KL(ref || pi)" in mod.build_parser().format_help().replace("\n", " ").replace("  ", " ")
    with pytest.raises(TypeError, match="kl_coeff"):
        PPOTrainer(NaiveStrategy(), None, tokenizer=None, reward_fn=h.target_share, kl_coeff=0.1)
    assert rl.preset_table() in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("argv, match", [
    # DAPO's buffer was clamped to the budget (a 0-token penalty-free zone): now a share of it, or refused
    (["--algo", "dapo", "--n_samples_per_prompt", "2"], "set --max_new_tokens"),
    (["--algo", "dapo", "--n_samples_per_prompt", "2", "--max_new_tokens", "64", "--overlong_buffer_len", "4096"],
     "exceeds --max_new_tokens 64"),
    # the adaptive controller multiplies kl_coef: from 0 it stays 0
    (["--algo", "dapo", "--n_samples_per_prompt", "2", "--max_new_tokens", "64", "--target_kl", "0.1"],
     "give --kl_coef > 0"),
    (["--algo", "gspo", "--n_samples_per_prompt", "2", "--target_kl", "0.1"], "give --kl_coef > 0"),
    # k1 as a loss term has zero expected gradient
    (["--algo", "grpo", "--n_samples_per_prompt", "2", "--kl_estimator", "k1"], "zero in expectation"),
])
def test_combinations_that_cannot_work_are_refused_with_one_line(argv, match):
    mod = load_script("examples/train_prompts.py")
    with pytest.raises(UsageError, match=match) as err:
        mod.rl_config(mod.build_parser().parse_args(["--pretrain", "x", "--prompt_dataset", "p", *argv]))
    assert "\n" not in str(err.value)


def test_no_reference_pass_where_the_kl_is_multiplied_by_zero():
    """dr_grpo / dapo / gspo (kl_coef 0) build no reference model and never call one; grpo's 0.04 does."""
    for algo, uses in (("gspo", False), ("dr_grpo", False), ("grpo", True)):
        trainer, prompts = _critic_free(algo, 4, episodes=1, max_new_tokens=8)
        calls = []
        ref = trainer.experience_maker._ref_log_probs
        trainer.experience_maker._ref_log_probs = lambda *a: calls.append(1) or ref(*a)
        trainer.fit(prompts)
        assert (trainer.initial_model is not None) == uses and bool(calls) == uses, algo


# ----- critic-free methods -------------------------------------------------------------------------------
def _critic_free(algo, n, episodes, **kw):
    strategy = NaiveStrategy(seed=0)
    actor, _ = h.models(seed=0)
    prompts, _ = h.loaders(strategy, experience_batch_size=16 // n)
    trainer = PPOTrainer(strategy, actor, None, tokenizer=tiny.tokenizer("llama"), reward_fn=h.target_share,
                         algo=algo, n_samples_per_prompt=n, num_episodes=episodes, **{**NO_KL_KW, **kw})
    return trainer, prompts


# RLOO's KL penalty (0.05, in the reward) acts on its leave-one-out advantages and holds the policy nearer the
# reference: it takes more episodes to gain as much
@pytest.mark.parametrize("algo, n, episodes", [("grpo", 4, 16), ("rloo", 4, 24), ("reinforce_pp", 1, 16)])
def test_critic_free_methods_raise_the_reward(algo, n, episodes):
    trainer, prompts = _critic_free(algo, n, episodes=episodes)
    seen = []
    make = trainer.experience_maker.make_experience

    def recording(batch):
        exp = make(batch)
        seen.append(exp)
        return exp

    trainer.experience_maker.make_experience = recording
    hist = trainer.fit(prompts)
    scores = [m["critic/score/mean"] for m in hist]
    assert _mean(scores[-3:]) > _mean(scores[:3]) + 0.2, scores
    assert trainer.critic is None and trainer.experience_maker.critic is None and trainer.critic_optim is None
    assert all(e.values is None and e.returns is None for e in seen)
    assert not any(k.startswith("critic/v") for k in hist[-1]) and "timing_s/train_critic" not in hist[-1]
    groups = seen[0].group.tolist()
    assert groups == [g for g in sorted(set(groups)) for _ in range(n)]  # n samples per prompt, one id each
    assert (seen[0].ref_log_probs is not None) == (algo == "grpo")  # GRPO's KL is a loss term
    if algo == "grpo":
        assert hist[-1]["actor/kl_loss"] > 0
    for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy", "response_length/mean",
                "timing_s/generate", "perf/throughput"):
        assert key in hist[-1]


@pytest.mark.parametrize("algo, kw", [("grpo", {}), ("gspo", {"accumulation_steps": 2, "train_batch_size": 8})])
def test_one_step_per_rollout_reuses_the_update_log_probs_with_the_same_updates(algo, kw):
    """One optimizer step per rollout batch (one pass, the buffer in <= accumulation_steps micro-batches): the
    old log-probs are the update's own, detached (no scoring forward while making experience), and every loss,
    gradient norm and weight equals the run that scores them."""
    runs = {}
    for reuse in (True, False):
        trainer, prompts = _critic_free(algo, 4, episodes=2, max_epochs=1, **{"train_batch_size": 16, **kw})
        if not reuse:
            trainer._reuses_update_log_probs = lambda loader: False
        seen = []
        make = trainer.experience_maker.make_experience
        trainer.experience_maker.make_experience = lambda batch: seen.append(make(batch)) or seen[-1]
        steps = h.record_steps(trainer)
        trainer.fit(prompts)
        assert all((e.action_log_probs is None) == reuse for e in seen)
        runs[reuse] = steps, trainer.actor.state_dict()
    (steps, weights), (ref_steps, ref_weights) = runs[True], runs[False]
    assert len(steps) == len(ref_steps) == 2
    for got, want in zip(steps, ref_steps):
        for key in ("actor/pg_loss", "actor/kl_loss", "actor/grad_norm", "actor/entropy"):
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=1e-6), key
        assert got["actor/ppo_kl"] == 0.0 and got["actor/pg_clipfrac"] == 0.0
    # AdamW divides by sqrt(v): float-rounding differences of near-zero gradient entries grow to ~1e-6
    assert max((weights[k] - ref_weights[k]).abs().max().item() for k in weights) < 2e-5
    assert max((weights[k] - h.models(seed=0)[0].state_dict()[k]).abs().max().item() for k in weights) > 1e-4


def test_reused_log_probs_only_when_one_step_trains_each_sample():
    prompts = _critic_free("grpo", 4, episodes=1)[1]  # 4 prompts x 4 samples per batch
    for kw, want in [({"max_epochs": 1, "train_batch_size": 16}, True),
                     ({"max_epochs": 1, "train_batch_size": 8, "accumulation_steps": 2}, True),
                     ({"max_epochs": 1, "train_batch_size": 8}, False),  # two steps: the second sees new weights
                     ({"max_epochs": 2, "train_batch_size": 16}, False),
                     ({"max_epochs": 1, "train_batch_size": 16, "target_kl": 0.5}, False),  # adaptive KL reads them
                     ({"max_epochs": 1, "train_batch_size": 16, "buffer_limit": 8, "num_collect_steps": 2}, True)]:
        trainer, _ = _critic_free("grpo", 4, episodes=1, **kw)
        assert trainer._reuses_update_log_probs(prompts) is want, kw
    trainer, _ = _critic_free("rloo", 4, episodes=1, max_epochs=1, train_batch_size=16)
    assert trainer._reuses_update_log_probs(prompts) is False  # RLOO's KL penalty is in the reward


def test_experience_maker_scores_with_an_async_group_reward():
    """A per-group async reward function gets each prompt's n samples in one call; its scores are the experience's."""
    from coati import rewards

    calls = []

    @rewards.per_group
    async def rank_by_sevens(prompts, responses, **_):
        calls.append(list(prompts))
        counts = [r.count(h.TARGET) for r in responses]
        return [float(sorted(counts).index(c)) for c in counts]  # 0 for the fewest '7's of the group, ...

    trainer, prompts = _critic_free("grpo", 4, episodes=1)
    trainer.experience_maker.reward_fn = rank_by_sevens
    batch = next(iter(prompts))
    exp = trainer.experience_maker.make_experience(batch)
    responses = trainer.experience_maker.decode_responses(exp.sequences, exp.action_mask)
    assert calls == [[p] * 4 for p in batch["prompts"]]
    want = []
    for i in range(0, len(responses), 4):
        counts = [r.count(h.TARGET) for r in responses[i:i + 4]]
        want += [float(sorted(counts).index(c)) for c in counts]
    assert exp.info["score"].tolist() == want


def test_rloo_advantages_carry_the_kl_penalty_of_the_reward():
    """--algo rloo (KL in the reward, 0.05): the leave-one-out baseline works on r_i - 0.05 * sum_t KL_t (RLOO's
    reward, as TRL's RLOOTrainer computes it), computed here sample by sample."""
    from coati.experience.maker import ExperienceMaker

    actor, reference = h.models(seed=0)[0], h.models(seed=1)[0]  # a different reference: the KL is not 0
    maker = ExperienceMaker(actor, initial_model=reference, tokenizer=tiny.tokenizer("llama"),
                            reward_fn=h.target_share, algo="rloo", n_samples_per_prompt=4, max_new_tokens=8)
    prompts = h.loaders(NaiveStrategy(seed=0), experience_batch_size=2)[0]
    exp = maker.make_experience(next(iter(prompts)))
    ref = maker._ref_log_probs(exp.sequences, exp.attention_mask, exp.num_actions)
    n, beta = 4, rl.PRESETS["rloo"]["kl_coef"]
    rewards = []
    for i in range(exp.batch_size):
        k = int(exp.action_mask[i].sum())
        kl = sum(float(exp.action_log_probs[i, t]) - float(ref[i, t]) for t in range(k))
        rewards.append(float(exp.info["score"][i]) - beta * kl)
    assert max(abs(r - s) for r, s in zip(rewards, exp.info["score"].tolist())) > 1e-3  # the KL counts
    for i in range(exp.batch_size):
        start = i // n * n
        others = [rewards[j] for j in range(start, start + n) if j != i]
        want = rewards[i] - sum(others) / (n - 1)
        k = int(exp.action_mask[i].sum())
        assert exp.advantages[i, :k].tolist() == pytest.approx([want] * k, abs=1e-5)


def test_critic_free_run_holds_no_critic_and_resumes_exactly(tmp_path):
    def run(save_path, resume=None):
        trainer, prompts = _critic_free("grpo", 4, episodes=4, save_path=str(save_path), save_interval=2,
                                        lr_scheduler="cosine", target_kl=0.5, kl_horizon=100)
        hist = trainer.fit(prompts, resume_from=resume)
        return trainer, hist

    full, full_hist = run(tmp_path / "full")
    held = [m for m in vars(full).values() if isinstance(m, torch.nn.Module)]
    assert not any(isinstance(m, Critic) for m in held) and full.critic is None
    modules = [full.actor, full.initial_model, full.experience_maker.actor]
    assert not any(isinstance(sub, Critic) for m in modules for sub in m.modules())
    step2 = tmp_path / "full" / "checkpoints" / "step_2"
    assert sorted(p.name for p in step2.iterdir()) == ["actor", "trainer_state"]
    assert not (tmp_path / "full" / "critic").exists()
    resumed, res_hist = run(tmp_path / "resumed", resume=step2)
    assert resumed.optim_step == full.optim_step and resumed.kl_ctl.value == full.kl_ctl.value
    for a, b in zip(full.actor.state_dict().values(), resumed.actor.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert res_hist[-1]["critic/score/mean"] == pytest.approx(full_hist[-1]["critic/score/mean"], abs=1e-6)
    assert res_hist[-1]["actor/pg_loss"] == pytest.approx(full_hist[-1]["actor/pg_loss"], abs=1e-6)
    # resumed where it wrote: the rollout dump keeps episodes 1-2, then continues with 3-4, no duplicates
    dump = (tmp_path / "full" / "rollouts.jsonl").read_text()
    assert [json.loads(x)["step"] for x in dump.splitlines()] == [e for e in (1, 2, 3, 4) for _ in range(16)]
    with open(tmp_path / "full" / "rollouts.jsonl", "a") as f:
        f.write('{"step": 5, "prompt": "a line cut sh')  # a run killed while writing
    run(tmp_path / "full", resume=step2)
    again = (tmp_path / "full" / "rollouts.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in again] == [e for e in (1, 2, 3, 4) for _ in range(16)]
    for a, b in zip(again, dump.splitlines()):
        a, b = json.loads(a), json.loads(b)
        assert (a["response"], a["group"]) == (b["response"], b["group"])
        assert a["advantage"] == pytest.approx(b["advantage"], abs=1e-5)


def test_dynamic_sampling_keeps_only_informative_groups_and_fills_the_episode():
    """DAPO: on the tiny task most groups of a random policy score all 0; those are dropped and further prompt
    batches fill the episode to num_collect_steps x batch groups (or stop after max_sampling_rounds)."""
    trainer, prompts = _critic_free("dapo", 4, episodes=3, num_collect_steps=2, overlong_buffer_len=2)
    kept = []
    update = trainer._update_phase

    def recording(timings):
        kept.append([it.info["score"].item() for it in trainer.buffer.items])
        return update(timings)

    trainer._update_phase = recording
    hist = trainer.fit(prompts)
    for episode, metrics in zip(kept, hist):
        assert len(episode) % 4 == 0
        groups = [episode[i:i + 4] for i in range(0, len(episode), 4)]
        assert all(len(set(g)) > 1 for g in groups)  # every kept group has differing rewards
        rounds = metrics["sampling/generation_rounds"]
        assert len(groups) == 2 * 4 or rounds == 2 * trainer.config.max_sampling_rounds
        assert metrics["sampling/dropped_group_share"] == pytest.approx(1 - len(groups) / (rounds * 4))
    assert hist[0]["sampling/dropped_group_share"] > 0.3
    assert hist[0]["critic/overlong_penalty/mean"] < 0  # 8-token budget, penalty over the last 2 tokens


def test_lr_schedule_ends_with_the_last_step_when_dynamic_sampling_hits_its_round_cap():
    """One generation round per prompt batch: the episodes keep fewer groups than planned, so they take fewer
    optimizer steps; the cosine schedule's length follows (it was the planned count), warmup included."""
    trainer, prompts = _critic_free("dapo", 4, episodes=3, num_collect_steps=2, max_sampling_rounds=1, max_epochs=1,
                                    train_batch_size=4, lr_scheduler="cosine", warmup_ratio=0.2)
    kept, lrs = [], []
    update = trainer._update_phase

    def recording(timings):
        kept.append(len(trainer.buffer))
        return update(timings)

    trainer._update_phase = recording
    steps = h.record_steps(trainer)
    trainer.fit(prompts)
    planned = 3 * 2 * 4 * 4 // 4  # 3 episodes x 2 batches x 4 prompts x 4 samples, 4 per step
    taken = trainer.optim_step
    assert taken == sum(kept) // 4 < planned  # the cap was hit: fewer informative groups than planned
    assert trainer.actor_scheduler.lr_lambdas[0].total == taken
    assert trainer.actor_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the cosine ended at the end
    # the last episode's steps follow the cosine over `taken` steps (the total was final by then); each step
    # logs the rate its scheduler step set, the next step's
    lr, warmup = NO_KL_KW["lr"], math.ceil(taken * 0.2)
    last = kept[-1] // 4
    assert last > 0
    for step, metrics in zip(range(taken - last + 1, taken + 1), steps[-last:] if last else []):
        want = lr * step / warmup if step < warmup else \
            lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (taken - warmup)))
        assert metrics["actor/lr"] == pytest.approx(want, rel=1e-9)


def test_script_runs_grpo_with_the_gsm8k_reward(tmp_path, tiny_llama_dir, shared_data):
    out = tmp_path / "out"
    seen = {}
    from coati import rewards

    def spy(prompts, responses, answer=None, **kw):
        seen.setdefault("answers", []).extend(answer)
        return rewards.gsm8k(prompts, responses, answer=answer, **kw)

    # the script loads module:function; the spy is registered as an importable module
    sys.modules["coati_test_spy_reward"] = type(sys)("coati_test_spy_reward")
    sys.modules["coati_test_spy_reward"].gsm8k = spy
    mod = load_script("examples/train_prompts.py")
    argv = ["--pretrain", str(tiny_llama_dir), "--prompt_dataset", str(shared_data / "eval" / "gsm8k_test.jsonl"),
            "--max_datasets_size", "4", "--algo", "grpo", "--n_samples_per_prompt", "2", "--num_episodes", "1",
            "--num_collect_steps", "1", "--num_update_steps", "1", "--experience_batch_size", "2",
            "--train_batch_size", "4", "--max_new_tokens", "4", "--max_input_len", "256", "--prompt_template",
            "none", "--save_path", str(out)]
    try:
        hist = mod.main(argv + ["--reward_fn", "coati_test_spy_reward:gsm8k"])
    finally:
        del sys.modules["coati_test_spy_reward"]
    records = [json.loads(x) for x in (shared_data / "eval" / "gsm8k_test.jsonl").read_text().splitlines()]
    answers = seen["answers"]
    assert len(answers) == 4 and answers[0] == answers[1] and answers[2] == answers[3]  # 2 samples per prompt
    assert all(a in [r["answer"] for r in records] for a in answers)
    assert hist[-1]["critic/score/mean"] == 0.0  # a random tiny model does not solve GSM8K
    assert "actor/kl_loss" in hist[-1] and not any(k.startswith("critic/v") for k in hist[-1])
    assert (out / "config.json").is_file() and not (out / "critic").exists()
    hist = mod.main(argv + ["--reward_fn", "coati.rewards:gsm8k", "--save_path", str(tmp_path / "builtin")])
    assert hist[-1]["critic/score/mean"] == 0.0 and hist[-1]["training/optim_steps"] == 1


# ----- the correctness harness ---------------------------------------------------------------------------
def _dump(path):
    return [json.loads(line) for line in (path / "rollouts.jsonl").read_text().splitlines()]


def _groups(records):
    out = {}
    for r in records:
        out.setdefault((r["step"], r["group"]), []).append(r)
    return list(out.values())


def test_rollout_dump_holds_every_sample_with_advantages_equal_to_grpos_formula(tmp_path):
    """rollouts.jsonl: one line per sample of each episode, advantages equal to the group z-score computed here
    from the dumped scores, the zero-signal share equal to the share of dumped groups with equal scores."""
    trainer, prompts = _critic_free("grpo", 4, episodes=3, save_path=str(tmp_path))
    hist = trainer.fit(prompts)
    records = _dump(tmp_path)
    assert len(records) == 3 * 16 and [r["step"] for r in records] == [e for e in (1, 2, 3) for _ in range(16)]
    assert set(records[0]) == {"step", "prompt", "response", "response_len", "group", "score", "overlong_penalty",
                               "reward", "advantage", "kl", "weight_version"}
    steps = [h["training/optim_steps"] for h in hist]  # each episode sampled the weights of the step before it
    assert [r["weight_version"] for r in records] == [v for v in [0] + steps[:-1] for _ in range(16)]
    for group in _groups(records):
        scores = [r["score"] for r in group]
        mean = sum(scores) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in scores) / 3)
        for r in group:
            assert r["advantage"] == pytest.approx((r["score"] - mean) / (std + 1e-6), abs=1e-4)
            assert r["reward"] == pytest.approx(r["score"], abs=1e-6)  # GRPO's KL is a loss term
            assert r["score"] == pytest.approx(h.target_share([], [r["response"]])[0], abs=1e-6)
    for episode, metrics in enumerate(hist, 1):
        groups = [g for g in _groups(records) if g[0]["step"] == episode]
        zero = sum(len({r["score"] for r in g}) == 1 for g in groups) / len(groups)
        assert metrics["sampling/zero_adv_group_share"] == pytest.approx(zero)
    assert 0 < hist[0]["sampling/zero_adv_group_share"] < 1


def test_rollout_dump_goes_to_a_save_path_nothing_else_created(tmp_path):
    """Metrics logged elsewhere (--log_dir): the dump still finds its directory."""
    trainer, prompts = _critic_free("grpo", 4, episodes=1, save_path=str(tmp_path / "new" / "run"),
                                    log_dir=str(tmp_path / "logs"))
    trainer.fit(prompts)
    assert len(_dump(tmp_path / "new" / "run")) == 16


def test_rollout_dump_shows_rloos_kl_shaped_reward_and_leave_one_out_advantage(tmp_path):
    """RLOO from the dump alone: reward = score - 0.05 x the summed KL, advantage = reward minus the mean of the
    group's other rewards; every 2nd episode only with --rollout_log_interval 2."""
    trainer, prompts = _critic_free("rloo", 4, episodes=4, save_path=str(tmp_path), rollout_log_interval=2,
                                    kl_coef=None)
    trainer.fit(prompts)
    records = _dump(tmp_path)
    assert sorted({r["step"] for r in records}) == [2, 4] and len(records) == 2 * 16
    assert max(abs(r["kl"]) for r in records) > 1e-3  # the policy has moved from the reference
    for group in _groups(records):
        for r in group:
            assert r["reward"] == pytest.approx(r["score"] - 0.05 * r["kl"], abs=1e-5)
            others = [o["reward"] for o in group if o is not r]
            assert r["advantage"] == pytest.approx(r["reward"] - sum(others) / 3, abs=1e-5)


def test_dapo_overlong_penalty_is_a_function_of_the_length_alone(tmp_path):
    """Prompts of 2-6 tokens in batches of different padded widths: every dumped penalty is DAPO's formula of the
    response length against --max_new_tokens 8 and the preset's buffer (a fifth of it, 2 tokens)."""
    trainer, prompts = _critic_free("dapo", 4, episodes=2, save_path=str(tmp_path), max_new_tokens=8)
    assert trainer.config.overlong_buffer_len == 2
    trainer.fit(prompts)
    records = _dump(tmp_path)
    assert {r["response_len"] for r in records} >= {8}
    for r in records:
        assert r["overlong_penalty"] == pytest.approx(min(0.0, max(-1.0, (6 - r["response_len"]) / 2)), abs=1e-6)
        assert r["reward"] == pytest.approx(r["score"] + r["overlong_penalty"], abs=1e-6)


def test_the_first_update_of_each_batch_is_on_policy_or_a_warning_says_why(caplog):
    """Two optimizer steps per batch (so the old log-probs are scored while collecting): the first step's ratios
    are 1 and ppo_kl 0; with the attention dropout switched back on after the trainer turned it off, they are not,
    and each episode warns naming dropout."""
    for dropout in (0.0, 0.3):
        caplog.clear()
        trainer, prompts = _critic_free("grpo", 4, episodes=2, train_batch_size=8, max_epochs=1)
        assert not trainer._reuses_update_log_probs(prompts)
        for module in trainer.actor.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = dropout
        steps = h.record_steps(trainer)
        with caplog.at_level("WARNING", logger="coati"):
            hist = trainer.fit(prompts)
        first = steps[0::2]  # each episode's first step
        warnings = [r.getMessage() for r in caplog.records if "off-policy" in r.getMessage()]
        if dropout == 0.0:
            assert all(abs(s["actor/ratio_max"] - 1) < 1e-5 and abs(s["actor/ratio_min"] - 1) < 1e-5 for s in first)
            assert all(abs(s["actor/ppo_kl"]) < 1e-7 for s in first) and not warnings
            assert hist[-1]["actor/ratio_max"] == max(s["actor/ratio_max"] for s in steps[2:])  # episode 2's max
        else:
            assert all(s["actor/ratio_max"] > 1.001 for s in first)
            assert len(warnings) == 2 and "dropout" in warnings[0]


@pytest.mark.dist
def test_every_algo_gives_one_update_on_one_or_two_processes_and_any_accumulation(tmp_path):
    """Ragged responses (cut at random lengths), 2 episodes x 2 passes: 2 processes and 1 process with the same
    global batch, each with the buffer in 1 or 2 micro-batches per optimizer step, end with the same weights (Adam
    amplifies float-rounding differences of near-zero gradients to ~1e-5) and log the same episode metrics.
    Before the losses were normalised over the global batch, token_mean (reinforce_pp, dapo) was 5e-3 off on 2
    processes: each process divided by its own token count."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    script = str(ROOT / "tests" / "dist_rl.py")
    ddp = [*torchrun(2), script, str(tmp_path), "ddp"]
    for cmd in (ddp, [sys.executable, script, str(tmp_path), "single"]):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hist = {m: json.loads((tmp_path / f"history_{m}.json").read_text()) for m in ("ddp", "single")}
    start = h.models(seed=0)[0].state_dict()
    keys = ("critic/score/mean", "actor/pg_loss", "actor/kl_loss", "actor/pg_clipfrac", "actor/ppo_kl",
            "critic/vf_loss", "response_length/mean", "sampling/zero_adv_group_share")
    for algo in rl.PRESETS:
        want = torch.load(tmp_path / f"actor_{algo}_single_1.pt")
        assert max((want[k] - start[k]).abs().max().item() for k in start) > 1e-3, algo  # it trained
        assert hist["single"][f"{algo}_1"][0]["response_length/std"] > 1.0  # ragged
        for mode, accumulation in (("ddp", 1), ("ddp", 2), ("single", 2)):
            got = torch.load(tmp_path / f"actor_{algo}_{mode}_{accumulation}.pt")
            for k in want:
                torch.testing.assert_close(got[k], want[k], atol=3e-5, rtol=0, msg=f"{algo} {mode} {accumulation} {k}")
            for a, b in zip(hist[mode][f"{algo}_{accumulation}"], hist["single"][f"{algo}_1"]):
                assert a["training/optim_steps"] == b["training/optim_steps"] == 2 * a["step"]
                for key in keys:
                    if key in b:
                        assert a[key] == pytest.approx(b[key], abs=1e-5), (algo, mode, accumulation, key)
