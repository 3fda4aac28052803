"""DPO with LoRA on a 4-bit base (bitsandbytes nf4 on CPU): the held-out margin rises, and the reference is that
quantized base with the adapter off: one base in memory, scoring like a separately loaded 4-bit base."""
import math

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")
if int(__import__("transformers").__version__.split(".")[0]) < 5 and not torch.cuda.is_available():
    pytest.skip("transformers 4.x quantizes with bitsandbytes on GPU only", allow_module_level=True)

from coati.dataset import PreferenceCollator  # noqa: E402
from coati.models import Actor, LoraSettings  # noqa: E402
from coati.models.quant import base_weight_storages, quant_mode  # noqa: E402
from coati.trainer import DPOTrainer, PreferenceConfig  # noqa: E402
from coati.trainer.dpo import sequence_logps  # noqa: E402
from coati.trainer.strategies import NaiveStrategy  # noqa: E402
from tests.test_dpo import pairs, sft_dir  # noqa: E402,F401  (module fixtures: an SFT model, real pairs)

LORA = LoraSettings(rank=8)


def test_4bit_lora_dpo_raises_heldout_margin_against_the_adapter_off_base(sft_dir, pairs):  # noqa: F811
    tok, train, held = pairs
    strategy = NaiveStrategy(seed=0)
    model = strategy.prepare_model(Actor.from_pretrained(str(sft_dir), lora=LORA, quant="4bit"))
    assert quant_mode(model) == "4bit"
    collate = PreferenceCollator(tok.pad_token_id)
    dl = strategy.setup_dataloader(train, 8, shuffle=True, collate_fn=collate, drop_last=True)
    edl = strategy.setup_dataloader(held, 16, shuffle=False, collate_fn=collate)
    trainer = DPOTrainer(model, strategy, dl, edl, config=PreferenceConfig(beta=0.1), lr=2e-2, max_epochs=2,
                         log_interval=100, tokenizer=tok)
    # the reference is the quantized base itself: no second model, one copy of the base weights
    assert trainer.reference == "adapter_off" and trainer.ref_model is None
    assert len(base_weight_storages(model, frozen_only=False)) == 2 * 7  # 2 layers x 7 projections, once
    before = trainer.evaluate()
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6) and before["rewards/margins"] == 0.0
    trainer.fit()
    margins = [e["rewards/margins"] for e in trainer.eval_history]  # after each of the 2 epochs
    assert len(margins) == 2 and 0.0 < margins[0] < margins[1] and margins[1] > 0.01, trainer.eval_history
    assert trainer.eval_history[-1]["loss"] < math.log(2) - 1e-3

    # adapter off = a separately loaded 4-bit base (its fresh adapter is zero), while the trained adapter moved
    fresh = Actor.from_pretrained(str(sft_dir), lora=LORA, quant="4bit").eval()
    batch = next(iter(edl))
    with torch.no_grad():
        ref = trainer._reference_logps(batch)
        expect = sequence_logps(fresh, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
        policy = sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
    assert torch.allclose(ref, expect, atol=1e-6, rtol=0)
    assert (policy - expect).abs().max() > 1e-3
