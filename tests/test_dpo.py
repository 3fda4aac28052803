"""DPOTrainer on real pairs with a briefly SFT-trained tiny model: held-out preference accuracy and margin rise,
the adapter-off reference is the base model, precomputed reference log-probs give the on-the-fly loss curve,
KTO trains, ORPO / SimPO hold one model, resume is exact."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from coati.dataset import (
    PreferenceCollator, PreferenceDataset, SFTCollator, SFTDataset, UnpairedPreferenceCollator,
    UnpairedPreferenceDataset, split_dataset,
)
from coati.models import Actor, LoraSettings
from coati.trainer import DPOTrainer, PreferenceConfig, SFTTrainer
from coati.trainer import dpo as dpo_module
from coati.trainer.dpo import sequence_logps
from coati.trainer.strategies import NaiveStrategy
from tests import tiny

MAX_LEN = 96


@pytest.fixture(scope="module")
def sft_dir(shared_data, llama2_tokenizer, tmp_path_factory):
    """A tiny LLaMA after a few SFT steps on the chosen replies (DPO starts from an SFT model). The real pairs are
    tokenized with LLaMA-2's tokenizer, whose lengths MAX_LEN was chosen for."""
    base = tiny.save_tiny_model("llama", tmp_path_factory.mktemp("dpo_base"))
    tok = llama2_tokenizer
    raw = json.loads((shared_data / "preference" / "dpo_en_demo.json").read_text())
    sft = SFTDataset([{"conversations": r["conversations"] + [r["chosen"]]} for r in raw], tok, max_len=MAX_LEN)
    strategy = NaiveStrategy(seed=0)
    model = strategy.prepare_model(Actor.from_pretrained(str(base)))
    dl = strategy.setup_dataloader(sft, 8, shuffle=True, collate_fn=SFTCollator(tok.pad_token_id), drop_last=True)
    out = tmp_path_factory.mktemp("dpo_sft")
    SFTTrainer(model, strategy, dl, None, lr=3e-3, max_steps=8, log_interval=100, tokenizer=tok).fit()
    model.save_pretrained(out, tokenizer=tok)
    return out


@pytest.fixture(scope="module")
def pairs(shared_data, llama2_tokenizer):
    tok = llama2_tokenizer
    ds = PreferenceDataset(shared_data / "preference" / "dpo_en_demo.json", tok, max_len=MAX_LEN)
    train, held = split_dataset(ds, 0.25, seed=0)
    return tok, train, held


def _trainer(sft_dir, tok, train, held, *, config, lora=False, batch_size=8, seed=0, **kwargs):
    strategy = NaiveStrategy(seed=seed)
    actor = Actor.from_pretrained(str(sft_dir), lora=LoraSettings(rank=8) if lora else None)
    model = strategy.prepare_model(actor)
    collate = UnpairedPreferenceCollator(tok.pad_token_id) if config.loss_type == "kto" else \
        PreferenceCollator(tok.pad_token_id)
    dl = strategy.setup_dataloader(train, batch_size, shuffle=True, collate_fn=collate, drop_last=True)
    edl = strategy.setup_dataloader(held, 16, shuffle=False, collate_fn=collate) if held is not None else None
    kwargs.setdefault("log_interval", 100)
    return DPOTrainer(model, strategy, dl, edl, config=config, tokenizer=tok, **kwargs)


def test_dpo_raises_heldout_accuracy_and_margin(sft_dir, pairs):
    tok, train, held = pairs
    trainer = _trainer(sft_dir, tok, train, held, config=PreferenceConfig(beta=0.1), lr=1e-3, max_epochs=1)
    assert trainer.reference == "copy"
    before = trainer.evaluate()
    # dropout is off and the reference is the starting policy: every implicit reward is exactly 0
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["rewards/accuracies"] == 0.0 and before["rewards/margins"] == 0.0
    trainer.fit()
    after = trainer.eval_history[-1]
    assert after["rewards/accuracies"] >= 0.6, trainer.eval_history
    assert after["rewards/margins"] > 0.05 and after["loss"] < math.log(2)
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(trainer.history[-1])


def test_adapter_off_reference_is_the_base_model(sft_dir, pairs):
    tok, train, _ = pairs
    trainer = _trainer(sft_dir, tok, train, None, config=PreferenceConfig(beta=0.1), lora=True, lr=5e-3,
                       max_steps=2)
    assert trainer.reference == "adapter_off" and trainer.ref_model is None  # no second copy
    trainer.fit()
    batch = next(iter(trainer.train_dataloader))
    base = Actor.from_pretrained(str(sft_dir)).eval()
    with torch.no_grad():
        ref = trainer._reference_logps(batch)
        expect = sequence_logps(base, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
        policy = sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
    assert torch.allclose(ref, expect, atol=1e-6, rtol=0)
    assert (policy - expect).abs().max() > 1e-3  # the adapter trained, and is back on after the reference pass


def test_precomputed_reference_gives_the_same_loss_curve(sft_dir, pairs):
    tok, train, _ = pairs
    kw = dict(lr=1e-3, max_steps=3, batch_size=4)
    live = _trainer(sft_dir, tok, train, None, config=PreferenceConfig(beta=0.1), **kw).fit()
    trainer = _trainer(sft_dir, tok, train, None, config=PreferenceConfig(beta=0.1, precompute_ref_logps=True), **kw)
    assert trainer.reference == "precomputed" and trainer.ref_model is None
    assert dpo_module._base_dataset(train).ref_logps is not None
    pre = trainer.fit()
    assert [h["loss"] for h in pre] == pytest.approx([h["loss"] for h in live], abs=1e-5)
    assert pre[-1]["loss"] < pre[0]["loss"]


def test_kto_trains_on_unpaired_samples(sft_dir, shared_data, llama2_tokenizer):
    tok = llama2_tokenizer
    ds = UnpairedPreferenceDataset(shared_data / "preference" / "kto_en_demo.json", tok, max_len=MAX_LEN,
                                   max_datasets_size=64)
    cfg = PreferenceConfig(loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.2)
    trainer = _trainer(sft_dir, tok, ds, ds, config=cfg, lr=1e-3, max_steps=6, eval_interval=100)
    before = trainer.evaluate()
    trainer.fit()
    after = trainer.eval_history[-1]
    assert after["loss"] < before["loss"] - 0.01, (before, after)
    assert after["rewards/margins"] > before["rewards/margins"]
    assert "kl" in trainer.history[-1] and trainer.history[-1]["kl"] >= 0


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_reference_free_losses_hold_one_model(loss_type, sft_dir, pairs, monkeypatch):
    def no_copy(*_):
        raise AssertionError("a reference copy was made")

    monkeypatch.setattr(dpo_module, "copy", SimpleNamespace(deepcopy=no_copy))
    tok, train, _ = pairs
    cfg = PreferenceConfig(loss_type=loss_type, beta=2.0 if loss_type == "simpo" else 0.1)
    trainer = _trainer(sft_dir, tok, train, None, config=cfg, lr=1e-3, max_steps=4, batch_size=4)
    assert trainer.ref_model is None and trainer.reference == "none"
    with pytest.raises(ValueError, match="uses no reference"):
        _trainer(sft_dir, tok, train, None, config=cfg, ref_model=trainer.model)
    history = trainer.fit()
    assert history[-1]["loss"] < history[0]["loss"]


def test_resume_is_exact(sft_dir, pairs, tmp_path):
    tok, train, _ = pairs

    def run(path, resume=None):
        trainer = _trainer(sft_dir, tok, train, None, config=PreferenceConfig(beta=0.1), lr=1e-3, max_steps=4,
                           batch_size=4, accumulation_steps=2, save_path=str(path), save_interval=2)
        return trainer.fit(resume_from=resume)

    full = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=tmp_path / "a" / "checkpoints" / "step_2")
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]
    assert [h["loss"] for h in resumed[2:]] == pytest.approx([h["loss"] for h in full[2:]], abs=1e-6)
