"""Colossal-LLaMA continual pre-training through examples/colossal_llama/train.py (coati's SFTTrainer on
bucketed data): held-out Chinese loss falls while English stays within bound, both kinds of
--load_checkpoint, --freeze_non_embeds_params, and the recorded config."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from coati.dataset import IGNORE_INDEX, SegmentEncoder
from coati.models import Actor, GPTLMLoss
from coati.vocab import (
    corpus_texts, extend_tokenizer, load_source_tokenizer, pieces_from_corpus, save_extended_model,
)
from tests import tiny
from tests.scripts import load_script

MAX_LEN = 64
EN_BOUND = 0.05  # English held-out loss may rise at most this much (nats) with replay of English data


@pytest.fixture(scope="module")
def recipe(shared_data, tmp_path_factory):
    """An extended tiny LLaMA and prepared zh + en data, plus held-out texts of both languages."""
    root = tmp_path_factory.mktemp("recipe")
    zh = json.loads((shared_data / "sft" / "alpaca_zh_demo.json").read_text())
    en = [json.loads(line)["text"] for line in (shared_data / "pretrain" / "c4_demo.jsonl").read_text().splitlines()]
    llama2 = shared_data / "tokenizers" / "llama2"
    pieces = pieces_from_corpus(corpus_texts(zh[:300]), load_source_tokenizer(llama2), vocab_size=3000)
    extend_tokenizer(llama2, pieces, root / "tok")
    src = tiny.save_tiny_model("llama", root / "src")
    load_source_tokenizer(llama2).save_pretrained(src)  # the recipe extends the real LLaMA-2 tokenizer
    save_extended_model(src, root / "tok", root / "model")
    rows = [{"source": "", "target": r["instruction"] + r["output"], "category": "zh"} for r in zh[:10]]
    rows += [{"source": "", "target": t[:300], "category": "en"} for t in en[:8]]
    (root / "raw").mkdir()
    (root / "raw" / "data.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    load_script("examples/colossal_llama/prepare_pretrain_dataset.py").main([
        "--data_input_dirs", str(root / "raw"), "--tokenizer_dir", str(root / "model"), "--data_output_dirs",
        str(root / "data"), "--max_length", str(MAX_LEN), "--num_spliced_dataset_bins", "2"])
    held_out = {"zh": [r["output"][:120] for r in zh[900:912]], "en": [t[:300] for t in en[280:292]]}
    return root, held_out


def _argv(root, save_dir, *extra) -> list[str]:
    return ["--pretrained", str(root / "model"), "--dataset", str(root / "data"), "--plugin", "naive",
            "--mixed_precision", "no", "--micro_batch_size", "4", "--accumulation_steps", "1", "--lr", "3e-3",
            "--weight_decay", "0", "--warmup_steps", "0", "--max_length", str(MAX_LEN), "--save_dir", str(save_dir),
            "--save_interval", "0", "--log_interval", "100", *extra]


def _train(root, save_dir, *extra):
    return load_script("examples/colossal_llama/train.py").main(_argv(root, save_dir, *extra))


def _held_out_loss(model_dir, texts) -> float:
    actor = Actor.from_pretrained(model_dir).eval()
    tok = load_source_tokenizer(model_dir)
    encoder = SegmentEncoder(tok)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids, labels = encoder.encode([(text, True)])
            ids, labels = torch.tensor([ids]), torch.tensor([labels])
            total += float(GPTLMLoss()(actor(ids), labels, reduction="sum"))
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total / count


def test_continual_pretraining_lowers_chinese_loss_and_keeps_english(recipe, tmp_path):
    root, held_out = recipe
    before = {lang: _held_out_loss(root / "model", texts) for lang, texts in held_out.items()}
    trainer = _train(root, tmp_path / "out", "--num_epochs", "2")
    after = {lang: _held_out_loss(tmp_path / "out", texts) for lang, texts in held_out.items()}
    print(f"\nheld-out loss before -> after: zh {before['zh']:.3f} -> {after['zh']:.3f}, "
          f"en {before['en']:.3f} -> {after['en']:.3f} ({trainer.global_step} steps)")
    assert after["zh"] < before["zh"] - 0.5
    assert after["en"] <= before["en"] + EN_BOUND
    config = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert config["num_epochs"] == 2 and config["plugin"] == "naive" and config["resolved_strategy"] == "naive"
    assert set(vars(load_script("examples/colossal_llama/train.py").build_parser().parse_args(
        ["--pretrained", "P", "--dataset", "D"]))) <= set(config)


def test_load_checkpoint_resumes_a_state_and_starts_a_stage_from_a_model(recipe, tmp_path):
    root, _ = recipe
    full = _train(root, tmp_path / "full", "--save_interval", "2")
    assert full.total_steps >= 4
    resumed = _train(root, tmp_path / "resumed", "--load_checkpoint", str(tmp_path / "full/checkpoints/step_2"))
    assert [h["step"] for h in resumed.history] == list(range(1, full.total_steps + 1))
    assert [h["loss"] for h in resumed.history[2:]] == [h["loss"] for h in full.history[2:]]
    final = load_file(str(tmp_path / "full" / "model.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)

    stage = _train(root, tmp_path / "stage2", "--load_checkpoint", str(tmp_path / "full"))
    assert [h["step"] for h in stage.history] == list(range(1, full.total_steps + 1))
    assert stage.history[0]["loss"] < full.history[0]["loss"] - 0.3  # began from the trained weights


def test_freeze_non_embeds_params_leaves_every_other_weight_identical(recipe, tmp_path):
    root, _ = recipe
    _train(root, tmp_path / "out", "--freeze_non_embeds_params")
    before = load_file(str(root / "model" / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    trained = {"model.embed_tokens.weight", "lm_head.weight"}
    for name, tensor in before.items():
        if name in trained:
            assert not torch.equal(after[name][32000:], tensor[32000:]), name
        else:
            assert torch.equal(after[name], tensor), name


@pytest.mark.dist
def test_plugin_3d_with_tp_2_trains_as_one_process(recipe, tmp_path):
    """--plugin 3d --tp 2 on 2 processes (tensor parallel 2, one data-parallel replica) walks the same buckets
    and gives one process's losses (fp32: to 1e-5)."""
    import os
    import subprocess

    from tests.scripts import ROOT, torchrun

    root, _ = recipe
    one = _train(root, tmp_path / "one", "--log_interval", "1")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([*torchrun(2), "examples/colossal_llama/train.py",
                           *_argv(root, tmp_path / "tp", "--log_interval", "1", "--plugin", "3d", "--tp", "2")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = [json.loads(line) for line in (tmp_path / "tp" / "metrics.jsonl").read_text().splitlines()]
    got = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(got) == one.total_steps >= 2
    assert got == pytest.approx([h["loss"] for h in one.history], abs=1e-5)
    assert json.loads((tmp_path / "tp" / "train_config.json").read_text())["resolved_strategy_kwargs"] == {
        "zero_stage": 2, "tp_size": 2}
