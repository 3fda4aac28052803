"""SFT and RM trainers on real data with tiny models: losses fall, accuracy rises, saves reload, resume is exact."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from coati.dataset import RewardCollator, RewardDataset, SFTCollator, SFTDataset, split_dataset
from coati.models import Actor, RewardModel
from coati.trainer import RewardModelTrainer, SFTTrainer, latest_checkpoint
from coati.trainer.strategies import NaiveStrategy
from coati.utils.tokenizer import load_tokenizer


def _sft_setup(model_dir, data_file, *, n=160, max_len=96, batch_size=8, seed=0, eval_ratio=0.2):
    strategy = NaiveStrategy(seed=seed)
    tok = load_tokenizer(str(model_dir))
    ds = SFTDataset(str(data_file), tok, max_len=max_len, max_datasets_size=n, seed=seed)
    train, held = split_dataset(ds, eval_ratio, seed)
    model = strategy.prepare_model(Actor.from_pretrained(str(model_dir)))
    collate = SFTCollator(tok.pad_token_id)
    train_dl = strategy.setup_dataloader(train, batch_size, shuffle=True, collate_fn=collate, drop_last=True)
    eval_dl = strategy.setup_dataloader(held, batch_size, shuffle=False, collate_fn=collate)
    return strategy, tok, model, train_dl, eval_dl


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_neox_dir"])
def test_sft_lowers_heldout_loss_and_reloads(model_fixture, request, shared_data, tmp_path):
    model_dir = request.getfixturevalue(model_fixture)
    strategy, tok, model, train_dl, eval_dl = _sft_setup(model_dir, shared_data / "sft" / "alpaca_en_demo.json")
    trainer = SFTTrainer(model, strategy, train_dl, eval_dl, lr=2e-3, max_epochs=3, accumulation_steps=2,
                         save_path=str(tmp_path / "sft"), log_interval=1, tokenizer=tok)
    before = trainer.evaluate()["loss"]
    trainer.fit()
    after = trainer.eval_history[-1]["loss"]
    assert math.isfinite(after) and after < before - 1.0, (before, after)
    # metrics.jsonl holds one line per step with the logged loss
    lines = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines if r["split"] == "train"] == pytest.approx([h["loss"] for h in trainer.history])
    # The saved dir is a plain transformers model with identical logits.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sft").eval()
    ids = torch.tensor([tok("Give three tips for staying healthy.").input_ids])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model.eval()(ids), atol=1e-5)


def test_rm_learns_preferences(tiny_llama_dir, shared_data, tmp_path):
    strategy = NaiveStrategy(seed=0)
    tok = load_tokenizer(str(tiny_llama_dir))
    ds = RewardDataset(str(shared_data / "preference" / "dpo_en_demo.json"), tok, max_len=192,
                       max_datasets_size=96, seed=0)
    model = strategy.prepare_model(RewardModel.from_pretrained(str(tiny_llama_dir)))
    dl = strategy.setup_dataloader(ds, 8, shuffle=True, collate_fn=RewardCollator(tok.pad_token_id), drop_last=True)
    trainer = RewardModelTrainer(model, strategy, dl, dl, lr=2e-3, max_epochs=6, log_interval=100,
                                 save_path=str(tmp_path / "rm"), tokenizer=tok)
    trainer.fit()
    first, last = trainer.eval_history[0], trainer.eval_history[-1]
    assert last["acc"] >= 0.8, trainer.eval_history
    assert last["margin"] > first["margin"]
    # Reloaded reward model scores the same.
    again = RewardModel.from_pretrained(str(tmp_path / "rm")).eval()
    batch = next(iter(dl))
    with torch.no_grad():
        a = model.eval()(batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"])
        b = again(batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"])
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_resume_mid_epoch_reproduces_losses(tiny_llama_dir, shared_data, tmp_path, lora):
    from coati.models import LoraSettings

    tok = load_tokenizer(str(tiny_llama_dir))
    ds = SFTDataset(str(shared_data / "sft" / "alpaca_en_demo.json"), tok, max_len=128, max_datasets_size=48)
    micro_batches = len(ds) // 4
    steps_per_epoch = math.ceil(micro_batches / 2)
    resume_at = steps_per_epoch + 1  # one optimizer step into the second epoch

    def run(save_path, resume=None):
        strategy = NaiveStrategy(seed=0)
        actor = Actor.from_pretrained(str(tiny_llama_dir), lora=LoraSettings(rank=4) if lora else None)
        model = strategy.prepare_model(actor)
        dl = strategy.setup_dataloader(ds, 4, shuffle=True, collate_fn=SFTCollator(tok.pad_token_id), drop_last=True)
        # LoRA's B starts at zero: at 1e-3 its 12 steps leave the loss within batch noise of the start
        trainer = SFTTrainer(model, strategy, dl, None, lr=1e-2 if lora else 1e-3, max_epochs=2,
                             accumulation_steps=2, save_path=str(save_path), save_interval=resume_at,
                             log_interval=100, tokenizer=tok, merge_lora=False)
        return trainer.fit(resume_from=resume)

    full = run(tmp_path / "a")
    assert len(full) == 2 * steps_per_epoch
    ckpt = tmp_path / "a" / "checkpoints" / f"step_{resume_at}"
    assert latest_checkpoint(tmp_path / "a") == ckpt
    resumed = run(tmp_path / "b", resume=ckpt)
    assert [h["step"] for h in resumed] == [h["step"] for h in full]
    assert [h["loss"] for h in resumed[resume_at:]] == pytest.approx([h["loss"] for h in full[resume_at:]], abs=1e-6)
    assert resumed[-1]["loss"] < full[0]["loss"]
