"""Precision on real-style checkpoints: a bf16 checkpoint trains on fp32 masters (same losses as its fp32 copy,
small updates kept), frozen weights follow --frozen_dtype, and saves go back to the checkpoint's dtype."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from coati.models import Actor, Critic, LoraSettings, RewardModel
from coati.models.loading import resolve_frozen_dtype
from coati.trainer import SFTTrainer
from coati.trainer.strategies import NaiveStrategy
from tests import tiny
from tests.scripts import load_script

VOCAB = 128
LORA = LoraSettings(rank=4)
# Both runs start from the same fp32 values and compute the same fp32 ops: they agree to float round-off.
SAME_CURVE_ATOL = 1e-6


def _write_bf16_checkpoint(path: Path, **overrides) -> Path:
    """A tiny LLaMA stored as published checkpoints are: bf16 weights, config written by transformers 4.x
    (``torch_dtype``, not ``dtype``)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.llama_config(vocab_size=VOCAB, dtype="bfloat16", **overrides))
    assert model.dtype == torch.bfloat16
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype")
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return _write_bf16_checkpoint(tmp_path_factory.mktemp("bf16"))


@pytest.fixture(scope="module")
def fp32_dir(bf16_dir, tmp_path_factory):
    """The same weights as ``bf16_dir``, upcast to fp32 and saved with an fp32 config."""
    path = tmp_path_factory.mktemp("fp32")
    model = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16).float()
    model.save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["dtype"] == "float32"
    return path


def _sft_loader(strategy, n=8, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt tokens masked, as SFTDataset does
    rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": lab} for i, lab in zip(ids, labels)]
    return strategy.setup_dataloader(rows, 2, shuffle=True, drop_last=True,
                                     collate_fn=lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]})


def _sft(model_dir, *, lr=1e-3, steps=4, mixed_precision=None, **trainer_kw):
    strategy = NaiveStrategy(seed=0, mixed_precision=mixed_precision)
    model = strategy.prepare_model(Actor.from_pretrained(model_dir))
    trainer = SFTTrainer(model, strategy, _sft_loader(strategy), lr=lr, warmup_ratio=0.0, max_steps=steps,
                         log_interval=1, **trainer_kw)
    trainer.fit()
    return model, [h["loss"] for h in trainer.history]


def _file_dtypes(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def _dtypes(params) -> set[torch.dtype]:
    return {p.dtype for p in params}


def test_bf16_checkpoint_trains_like_its_fp32_copy(bf16_dir, fp32_dir):
    _, bf16_losses = _sft(bf16_dir)
    _, fp32_losses = _sft(fp32_dir)
    assert len(bf16_losses) == 4
    assert bf16_losses == pytest.approx(fp32_losses, abs=SAME_CURVE_ATOL, rel=0)
    assert bf16_losses[-1] < bf16_losses[0]


@pytest.mark.parametrize("mixed_precision", [None, "bf16"])
def test_small_learning_rate_still_moves_every_weight(bf16_dir, mixed_precision):
    """With or without bf16 autocast, the optimizer updates fp32 masters."""
    lr, steps = 1e-6, 3
    start = {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(bf16_dir).state_dict().items()}
    model, _ = _sft(bf16_dir, lr=lr, steps=steps, mixed_precision=mixed_precision)
    after = model.model.state_dict()
    assert _dtypes(after.values()) == {torch.float32}
    layer_keys = [k for k in start if ".layers." in k]
    assert layer_keys
    for k in layer_keys:
        change = float((after[k] - start[k]).abs().max())
        # Adam moves each weight by at most ~lr per step; bf16 (spacing >= 1e-4 at these weights) rounds that away
        assert 0 < change <= steps * lr * 1.01, (k, change)


@pytest.mark.parametrize("cls", [Actor, Critic, RewardModel])
def test_trainable_weights_are_fp32_masters(cls, bf16_dir):
    full = cls.from_pretrained(bf16_dir)
    assert full.source_dtype == torch.bfloat16
    assert _dtypes(full.parameters()) == {torch.float32}

    lora = cls.from_pretrained(bf16_dir, lora=LORA, frozen_dtype="bf16")
    trainable = [p for p in lora.parameters() if p.requires_grad]
    frozen = [p for p in lora.model.parameters() if not p.requires_grad]
    assert trainable and _dtypes(trainable) == {torch.float32}  # adapters (+ value head)
    assert _dtypes(frozen) == {torch.bfloat16}
    # the mixed model runs: bf16 base layers, fp32 adapters receiving fp32 gradients
    ids = torch.randint(3, VOCAB, (2, 6))
    out = lora(ids, attention_mask=torch.ones_like(ids))
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)

    # auto on this CPU: everything fp32
    assert _dtypes(cls.from_pretrained(bf16_dir, lora=LORA).parameters()) == {torch.float32}


def test_frozen_dtype_rule(bf16_dir, tmp_path):
    assert resolve_frozen_dtype("auto", torch.bfloat16, device="cuda") == torch.bfloat16
    assert resolve_frozen_dtype("auto", torch.bfloat16, device="cpu") == torch.float32
    assert resolve_frozen_dtype("fp16", torch.bfloat16, device="cpu") == torch.float16
    assert resolve_frozen_dtype("fp32", torch.bfloat16, device="cuda") == torch.float32
    with pytest.raises(ValueError, match="frozen dtype"):
        resolve_frozen_dtype("int8", torch.bfloat16)

    reward = RewardModel.from_pretrained(bf16_dir, frozen=True, frozen_dtype="bf16")
    assert _dtypes(reward.model.parameters()) == {torch.bfloat16} and reward.value_head.weight.dtype == torch.float32
    assert _dtypes(RewardModel.from_pretrained(bf16_dir, frozen=True).model.parameters()) == {torch.float32}

    # LoRA training base biases: those biases train, so the base they live in loads fp32
    biased = _write_bf16_checkpoint(tmp_path / "biased", attention_bias=True)
    actor = Actor.from_pretrained(biased, lora=LoraSettings(rank=4, train_bias="all"), frozen_dtype="bf16")
    trained_biases = [p for n, p in actor.named_parameters() if p.requires_grad and n.endswith(".bias")]
    assert trained_biases and _dtypes(p for p in actor.parameters() if p.requires_grad) == {torch.float32}


def test_ppo_script_models_follow_frozen_dtype(bf16_dir):
    mod = load_script("examples/train_prompts.py")
    base = ["--pretrain", str(bf16_dir), "--rm_pretrain", str(bf16_dir), "--prompt_dataset", "p"]
    args = mod.build_parser().parse_args(base + ["--frozen_dtype", "bf16"])
    actor, critic, reward_model = mod.build_models(args)
    reference = mod.build_reference(args)
    assert _dtypes(actor.parameters()) == _dtypes(critic.parameters()) == {torch.float32}
    assert _dtypes(reference.parameters()) == _dtypes(reward_model.model.parameters()) == {torch.bfloat16}
    lora = mod.build_parser().parse_args(base + ["--lora_rank", "4", "--frozen_dtype", "bf16"])
    assert mod.build_reference(lora) is None  # the actor's frozen (bf16) base with the adapter off
    auto = mod.build_parser().parse_args(base)
    assert auto.frozen_dtype == "auto" and _dtypes(mod.build_reference(auto).parameters()) == {torch.float32}


def test_final_save_is_bf16_and_checkpoints_keep_fp32_masters(bf16_dir, tmp_path):
    out = tmp_path / "sft"
    model, _ = _sft(bf16_dir, steps=2, save_path=str(out), save_interval=2)
    masters = model.model.state_dict()
    assert _dtypes(masters.values()) == {torch.float32}

    assert _file_dtypes(out / "model.safetensors") == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, masters[k].to(torch.bfloat16)), k

    # the resume checkpoint holds the masters themselves
    ckpt = out / "checkpoints" / "step_2" / "model"
    assert _file_dtypes(ckpt / "model.safetensors") == {"F32"}
    exact = AutoModelForCausalLM.from_pretrained(ckpt)
    assert all(torch.equal(v, masters[k]) for k, v in exact.state_dict().items())


@pytest.mark.parametrize("cls", [Actor, RewardModel])
def test_lora_merged_save_is_bf16_with_fp32_value_head(cls, bf16_dir, tmp_path):
    model = cls.from_pretrained(bf16_dir, lora=LORA)
    assert _dtypes(model.parameters()) == {torch.float32}  # auto on CPU: the base too; merged there in fp32
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(tmp_path / "merged", merge_lora=True)
    assert _file_dtypes(tmp_path / "merged" / "model.safetensors") == {"BF16"}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    if cls is RewardModel:
        assert _file_dtypes(tmp_path / "merged" / "value_head.safetensors") == {"F32"}
        again = RewardModel.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(again(ids, mask), model(ids, mask), atol=2e-2, rtol=0)
    else:
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        assert again.dtype == torch.bfloat16
        with torch.no_grad():
            torch.testing.assert_close(again(ids).logits.float(), model(ids), atol=2e-2, rtol=0)
    assert any(p.requires_grad for p in model.parameters())  # the live model keeps its adapters
