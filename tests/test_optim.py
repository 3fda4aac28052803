"""--optim: LOMO is SGD fused into backward (clipping and the LR schedule included) and keeps no gradient, AdaLomo
steps by its published formula and resumes exactly, 8-bit AdamW steps on CPU, SFT and GRPO learn the built-in task
with AdaLomo, PPO trains actor and critic with LOMO, and what cannot work is refused in one line."""
import copy
import math
import subprocess
import sys

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from coati.errors import MissingDependencyError, UsageError
from coati.models import Actor
from coati.models.loss import GPTLMLoss
from coati.trainer import optim
from coati.trainer.base import LRSchedule
from coati.trainer.ppo import PPOTrainer
from coati.trainer.strategies import NaiveStrategy
from tests import dist_ppo as h
from tests import tiny
from tests.test_script_errors import ROOT, _env

BATCHES = [torch.randint(3, h.VOCAB, (4, 12), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def _model(seed: int = 0, grad_checkpoint: bool = False, **config) -> Actor:
    torch.manual_seed(seed)
    return Actor.from_config(tiny.llama_config(vocab_size=h.VOCAB, **config), grad_checkpoint=grad_checkpoint)


def _loss(model: Actor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss, through the chunked LM head the trainers use (its gradients computed in forward)."""
    log_probs = model(ids, labels=ids, reduction="sum")
    return GPTLMLoss().from_log_probs(log_probs, ids, reduction="sum") / (ids.shape[0] * (ids.shape[1] - 1))


@pytest.mark.parametrize("clip, warmup, tied", [(0.0, 0.0, False), (0.5, 0.5, True)])
def test_lomo_is_sgd_fused_into_backward_and_keeps_no_gradient(clip, warmup, tied):
    """Fixed lr without clipping, and a warmup + linear schedule with the global-norm clip (lomo-optim's first
    backward, the graph kept), tied embeddings and gradient checkpointing: the weights of plain SGD +
    clip_grad_norm_ + the same schedule, to 1e-6 in fp32."""
    model = _model(tie_word_embeddings=tied, grad_checkpoint=tied)
    ref, start = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    strategy = NaiveStrategy(seed=0, grad_clip=clip)
    lomo = optim.make_optimizer("lomo", model, 0.5, strategy=strategy)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.5)
    lomo_sched, sgd_sched = (LambdaLR(o, LRSchedule(len(BATCHES), warmup, "linear")) for o in (lomo, sgd))
    for ids in BATCHES:
        strategy.backward(_loss(model, ids), model, lomo)
        norm = strategy.optimizer_step(lomo, model, lomo_sched)
        assert all(p.grad is None for p in model.parameters())
        _loss(ref, ids).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip or math.inf)
        sgd.step()
        sgd.zero_grad(set_to_none=True)
        sgd_sched.step()
        assert math.isnan(norm) if not clip else norm == pytest.approx(float(ref_norm), rel=1e-5)
    assert lomo_sched.get_last_lr() == sgd_sched.get_last_lr()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    assert max(float((p.detach() - start[n]).abs().max()) for n, p in model.named_parameters()) > 1e-3  # trained


def _rms(t: torch.Tensor) -> float:
    return float(t.norm() / math.sqrt(t.numel()))


def test_adalomo_steps_by_its_formula_and_resumes_exactly():
    """AdaLomo (Lv et al. 2023, Algorithm 1, as lomo-optim's defaults set it): at step t, beta = 1 - t^-0.8; a matrix
    keeps row / column means of g^2 + 1e-30 (r, c) and divides g by sqrt(r c^T / mean(r)), a vector keeps the
    mean of g^2 + 1e-30 itself; the update is scaled to RMS <= 1, and the step is lr * max(1e-3, RMS(w)), with
    decoupled weight decay at the same step. Written here from the paper, checked against two steps."""
    model, lr, wd = _model(), 0.05, 0.1
    ref = copy.deepcopy(model)
    strategy = NaiveStrategy(seed=0, grad_clip=0.0)
    opt = optim.make_optimizer("adalomo", model, lr, wd, strategy=strategy)
    rows, cols, vecs = {}, {}, {}
    for t, ids in enumerate(BATCHES[:2], start=1):
        strategy.backward(_loss(model, ids), model, opt)
        strategy.optimizer_step(opt, model)
        assert all(p.grad is None for p in model.parameters())
        ref.zero_grad(set_to_none=True)
        _loss(ref, ids).backward()
        beta = 1.0 - t ** -0.8
        with torch.no_grad():
            for name, p in ref.named_parameters():
                sq = p.grad * p.grad + 1e-30
                if p.dim() == 2:
                    rows[name] = beta * rows.get(name, 0.0) + (1 - beta) * sq.mean(1)
                    cols[name] = beta * cols.get(name, 0.0) + (1 - beta) * sq.mean(0)
                    v = rows[name][:, None] * cols[name][None, :] / rows[name].mean()
                else:
                    vecs[name] = beta * vecs.get(name, 0.0) + (1 - beta) * sq
                    v = vecs[name]
                u = p.grad / v.sqrt()
                u = u / max(1.0, _rms(u))
                step = lr * max(1e-3, _rms(p))
                p.mul_(1 - step * wd).sub_(step * u)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    # its moments live outside optimizer.state: the state dict carries them, and a new optimizer resumes them
    state = opt.state_dict()
    other = _model(seed=1)
    other.load_state_dict(model.state_dict())
    resumed = optim.make_optimizer("adalomo", other, lr, wd, strategy=strategy)
    resumed.load_state_dict(state)
    assert resumed.step_num == opt.step_num == 2
    for ids in BATCHES[2:]:
        for m, o in ((model, opt), (other, resumed)):
            strategy.backward(_loss(m, ids), m, o)
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_8bit_adamw_steps_on_cpu_and_the_loss_falls(name):
    model, strategy = _model(), NaiveStrategy(seed=0)
    opt = optim.make_optimizer(name, model, 3e-3, strategy=strategy)
    losses = []
    for _ in range(12):
        loss = _loss(model, BATCHES[0])
        strategy.backward(loss, model, opt)
        strategy.optimizer_step(opt, model)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5, losses
    moments = [v for s in opt.state.values() for k, v in s.items() if k in ("state1", "state2")]
    assert moments and any(v.dtype == torch.uint8 for v in moments)  # the 4096+ element weights: 8-bit moments


def test_sft_loss_falls_and_grpo_reward_rises_on_the_builtin_task_with_adalomo(tmp_path, monkeypatch):
    from coati.pipeline.run import main

    built = []
    adalomo = optim.BUILDERS["adalomo"]
    monkeypatch.setitem(optim.BUILDERS, "adalomo", lambda *a, **k: built.append(1) or adalomo(*a, **k))
    summary = main(["--quick", "--algo", "grpo", "--optim", "adalomo", "--sft_lr", "0.05", "--rl_lr", "3e-3",
                    "--sft_steps", "300", "--rl_episodes", "30", "--output_dir", str(tmp_path), "--seed", "0"])
    assert len(built) == 2  # the SFT model's and GRPO's policy's optimizer
    assert summary["sft_loss_end"] < 0.3 * summary["sft_loss_start"]
    assert summary["sft_accuracy"] > 0.2
    assert summary["grpo_accuracy"] > summary["sft_accuracy"] + 0.05  # sampled accuracy = the checker's reward


def test_ppo_updates_actor_and_critic_inside_backward_with_lomo():
    strategy = NaiveStrategy(seed=0)
    actor, critic = h.models(seed=0)
    start = [copy.deepcopy(m.state_dict()) for m in (actor, critic)]
    prompts, _ = h.loaders(strategy)
    trainer = PPOTrainer(strategy, actor, critic, tokenizer=tiny.tokenizer("llama"), reward_fn=h.target_share,
                         optim="lomo", **{**h.PPO_KW, "num_episodes": 1, "lr": 1e-2, "critic_lr": 1e-2})
    assert [type(o).__name__ for o in (trainer.actor_optim, trainer.critic_optim)] == ["Lomo", "Lomo"]
    hist = trainer.fit(prompts)
    assert hist[-1]["actor/grad_norm"] > 0 and hist[-1]["critic/grad_norm"] > 0
    for model, before in zip((trainer.actor, trainer.critic), start):
        assert all(p.grad is None for p in model.parameters())
        assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(UsageError, match="PPO-ptx's second backward"):
        PPOTrainer(strategy, *h.models(seed=0), tokenizer=tiny.tokenizer("llama"), reward_fn=h.target_share,
                   optim="lomo", **h.PPO_KW).fit(*h.loaders(strategy, with_pretrain=True))


def test_missing_lomo_optim_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lomo_optim", None)
    with pytest.raises(MissingDependencyError, match=r"pip install coati\[lomo\]"):
        optim.make_optimizer("lomo", _model(), 1e-3)


# (script, flags, the reason the one line gives)
REFUSED = {
    "accumulation": ("train_sft", ["--optim", "lomo", "--accumulation_steps", "2"], "cannot accumulate micro-batches"),
    "lora": ("train_reward_model", ["--optim", "adalomo", "--lora_rank", "4"], "LoRA adapters have little"),
    "ddp": ("train_dpo", ["--optim", "lomo", "--strategy", "ddp"], "replicas would drift apart"),
    "fsdp": ("train_sft", ["--optim", "adamw_bnb_8bit", "--strategy", "fsdp"], "cannot step FSDP2's sharded"),
    "colossalai": ("train_sft", ["--optim", "adafactor", "--strategy", "colossalai_zero2"], "ColossalAI's plugins"),
    "ptx": ("train_prompts", ["--optim", "lomo", "--pretrain_dataset", "ptx.jsonl"], "PPO-ptx's second backward"),
    "fp16": ("colossal_llama/train", ["--optim", "lomo", "--plugin", "naive", "--accumulation_steps", "1"],
             "coati's fp16 computes under autocast"),
}
DATA = {"train_sft": ["--dataset", "d.jsonl"], "train_reward_model": ["--dataset", "d.jsonl"],
        "train_dpo": ["--dataset", "d.jsonl"], "train_prompts": ["--prompt_dataset", "p.jsonl", "--reward_fn", "f.py:f"],
        "colossal_llama/train": ["--dataset", "prepared"]}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_cannot_work_is_one_error_line_before_anything_loads(case, tmp_path):
    script, flags, why = REFUSED[case]
    model = ["--pretrained" if script.startswith("colossal") else "--pretrain", str(tmp_path / "no_model_here")]
    out = ["--save_dir" if script.startswith("colossal") else "--save_path", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, f"examples/{script}.py", *model, *out, *DATA[script], *flags], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --optim ") and why in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.dist
def test_lomo_under_fsdp_trains_as_one_process(tiny_llama_dir, shared_data, tmp_path):
    """FSDP2 hands each process its gradient shards only at the end of backward, where LOMO then updates them (its
    hooks see no gradient before): two processes with batch 2 still give one process's losses with batch 4,
    gradient clipping (the first backward's global norm) included."""
    from tests.scripts import torchrun
    from tests.test_dist_sft import _losses, _run

    common = ["examples/train_sft.py", "--pretrain", str(tiny_llama_dir), "--model", "llama", "--dataset",
              str(shared_data / "sft" / "alpaca_en_demo.json"), "--max_datasets_size", "32", "--max_len", "128",
              "--accumulation_steps", "1", "--optim", "lomo", "--lr", "1e-2", "--log_interval", "1", "--seed", "7"]
    _run([sys.executable, *common, "--batch_size", "4", "--save_path", str(tmp_path / "one")])
    _run(torchrun(2) + [*common, "--strategy", "fsdp", "--batch_size", "2", "--save_path", str(tmp_path / "fsdp")])
    one, fsdp = _losses(tmp_path / "one"), _losses(tmp_path / "fsdp")
    assert len(one) == len(fsdp) >= 6
    assert fsdp == pytest.approx(one, abs=1e-5)
    assert one[-1] < one[0]
