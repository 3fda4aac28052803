"""PPO end to end on a tiny LLaMA (64-token vocabulary): rewards rise, ptx, LoRA reference, resume, DDP, CLI;
dropout off, frozen reference and shared reward model, rollouts sampled from the scored distribution."""
import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from coati.errors import UsageError
from coati.experience.maker import ExperienceMaker
from coati.models import Actor, Critic, LogSigLoss, LoraSettings, RewardModel
from coati.rl import compute_reward
from coati.models.sharing import shared_critic_and_reward
from coati.trainer.ppo import PPOTrainer
from coati.trainer.strategies import NaiveStrategy
from tests import dist_ppo as h
from tests import tiny
from tests.scripts import load_script, torchrun

ROOT = Path(__file__).resolve().parents[1]


def _trainer(strategy, actor, critic, **kw):
    return PPOTrainer(strategy, actor, critic, tokenizer=tiny.tokenizer("llama"), **{**h.PPO_KW, **kw})


def _mean(xs):
    return sum(xs) / len(xs)


def test_kl_penalised_reward_matches_hand_computation():
    r = torch.tensor([2.0, -1.0, 5.0])
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0], [-1.5, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -0.2, -1.0], [-1.0, -3.0, -3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    out = compute_reward(r, 0.1, logp, ref, mask, reward_clip=3.0)
    # -0.1 * (logp - ref) on valid tokens; the (clipped) reward lands on the last valid token
    expected = torch.tensor([[-0.05, 0.1, 0.0 + 2.0], [0.02, 0.05 - 1.0, 0.0], [0.05 + 3.0, 0.0, 0.0]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_ppo_with_python_reward_raises_reward():
    strategy = NaiveStrategy(seed=0)
    actor, critic = h.models(seed=0)
    prompts, _ = h.loaders(strategy)
    trainer = _trainer(strategy, actor, critic, reward_fn=h.target_share, num_episodes=20)
    hist = trainer.fit(prompts)
    scores = [m["critic/score/mean"] for m in hist]
    first, last = _mean(scores[:3]), _mean(scores[-3:])
    assert first < 0.06  # random policy: about 1/64 of the characters are '7'
    assert last > first + 0.15, scores
    assert hist[-1]["actor/reward_kl_penalty"] > hist[0]["actor/reward_kl_penalty"]
    assert hist[-1]["actor/entropy"] < hist[0]["actor/entropy"] - 0.3
    assert hist[0]["actor/entropy"] == pytest.approx(torch.log(torch.tensor(64.0)).item(), abs=0.1)
    for key in ("timing_s/generate", "timing_s/make_experience", "timing_s/train_actor", "timing_s/train_critic",
                "timing_s/step", "perf/throughput", "critic/vf_loss", "actor/pg_clipfrac", "actor/ppo_kl"):
        assert key in hist[-1]
    assert hist[-1]["timing_s/step"] >= hist[-1]["timing_s/generate"] + hist[-1]["timing_s/train_actor"]


def _rm_pairs(n, g):
    """(chosen, rejected) sequences: BOS, prompt bytes, response bytes; chosen has more '7's."""
    chosen, rejected = [], []
    for _ in range(n):
        prompt = torch.randint(3, h.VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        pair = []
        for share in sorted(torch.rand(2, generator=g).tolist(), reverse=True):
            resp = torch.randint(3, h.VOCAB, (8,), generator=g)
            resp[torch.rand(8, generator=g) < share] = h.TARGET_ID
            pair.append(torch.cat([torch.tensor([1]), prompt, resp]))
        chosen.append(pair[0])
        rejected.append(pair[1])
    return chosen, rejected


def _left_pad(seqs):
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    return ids, mask


def _train_reward_model(steps=120):
    torch.manual_seed(1)
    rm = RewardModel.from_config(h.config())
    opt = torch.optim.Adam([p for p in rm.parameters() if p.requires_grad], lr=2e-3)
    loss_fn = LogSigLoss()
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        chosen, rejected = _rm_pairs(16, g)
        c_ids, c_mask = _left_pad(chosen)
        r_ids, r_mask = _left_pad(rejected)
        loss = loss_fn(rm(c_ids, c_mask), rm(r_ids, r_mask))
        opt.zero_grad()
        loss.backward()
        opt.step()
    chosen, rejected = _rm_pairs(64, torch.Generator().manual_seed(99))
    with torch.no_grad():
        acc = (rm(*_left_pad(chosen)) > rm(*_left_pad(rejected))).float().mean().item()
    return rm, acc


def test_ppo_with_trained_reward_model_raises_reward():
    rm, acc = _train_reward_model()
    assert acc > 0.8
    strategy = NaiveStrategy(seed=0)
    actor, critic = h.models(seed=0)
    prompts, _ = h.loaders(strategy)
    trainer = _trainer(strategy, actor, critic, reward_model=rm, num_episodes=20)
    true_share = []
    make = trainer.experience_maker.make_experience

    def recording(batch):
        exp = make(batch)
        resp = trainer.experience_maker.decode_responses(exp.sequences, exp.action_mask)
        true_share.append(_mean(h.target_share(None, resp)))
        return exp

    trainer.experience_maker.make_experience = recording
    hist = trainer.fit(prompts)
    scores = [m["critic/score/mean"] for m in hist]
    assert _mean(scores[-3:]) > _mean(scores[:3]) + 1.0, scores
    assert _mean(true_share[-3:]) > _mean(true_share[:3]) + 0.1, true_share
    assert all(not p.requires_grad for p in rm.parameters())


def _run_ptx(ptx_coef, with_pretrain, episodes=2):
    strategy = NaiveStrategy(seed=0)
    actor, critic = h.models(seed=0)
    prompts, pretrain = h.loaders(strategy, with_pretrain=with_pretrain)
    trainer = _trainer(strategy, actor, critic, reward_fn=h.target_share, ptx_coef=ptx_coef, num_episodes=episodes)
    hist = trainer.fit(prompts, pretrain)
    return actor, critic, hist


def test_ptx_changes_update_and_zero_coef_equals_plain_ppo():
    plain_actor, plain_critic, plain_hist = _run_ptx(0.9, with_pretrain=False)
    zero_actor, zero_critic, zero_hist = _run_ptx(0.0, with_pretrain=True)
    ptx_actor, _, ptx_hist = _run_ptx(0.9, with_pretrain=True)
    plain_state, zero_state = plain_actor.state_dict(), zero_actor.state_dict()
    assert all(torch.equal(plain_state[k], zero_state[k]) for k in plain_state)
    assert all(torch.equal(a, b) for a, b in zip(plain_critic.state_dict().values(), zero_critic.state_dict().values()))
    assert "actor/ptx_loss" not in plain_hist[-1] and "actor/ptx_loss" not in zero_hist[-1]
    # the LM loss (ln 64 = 4.16 for the random model) falls as the actor learns the documents
    assert 2.0 < ptx_hist[0]["actor/ptx_loss"] < 4.6
    assert ptx_hist[-1]["actor/ptx_loss"] < ptx_hist[0]["actor/ptx_loss"] - 0.3
    diff = max((ptx_actor.state_dict()[k] - plain_state[k]).abs().max().item() for k in plain_state)
    assert diff > 1e-4
    # the ptx term pulls the policy towards the pretraining documents: '3' (id 54) becomes likelier
    ids = torch.tensor([[1, 54, 54, 35, 54]])
    with torch.no_grad():
        p_ptx = ptx_actor(ids, torch.ones_like(ids), num_actions=4).sum()
        p_plain = plain_actor(ids, torch.ones_like(ids), num_actions=4).sum()
    assert p_ptx > p_plain + 1.0


def test_lora_reference_equals_untouched_base_model():
    strategy = NaiveStrategy(seed=0)
    actor, critic = h.models(seed=0, lora_rank=8)
    prompts, _ = h.loaders(strategy)
    trainer = _trainer(strategy, actor, critic, reward_fn=h.target_share, num_episodes=3, lr=5e-3)
    assert trainer.initial_model is None  # no second copy of the policy
    trainer.fit(prompts)
    torch.manual_seed(0)
    base = Actor.from_config(h.config())  # same seed, same base weights, never trained
    batch = next(iter(prompts))
    exp = trainer.experience_maker.make_experience(batch)
    seq, mask, n = exp.sequences, exp.attention_mask, exp.num_actions
    with torch.no_grad():
        ref = trainer.experience_maker._ref_log_probs(seq, mask, n)
        want = base(seq, mask, num_actions=n)
        trained = actor(seq, mask, num_actions=n)
    valid = exp.action_mask.bool()
    torch.testing.assert_close(ref[valid], want[valid], atol=1e-6, rtol=0)
    assert (trained[valid] - want[valid]).abs().max() > 1e-2  # the adapter did learn


class _Wrapped(torch.nn.Module):
    """What a Booster returns for a model: a module around the user's model."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class _WrappedOptim:
    """What a Booster returns for an optimizer: it steps the inner one and counts its steps."""

    def __init__(self, optim):
        self.optim, self.steps = optim, 0

    def step(self):
        self.steps += 1
        self.optim.step()

    def zero_grad(self, set_to_none=True):
        self.optim.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optim.state_dict()

    def load_state_dict(self, state):
        self.optim.load_state_dict(state)


class _BoostingStrategy(NaiveStrategy):
    """Wraps model and optimizer together in ``prepare_optimizer`` (as ColossalAI's Booster does) and, like
    ColossalAIStrategy, refuses a backward through an optimizer it did not wrap."""

    def prepare_optimizer(self, model, optimizer):
        return _Wrapped(model), _WrappedOptim(optimizer)

    def base_optimizer(self, optimizer):
        return optimizer.optim

    def unwrap(self, model):
        return model.module if isinstance(model, _Wrapped) else model

    def backward(self, loss, model, optimizer):
        assert isinstance(model, _Wrapped) and isinstance(optimizer, _WrappedOptim)
        super().backward(loss, model, optimizer)

    def inference_context(self, model):
        assert isinstance(model, _Wrapped)  # the engine's own handle, not the unwrapped module
        self.inference_calls += 1
        return super().inference_context(model)


def test_ppo_trains_the_pair_a_wrapping_strategy_returns(tmp_path):
    """PPO boosts actor and critic through ``strategy.prepare_optimizer``, trains the returned pairs, builds
    its schedules on the inner optimizers, runs generation and scoring in the strategy's inference context,
    checkpoints through the wrappers, and equals a plain run exactly."""
    runs = {}
    for strategy in (NaiveStrategy(seed=0), _BoostingStrategy(seed=0)):
        strategy.inference_calls = 0
        actor, critic = h.models(seed=0)
        prompts, _ = h.loaders(strategy)
        trainer = _trainer(strategy, actor, critic, reward_fn=h.target_share, num_episodes=2,
                           lr_scheduler="cosine", save_path=str(tmp_path / type(strategy).__name__),
                           save_interval=2)
        hist = trainer.fit(prompts)
        runs[type(strategy).__name__] = (actor, trainer, hist)
    actor, trainer, hist = runs["_BoostingStrategy"]
    assert isinstance(trainer.actor, _Wrapped) and trainer.experience_maker.actor is trainer.actor
    assert trainer.strategy.inference_calls == 2 * 2  # per episode: the actor (generate + score), the critic
    assert trainer.actor_optim.steps == trainer.critic_optim.steps == trainer.optim_step > 0
    moments = trainer.actor_optim.optim.state_dict()["state"][0]["exp_avg"].clone()
    trainer.actor_optim.optim.state.clear()
    trainer.load_checkpoint(tmp_path / "_BoostingStrategy" / "checkpoints" / "step_2")
    assert torch.equal(trainer.actor_optim.optim.state_dict()["state"][0]["exp_avg"], moments)
    assert trainer.actor_scheduler.optimizer is trainer.actor_optim.optim
    assert hist[-1]["actor/lr"] < 1e-3  # the cosine schedule moved the inner optimizer's lr
    plain_actor, _, plain_hist = runs["NaiveStrategy"]
    for a, b in zip(plain_actor.state_dict().values(), actor.state_dict().values()):
        assert torch.equal(a, b)
    assert hist[-1]["critic/score/mean"] == plain_hist[-1]["critic/score/mean"]


def test_resume_continues_exactly(tmp_path):
    def run(save_path, episodes, resume=None):
        strategy = NaiveStrategy(seed=0)
        actor, critic = h.models(seed=0)
        prompts, pretrain = h.loaders(strategy, with_pretrain=True)
        trainer = _trainer(strategy, actor, critic, reward_fn=h.target_share, num_episodes=episodes,
                           save_path=str(save_path), save_interval=2, ptx_coef=0.5, lr_scheduler="cosine",
                           target_kl=0.5, kl_horizon=100)
        hist = trainer.fit(prompts, pretrain, resume_from=resume)
        return trainer, hist

    full, full_hist = run(tmp_path / "full", 4)
    resumed, res_hist = run(tmp_path / "resumed", 4, resume=tmp_path / "full" / "checkpoints" / "step_2")
    assert resumed.optim_step == full.optim_step
    assert resumed.kl_ctl.value == full.kl_ctl.value != 0.01  # adaptive KL moved and was restored
    for a, b in zip(full.actor.state_dict().values(), resumed.actor.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert res_hist[-1]["critic/score/mean"] == pytest.approx(full_hist[-1]["critic/score/mean"], abs=1e-6)
    # final actor is a plain HF dir with the same logits; the critic reloads with its value head
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    ids = torch.tensor([[1, 40, 50, 58, 58]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, full.actor(ids), atol=1e-5, rtol=0)
        critic = Critic.from_pretrained(tmp_path / "full" / "critic")
        torch.testing.assert_close(critic(ids), full.critic(ids), atol=1e-5, rtol=0)
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4]  # log_interval 1000: only the last episode


def test_lr_schedule_spans_the_steps_the_run_takes_and_save_interval_counts_episodes(tmp_path):
    """20 prompts in batches of 8 make passes of 8, 8, 4 prompts; 2 batches per episode give 16, 12, 12
    samples, of which the buffer keeps at most 14: 4, 3, 3 micro-batches of 4, each pass taken twice."""
    from coati.dataset import PromptCollator

    strategy = NaiveStrategy(seed=0)
    actor, critic = h.models(seed=0)
    prompts = strategy.setup_dataloader(h.prompt_data(20), 8, shuffle=True, collate_fn=PromptCollator(0))
    trainer = _trainer(strategy, actor, critic, reward_fn=h.target_share, num_episodes=3, num_collect_steps=2,
                       max_epochs=2, train_batch_size=4, buffer_limit=14, lr_scheduler="cosine",
                       save_path=str(tmp_path), save_interval=2)
    trainer.fit(prompts)
    steps = (4 + 3 + 3) * 2
    assert trainer.optim_step == steps
    for sched in (trainer.actor_scheduler, trainer.critic_scheduler):
        assert sched.last_epoch == steps
        assert sched.lr_lambdas[0](steps - 1) > 0 and sched.get_last_lr() == [0.0]  # cosine ends on the last step
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2"]  # episode 2 of 3
    help_text = next(a.help for a in _load_example().build_parser()._actions if a.dest == "save_interval")
    assert help_text == "checkpoint every N episodes (0 = only the final model)"
    assert f"| `--save_interval` | `0` | {help_text} (>= 0) |" in (ROOT / "README.md").read_text()


def _load_example():
    return load_script("examples/train_prompts.py")


def test_cli_defaults_aliases_and_critic_from_reward_model(tmp_path, tiny_llama_dir):
    mod = _load_example()
    parser = mod.build_parser()
    help_text = " ".join(parser.format_help().split())
    for flag, default in [("--ptx_coef", "0.9"), ("--value_clip", "0.4"), ("--vf_coef", "1.0")]:
        entry = help_text.split(f"{flag} {flag[2:].upper()} ")[-1]  # the options-list entry
        assert re.search(r"\(default: ([^)]*)\)", entry).group(1) == default, entry
    assert all(a.help for a in parser._actions)
    args = mod.build_parser().parse_args(["--pretrain", "x", "--prompt_dataset", "p", "--max_timesteps", "3",
                                          "--update_timesteps", "2", "--no-whiten_advantages"])
    assert (args.num_collect_steps, args.num_update_steps, args.whiten_advantages) == (3, 2, False)
    cfg = mod.rl_config(args)  # --algo ppo (the default) fills the algorithm flags with InstructGPT's PPO values
    assert (cfg.kl_coef, cfg.eps_clip, cfg.eps_clip_high, cfg.adv_estimator, cfg.kl_placement) == (
        0.02, 0.2, None, "gae", "reward")

    torch.manual_seed(3)
    rm = RewardModel.from_pretrained(tiny_llama_dir)
    rm.save_pretrained(tmp_path / "rm")
    base = ["--pretrain", str(tiny_llama_dir), "--prompt_dataset", "p"]
    head_file = str(tmp_path / "rm" / "value_head.safetensors")
    for rm_args in (["--rm_path", str(tmp_path / "rm")],
                    ["--rm_pretrain", str(tiny_llama_dir), "--rm_path", head_file]):
        actor, critic, reward_model = mod.build_models(mod.build_parser().parse_args(base + rm_args))
        assert torch.equal(critic.value_head.weight, rm.value_head.weight)
        assert torch.equal(reward_model.value_head.weight, rm.value_head.weight)
        assert isinstance(critic, Critic) and isinstance(actor, Actor)


def test_cli_run_with_reward_fn_file(tmp_path, tiny_llama_dir, shared_data):
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text("def const(prompts, responses, **kw):\n    return [1.5 for _ in responses]\n")
    mod = _load_example()
    out = tmp_path / "out"
    hist = mod.main(["--pretrain", str(tiny_llama_dir), "--prompt_dataset",
                     str(shared_data / "prompts" / "vicuna_question_80.jsonl"), "--max_datasets_size", "4",
                     "--reward_fn", f"{reward_file}:const", "--num_episodes", "1", "--num_collect_steps", "1",
                     "--num_update_steps", "1", "--experience_batch_size", "2", "--train_batch_size", "2",
                     "--max_new_tokens", "3", "--max_input_len", "128", "--prompt_template", "none",
                     "--save_path", str(out), "--lora_rank", "2",
                     "--pretrain_dataset", str(shared_data / "sft" / "alpaca_en_demo.json"), "--ptx_batch_size", "3"])
    assert hist[-1]["critic/score/mean"] == pytest.approx(1.5)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["critic/score/mean"] == pytest.approx(1.5) and rows[-1]["response_length/mean"] <= 3
    assert rows[-1]["actor/ptx_loss"] > 0  # PPO-ptx: the packed pretraining batches were trained on
    assert (out / "config.json").is_file() and (out / "critic" / "value_head.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()  # LoRA merged by default (--merge_lora_weights)


@pytest.mark.dist
def test_ddp_ppo_ranks_hold_identical_weights(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [*torchrun(2), str(ROOT / "tests" / "dist_ppo.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert r0["world_size"] == r1["world_size"] == 2
    assert len(r0["prompts"]) == len(r1["prompts"]) == 24 and set(r0["prompts"]).isdisjoint(r1["prompts"])
    # models built from config start identical on every rank; rollouts differ per rank (one sampling stream
    # each), gradients are averaged, so the trained weights stay identical
    assert r0["initial"] == r1["initial"]
    assert r0["actor"] == r1["actor"] and r0["critic"] == r1["critic"]
    assert r0["actor"] != r0["initial"]
    same0, same1 = r0["same_prompt_responses"], r1["same_prompt_responses"]
    assert len(same0) == len(same1) == 8 and same0 != same1  # one prompt, different samples per rank
    # 3 episodes x 2 epochs x ceil(ceil(8 / 4) / 2) optimizer steps
    assert r0["optim_steps"] == r1["optim_steps"] == 6
    # episode metrics are reduced over both ranks, so both report the same numbers
    assert r0["score"] == r1["score"] and r0["ptx_loss"] == r1["ptx_loss"] > 0


# ----- one policy scored and updated; frozen things stay frozen; sampling as scored -----------------------
DROPOUT = dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)


def _gpt2_config(**overrides):
    """GPT-2 (biases everywhere, dropout when asked) on the 64-token vocabulary of the LLaMA tests."""
    return tiny.gpt2_config(vocab_size=h.VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)




@pytest.mark.parametrize("temperature, log_entropy, lora_rank", [(1.0, True, 0), (0.7, False, 0), (0.7, True, 4)])
def test_first_update_sees_the_scored_policy_despite_dropout(temperature, log_entropy, lora_rank):
    """GPT-2's config asks for dropout 0.1: PPO turns it off, so the first optimizer step's ratio is exactly 1
    (no KL, no clipping) and the critic's first values equal the old ones, at any temperature and through both
    of the update's log-prob paths."""
    strategy = NaiveStrategy(seed=0)
    torch.manual_seed(0)
    lora = LoraSettings(rank=lora_rank, dropout=0.1) if lora_rank else None
    actor = Actor.from_config(_gpt2_config(**DROPOUT), lora=lora)
    critic = Critic.from_config(_gpt2_config(**DROPOUT))
    prompts, _ = h.loaders(strategy)
    trainer = _trainer(strategy, actor, critic, reward_fn=h.target_share, num_episodes=1, temperature=temperature,
                       log_entropy=log_entropy)
    steps = h.record_steps(trainer)
    trainer.fit(prompts)
    actor_first, critic_first, actor_second = steps[0], steps[1], steps[2]
    assert actor_first["actor/ppo_kl"] == 0 and actor_first["actor/pg_clipfrac"] == 0
    assert critic_first["critic/vf_clipfrac"] == 0
    assert actor_second["actor/ppo_kl"] > 0  # once the policy has moved, the ratio does leave 1


@pytest.mark.parametrize("setup", ["lora", "full", "shared"])
def test_reference_and_shared_reward_model_never_move(setup, tmp_path):
    """After PPO steps the reference log-probs (LoRA: the actor with its adapter off; full fine-tuning: the
    frozen copy) and a reward model sharing the critic's base score exactly as before, on GPT-2, whose
    biases LoRA could train."""
    strategy = NaiveStrategy(seed=0)
    torch.manual_seed(0)
    lora = LoraSettings(rank=8)
    actor = Actor.from_config(_gpt2_config(), lora=None if setup == "full" else lora)
    reward_model = None
    if setup == "shared":
        RewardModel.from_config(_gpt2_config()).save_pretrained(tmp_path / "rm")
        critic, reward_model = shared_critic_and_reward(tmp_path / "rm", lora=lora)
        source = {"reward_model": reward_model}
    else:
        critic, source = Critic.from_config(_gpt2_config()), {"reward_fn": h.target_share}
    prompts, _ = h.loaders(strategy)
    trainer = _trainer(strategy, actor, critic, num_episodes=3, lr=5e-3, critic_lr=5e-3, **source)
    maker = trainer.experience_maker
    exp = maker.make_experience(next(iter(prompts)))
    seq, mask, n = exp.sequences, exp.attention_mask, exp.num_actions

    @torch.no_grad()
    def scores():
        frozen = [maker._ref_log_probs(seq, mask, n)] + ([reward_model(seq, mask)] if reward_model else [])
        return frozen, actor(seq, mask, num_actions=n), critic(seq, mask, num_actions=n)

    frozen_before, policy_before, values_before = scores()
    trainer.fit(prompts)
    frozen_after, policy_after, values_after = scores()
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, frozen_after))
    assert (policy_after - policy_before).abs().max() > 1e-2  # while actor and critic did train
    assert (values_after - values_before).abs().max() > 1e-2


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_lora_bias_training_is_refused_for_ppo(bias, tmp_path):
    """peft's bias training moves the base that the reference (and a shared reward model) run on."""
    torch.manual_seed(0)
    biased = LoraSettings(rank=8, train_bias=bias)
    with pytest.raises(ValueError, match="use --lora_train_bias none for PPO"):
        _trainer(NaiveStrategy(seed=0), Actor.from_config(_gpt2_config(), lora=biased),
                 Critic.from_config(_gpt2_config()), reward_fn=h.target_share)
    RewardModel.from_config(_gpt2_config()).save_pretrained(tmp_path / "rm")
    critic, reward_model = shared_critic_and_reward(tmp_path / "rm", lora=biased)
    with pytest.raises(ValueError, match="use --lora_train_bias none for PPO"):
        _trainer(NaiveStrategy(seed=0), Actor.from_config(_gpt2_config(), lora=LoraSettings(rank=8)), critic,
                 reward_model=reward_model)
    with pytest.raises(UsageError) as info:  # the script: before any model (here: none exists) loads
        _load_example().main(["--pretrain", str(tmp_path / "no_model_here"), "--prompt_dataset", "p",
                              "--reward_fn", "tests/dist_ppo.py:target_share", "--lora_rank", "4",
                              "--lora_train_bias", bias])
    assert str(info.value) == (f"--lora_train_bias {bias} trains the base model's own biases, which PPO's "
                               f"reference policy (the actor with its adapter off) and a shared reward model run "
                               f"on; use --lora_train_bias none for PPO")


def test_rollouts_ignore_the_checkpoints_generation_config(tmp_path):
    """A checkpoint whose generation_config.json penalises repeats, suppresses tokens, bans repeated bigrams and
    forces a length rolls out exactly the tokens of a clean copy: rollouts sample only what coati's flags say."""
    from transformers import GenerationConfig

    torch.manual_seed(0)
    Actor.from_config(h.config()).model.save_pretrained(tmp_path / "clean")
    shutil.copytree(tmp_path / "clean", tmp_path / "dirty")
    suppressed = [h.TARGET_ID, 40, 41, 42]
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, repetition_penalty=1.3,
                     suppress_tokens=suppressed, no_repeat_ngram_size=2, min_new_tokens=8,
                     do_sample=True, top_k=5).save_pretrained(tmp_path / "dirty")
    prompts, _ = h.loaders(NaiveStrategy(seed=0))
    batch = next(iter(prompts))
    rollouts = {}
    for name in ("clean", "dirty"):
        actor = Actor.from_pretrained(tmp_path / name)
        maker = ExperienceMaker(actor, Critic.from_config(h.config()), initial_model=copy.deepcopy(actor),
                                tokenizer=tiny.tokenizer("llama"), reward_fn=h.target_share, max_new_tokens=8)
        torch.manual_seed(1)
        rollouts[name] = maker.make_experience(batch)
    assert actor.model.generation_config.repetition_penalty == 1.3  # the dirty settings did load
    clean, dirty = rollouts["clean"], rollouts["dirty"]
    assert torch.equal(clean.sequences, dirty.sequences)
    assert torch.equal(clean.action_log_probs, dirty.action_log_probs)
    actions = dirty.sequences[:, -dirty.num_actions:][dirty.action_mask.bool()]
    assert torch.isin(actions, torch.tensor(suppressed)).any()  # suppress_tokens did not apply
    assert (dirty.action_mask.sum(-1) < 8).any()  # nor min_new_tokens


def test_old_and_reference_log_probs_are_those_of_the_tempered_distribution():
    """With --temperature 0.7 the stored old log-probs, and the reference's, equal log_softmax(logits / 0.7)
    of the sampled tokens, computed here row by row, unpadded, from the plain HF model."""
    strategy = NaiveStrategy(seed=0)
    actor, critic = h.models(seed=0)
    prompts, _ = h.loaders(strategy)
    trainer = _trainer(strategy, actor, critic, reward_fn=h.target_share, temperature=0.7)
    maker = trainer.experience_maker
    exp = maker.make_experience(next(iter(prompts)))
    with torch.no_grad():
        ref = maker._ref_log_probs(exp.sequences, exp.attention_mask, exp.num_actions)
    for row in range(exp.sequences.size(0)):
        ids = exp.sequences[row][exp.attention_mask[row].bool()].unsqueeze(0)  # prompt + valid actions
        k = int(exp.action_mask[row].sum())
        with torch.no_grad():
            logits = actor.model(input_ids=ids).logits[0, -k - 1:-1]
        tokens = ids[0, -k:].unsqueeze(-1)
        want = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens).squeeze(-1)
        torch.testing.assert_close(exp.action_log_probs[row, :k], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(ref[row, :k], want, atol=1e-5, rtol=0)
        untempered = torch.log_softmax(logits, -1).gather(-1, tokens).squeeze(-1)
        assert (untempered - want).abs().max() > 1e-3  # the temperature matters for these numbers
