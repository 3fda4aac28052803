"""8-bit / 4-bit (bitsandbytes, CPU) LoRA training: SFT loss falls, only adapters and value heads get
gradients, exports reload to the trained model's logits, and 4-bit PPO with one shared critic / reward base
raises the reward while holding two base copies instead of four.

Tolerances of the merged export against the adapter model it came from:
  4-bit: 1e-4. Training-time NF4 layers dequantize their weights and compute in fp32 (CPU), so the merged
         fp32 copy of the dequantized base computes the same numbers up to float summation order.
  8-bit: 3e-2 on logits of magnitude ~1. LLM.int8 also rounds the *activations* to int8 (via fp16) inside
         every layer at run time, which no set of full-precision weights reproduces.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")
if int(__import__("transformers").__version__.split(".")[0]) < 5 and not torch.cuda.is_available():
    pytest.skip("transformers 4.x quantizes with bitsandbytes on GPU only", allow_module_level=True)

from coati.errors import UsageError  # noqa: E402
from coati.models import Actor, LoraSettings, RewardModel, lora_targets  # noqa: E402
from coati.models.quant import base_weight_storages, bnb_config, check_strategy_support, quant_mode  # noqa: E402
from coati.trainer.ppo import PPOTrainer  # noqa: E402
from coati.trainer.strategies import NaiveStrategy  # noqa: E402
from tests import dist_ppo as h  # noqa: E402
from tests import tiny  # noqa: E402
from tests.scripts import load_script, torchrun  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MERGE_ATOL = {"4bit": 1e-4, "8bit": 3e-2}
IDS = torch.tensor([[1, 450, 4996, 17354, 1701, 432, 29889, 13, 3492], [1, 1724, 338, 278, 7483, 310, 3444, 29973, 2]])


def _script(name):
    return load_script(f"examples/{name}.py")


def _logits(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return (out.logits if hasattr(out, "logits") else out).float()


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_kbit_lora_sft_learns_and_exports(family, quant, tiny_llama_dir, tiny_neox_dir, shared_data, tmp_path):
    base = tiny_llama_dir if family == "llama" else tiny_neox_dir
    ids = IDS % 32000
    out = tmp_path / "sft"
    # --lora_target_modules: the family's layers plus the (unquantized) LM head, which a random tiny model needs
    # to move its output distribution in a few steps
    targets = ",".join(lora_targets(family) + ["lm_head"])
    _script("train_sft").main([
        "--pretrain", str(base), "--model", family, "--dataset", str(shared_data / "sft" / "alpaca_en_demo.json"),
        "--max_datasets_size", "9", "--max_len", "128", "--batch_size", "4", "--accumulation_steps", "1",
        "--max_epochs", "4", "--lr", "2e-2", "--warmup_ratio", "0", "--log_interval", "1", "--quant", quant,
        "--lora_rank", "8", "--lora_target_modules", targets, "--no-merge_lora_weights", "--save_path", str(out)])
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    assert len(losses) == 8
    assert losses[0] > 10.0 and sum(losses[-2:]) / 2 < losses[0] - 1.5, losses  # from ~ln(vocab) = 10.4-10.8
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()

    # the trained model: the same quantized base plus the saved adapter
    lora = LoraSettings(rank=8, target_modules=targets.split(","))
    trained = Actor.from_pretrained(base, family=family, quant=quant, lora=lora)
    trained.load_weights(out)
    assert quant_mode(trained) == quant
    # only LoRA parameters train, and only they receive gradients
    trained.train()
    logits = trained(ids, torch.ones_like(ids))
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    with_grad = {n for n, p in trained.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert with_grad == trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * sum(1 for n, _ in trained.named_modules() if n.endswith(".lora_A"))
    trained.eval()
    want = _logits(trained, ids)

    # merged export (into the dequantized training base) reloads in plain transformers
    from transformers import AutoModelForCausalLM

    merge = _script("merge_lora")
    merged_dir = merge.main([str(out), str(tmp_path / "merged"), "--quant", quant])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert getattr(merged.config, "quantization_config", None) is None and quant_mode(merged) is None
    deq_diff = (_logits(merged, ids) - want).abs().max().item()
    assert deq_diff < MERGE_ATOL[quant]
    base_diff = (_logits(AutoModelForCausalLM.from_pretrained(base), ids) - want).abs().max().item()
    assert base_diff > 5 * MERGE_ATOL[quant]  # the adapter changed the model: the comparison means something
    if quant == "4bit":
        # merged into the original weights instead, the quantization error shows
        orig = AutoModelForCausalLM.from_pretrained(merge.main([str(out), str(tmp_path / "orig")]))
        assert (_logits(orig, ids) - want).abs().max().item() > 100 * deq_diff

    # the adapter alone loads with plain peft on the quantized base
    from peft import PeftModel

    qbase = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb_config(quant), device_map={"": "cpu"},
                                                 dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(qbase, str(out)).train()  # train mode: bitsandbytes' training layout
    assert (_logits(peft_model, ids) - want).abs().max().item() < MERGE_ATOL[quant]


def test_value_head_stays_fp32_and_trains_with_lora_only(tiny_llama_dir):
    settings = LoraSettings(rank=4, target_modules=["q_proj", "v_proj"])
    rm = RewardModel.from_pretrained(tiny_llama_dir, quant="4bit", lora=settings)
    assert rm.value_head.weight.dtype == torch.float32
    mask = torch.ones_like(IDS)
    rm(IDS, mask).sum().backward()
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    # target_modules override: only q_proj / v_proj carry adapters (2 layers x 2 modules x A, B)
    lora = {n for n in trainable if ".lora_" in n}
    assert len(lora) == 8 and all(".q_proj." in n or ".v_proj." in n for n in lora)
    assert trainable == lora | {"value_head.weight", "value_head.bias"}
    with_grad = {n for n, p in rm.named_parameters() if p.grad is not None}
    nonzero = {n for n in with_grad if rm.get_parameter(n).grad.abs().sum() > 0}
    # B starts at zero, so the first gradient reaches B and the head; A's gradient is exactly zero then
    assert with_grad == trainable
    assert nonzero == {n for n in lora if ".lora_B." in n} | {"value_head.weight", "value_head.bias"}


def test_quant_refusals(tiny_llama_dir):
    with pytest.raises(ValueError, match="--lora_rank > 0"):
        Actor.from_pretrained(tiny_llama_dir, quant="4bit")
    with pytest.raises(ValueError, match="choose one of 8bit, 4bit"):
        Actor.from_pretrained(tiny_llama_dir, quant="3bit", lora=LoraSettings(rank=2))
    for name in ("fsdp", "colossalai_zero2", "colossalai_gemini"):
        with pytest.raises(ValueError, match=f"naive or ddp, not {name}"):
            check_strategy_support(name, quant="8bit")
        with pytest.raises(ValueError, match="share_critic_reward_base"):
            check_strategy_support(name, share_base=True)
    for name in ("naive", "ddp"):
        check_strategy_support(name, quant="4bit", share_base=True)
    sft = _script("train_sft")
    argv = ["--pretrain", str(tiny_llama_dir), "--dataset", "unused.json", "--quant", "4bit"]
    with pytest.raises(UsageError, match="--lora_rank > 0"):
        sft.main(argv)
    with pytest.raises(UsageError, match="naive or ddp, not fsdp"):
        sft.main(argv + ["--lora_rank", "4", "--strategy", "fsdp"])
    args = sft.build_parser().parse_args(argv + ["--lora_target_modules", "q_proj,v_proj", "o_proj"])
    from coati.cli import lora_settings

    assert lora_settings(args).target_modules == ["q_proj", "v_proj", "o_proj"]


def _reward_model_dir(tmp_path):
    from tests.test_ppo import _train_reward_model

    rm, acc = _train_reward_model(steps=120)
    assert acc > 0.8
    rm.save_pretrained(tmp_path / "rm")
    torch.manual_seed(0)
    Actor.from_config(h.config()).save_pretrained(tmp_path / "sft", tokenizer=tiny.tokenizer("llama"))
    return tmp_path / "rm", tmp_path / "sft"


def test_4bit_ppo_with_shared_critic_reward_base(tmp_path):
    from tests.test_ppo import _left_pad, _rm_pairs

    rm_dir, sft_dir = _reward_model_dir(tmp_path)
    prompts_mod = _script("train_prompts")
    argv = ["--pretrain", str(sft_dir), "--rm_path", str(rm_dir), "--prompt_dataset", "unused", "--quant", "4bit",
            "--lora_rank", "8", "--lora_target_modules", "q_proj,v_proj,down_proj,lm_head"]

    # memory: without sharing the actor (= reference), critic and reward model hold 3 bases; shared, 2
    actor, critic, reward_model = prompts_mod.build_models(prompts_mod.build_parser().parse_args(argv))
    layers = len(base_weight_storages(actor.model, frozen_only=False))
    assert layers == 2 * 7  # 2 decoder layers x (q, k, v, o, gate, up, down)
    assert len(base_weight_storages(actor, critic, reward_model.model)) == 3 * layers
    del actor, critic, reward_model
    args = prompts_mod.build_parser().parse_args(argv + ["--share_critic_reward_base"])
    actor, critic, reward_model = prompts_mod.build_models(args)
    assert quant_mode(actor) == quant_mode(critic) == quant_mode(reward_model.model) == "4bit"
    critic_base = base_weight_storages(critic)
    assert critic_base == base_weight_storages(reward_model.model) and len(critic_base) == layers
    assert len(base_weight_storages(actor, critic, reward_model.model)) == 2 * layers
    assert critic.value_head.weight.dtype == torch.float32 and critic.value_head.weight.requires_grad
    for model in (actor, reward_model):  # what FSDP / ColossalAI prepare_model calls refuse
        with pytest.raises(ValueError, match="naive or ddp, not fsdp"):
            check_strategy_support("fsdp", model=model)
    # the shared reward model is the trained reward model (quantized): it still ranks the pairs
    chosen, rejected = _rm_pairs(64, torch.Generator().manual_seed(99))
    with torch.no_grad():
        acc = (reward_model(*_left_pad(chosen)) > reward_model(*_left_pad(rejected))).float().mean().item()
    assert acc > 0.8

    strategy = NaiveStrategy(seed=0)
    prompts, _ = h.loaders(strategy)
    trainer = PPOTrainer(strategy, actor, critic, reward_model, tokenizer=tiny.tokenizer("llama"), num_episodes=15,
                         save_path=str(tmp_path / "ppo"), **{**h.PPO_KW, "lr": 5e-3, "critic_lr": 5e-3})
    assert trainer.initial_model is None  # reference = the actor's quantized base with the adapter off
    true_share = []
    make = trainer.experience_maker.make_experience

    def recording(batch):
        exp = make(batch)
        true_share.append(sum(h.target_share(None, trainer.experience_maker.decode_responses(
            exp.sequences, exp.action_mask))) / exp.sequences.size(0))
        return exp

    trainer.experience_maker.make_experience = recording
    hist = trainer.fit(prompts)
    scores = [m["critic/score/mean"] for m in hist]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 1.0, scores
    assert sum(true_share[-3:]) / 3 > sum(true_share[:3]) / 3 + 0.3, true_share
    # the reward model stayed frozen: its value head and adapter-free base are untouched
    assert not any(p.requires_grad for p in reward_model.parameters())
    with torch.no_grad():
        acc_after = (reward_model(*_left_pad(chosen)) > reward_model(*_left_pad(rejected))).float().mean().item()
    assert acc_after == acc

    # final save: full-precision merged dirs; the critic's holds only its own adapter, not the reward model's
    from transformers import AutoModelForCausalLM

    from coati.models import Critic

    ids = torch.tensor([[1, 40, 50, 58, 58, 12]])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")
    torch.testing.assert_close(_logits(hf, ids), _logits(actor.eval(), ids), atol=1e-4, rtol=0)
    saved_critic = Critic.from_pretrained(tmp_path / "ppo" / "critic")
    with torch.no_grad():
        torch.testing.assert_close(saved_critic(ids), critic.eval()(ids), atol=1e-4, rtol=0)


@pytest.mark.dist
def test_ddp_4bit_sft_matches_single_process(tiny_llama_dir, shared_data, tmp_path):
    import os
    import subprocess

    def run(launcher, extra, save):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        cmd = [*launcher, str(ROOT / "examples" / "train_sft.py"), *extra, "--pretrain", str(tiny_llama_dir),
               "--dataset", str(shared_data / "sft" / "alpaca_en_demo.json"), "--max_datasets_size", "16",
               "--max_len", "128", "--max_epochs", "1", "--lr", "1e-2", "--log_interval", "1", "--seed", "7",
               "--accumulation_steps", "1",
               "--quant", "4bit", "--lora_rank", "8", "--save_path", str(tmp_path / save)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        rows = map(json.loads, (tmp_path / save / "metrics.jsonl").read_text().splitlines())
        return [r["loss"] for r in rows if r["split"] == "train"]

    launcher = torchrun(2)
    single = run([sys.executable], ["--strategy", "naive", "--batch_size", "4"], "naive")
    ddp = run(launcher, ["--strategy", "ddp", "--batch_size", "2"], "ddp")
    assert len(single) == len(ddp) >= 3
    assert ddp == pytest.approx(single, abs=1e-4)
    assert single[-1] < single[0]


def test_fsdp_prepare_model_refuses_a_quantized_model(tiny_llama_dir):
    """Library users who skip the scripts' up-front check get the same refusal from the strategy itself."""
    from coati.models import Actor, LoraSettings
    from coati.trainer.strategies.fsdp import FSDPStrategy

    actor = Actor.from_pretrained(str(tiny_llama_dir), lora=LoraSettings(rank=4), quant="8bit")
    strategy = FSDPStrategy.__new__(FSDPStrategy)  # no process group needed: the check runs before sharding
    with pytest.raises(ValueError, match="--quant 8bit works with --strategy naive or ddp, not fsdp"):
        strategy.prepare_model(actor)
