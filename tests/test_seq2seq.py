"""Encoder-decoder SFT (T5 / Flan-T5): the rendered prompt feeds the encoder, the response (+ EOS) is the decoder's
target, in the causal batch convention (``labels[:, 0]`` is the decoder's start slot, never scored).

A tiny Flan-T5-shaped model (``tiny.t5_config``: gated-GELU MLP, dropout 0.1, bf16 in config) over the llama
tokenizer learns a few instructions through examples/train_sft.py; the saved dir reloads with
``AutoModelForSeq2SeqLM`` and answers through coati's inference path (chat CLI, generate_answers, the server);
LoRA, quantized bases, resume and the distributed strategies work as for causal LMs; the stages that need a
causal LM refuse it with one line.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, BartConfig

from coati.dataset import SFTCollator, SFTDataset, encode_prompt
from coati.errors import UsageError
from coati.models import Seq2SeqActor
from coati.models.quant import quant_mode
from coati.utils import IGNORE_INDEX
from tests import tiny
from tests.scripts import load_script, torchrun

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("Name a color.", "Blue."), ("What is 2+3?", "5"), ("Largest planet?", "Jupiter."),
         ("Translate to French: cat.", "chat"), ("Name the capital of France.", "Paris is the capital."),
         ("Tell me a fact about the moon.", "The Moon is made of rock."), ("Another one?", "Green."),
         ("What is 12+7?", "The answer is 19.")]
train_sft = load_script("examples/train_sft.py")


class Capture(train_sft.SFTTrainer):
    """SFTTrainer that keeps the last instance, so a test can compare the trained model with what was saved."""

    last = None

    def fit(self, *args, **kwargs):
        type(self).last = self
        return super().fit(*args, **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("s2s_data") / "pairs.json"
    path.write_text(json.dumps([{"instruction": q, "output": a} for q, a in PAIRS]))
    return path


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    return tiny.save_tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def t5_fp32_dir(tmp_path_factory) -> Path:
    """fp32 in config: saves are the trained weights exactly, so reloads can be compared bit for bit."""
    return tiny.save_tiny_t5(tmp_path_factory.mktemp("t5_fp32"), dtype="float32")


def _train(pretrain: Path, data: Path, save: Path, *extra: str, monkeypatch=None) -> None:
    if monkeypatch is not None:
        monkeypatch.setattr(train_sft, "SFTTrainer", Capture)
    train_sft.main(["--pretrain", str(pretrain), "--dataset", str(data), "--save_path", str(save),
                    "--batch_size", "4", "--accumulation_steps", "1", "--lr", "3e-3", "--lr_scheduler", "constant",
                    "--warmup_ratio", "0", "--log_interval", "1", *extra])


def _losses(save: Path) -> list[float]:
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _batch(tok) -> dict[str, torch.Tensor]:
    records = [{"instruction": q, "output": a} for q, a in PAIRS]
    return SFTCollator(tok.pad_token_id)(list(SFTDataset(records, tok, seq2seq=True)))


# --- samples and the model's log-probs -----------------------------------------------------------------------

def test_seq2seq_sample_is_the_inference_prompt_and_the_last_response():
    tok = tiny.tokenizer("llama")
    chat = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green."}]
    [item] = SFTDataset([{"messages": chat}], tok, seq2seq=True)
    # the encoder sees what inference renders for the conversation so far (earlier turns, their EOS, BOS)
    assert item["input_ids"].tolist() == encode_prompt(chat[:3], tok)
    start, *target = item["labels"].tolist()
    assert start == IGNORE_INDEX and tok.decode(target) == "Green.</s>" and target[-1] == tok.eos_token_id
    # the causal sample of the same record: prompt and target concatenated, the target its last labels
    [causal] = SFTDataset([{"messages": chat}], tok)
    assert causal["input_ids"].tolist() == item["input_ids"].tolist() + target
    assert causal["labels"].tolist()[-len(target) - 1:] == [IGNORE_INDEX] + target

    # --max_len limits the encoder input and the target each
    short = SFTDataset([{"messages": chat}], tok, seq2seq=True, max_len=3)
    assert (len(short[0]["input_ids"]), short[0]["labels"].tolist()) == (3, [IGNORE_INDEX] + target[:3])
    assert short.num_truncated == 1
    assert len(SFTDataset([{"messages": chat}] * 2, tok, seq2seq=True, max_len=len(target))) == 2
    with pytest.raises(ValueError, match="no SFT samples left"):
        SFTDataset([{"messages": chat}], tok, seq2seq=True, max_len=3, overlong="skip")


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_log_probs_give_transformers_own_seq2seq_loss(arch):
    """The SFT loss from ``Seq2SeqActor(..., labels)`` equals the model's own loss on the target (which
    shifts it right behind the decoder's start token), for T5 and BART."""
    tok = tiny.tokenizer("llama")
    config = tiny.t5_config(dtype="float32") if arch == "t5" else BartConfig(
        vocab_size=tiny.LLAMA_VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=2)
    torch.manual_seed(0)
    actor = Seq2SeqActor.from_config(config).eval()
    batch = _batch(tok)
    labels = batch["labels"]
    with torch.no_grad():
        per_token = actor(batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        total = actor(batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, reduction="sum")
        want = actor.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=labels[:, 1:].contiguous()).loss
    assert per_token.shape == (labels.shape[0], labels.shape[1] - 1) and per_token.dtype == torch.float32
    assert torch.all(per_token[labels[:, 1:] == IGNORE_INDEX] == 0)
    assert torch.allclose(total, per_token.sum())
    count = (labels[:, 1:] != IGNORE_INDEX).sum()
    assert float(-total / count) == pytest.approx(float(want), rel=1e-5)


# --- train_sft.py end to end -----------------------------------------------------------------------------------

def test_flan_t5_like_model_learns_and_answers_through_coati_inference(t5_dir, data, tmp_path):
    out = tmp_path / "sft"
    _train(t5_dir, data, out, "--batch_size", "8", "--max_epochs", "100")
    losses = _losses(out)
    assert len(losses) == 100 and sum(losses[-5:]) < sum(losses[:5]) / 10
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # saved as the checkpoint was
    AutoModelForSeq2SeqLM.from_pretrained(out)  # a plain transformers load

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "text": q}) + "\n" for i, (q, _) in enumerate(PAIRS)))
    rows = load_script("inference/generate_answers.py").main(
        ["--model_path", str(out), "--question_file", str(questions), "--output_file", str(tmp_path / "a.jsonl"),
         "--max_new_tokens", "16"])
    assert [r["answer"] for r in rows] == [a for _, a in PAIRS]
    assert {r["finish_reason"] for r in rows} == {"stop"}

    question, answer = PAIRS[0]
    text = io.StringIO()
    assert load_script("inference/chat.py").main(
        [str(out), "--prompt", question, "--temperature", "0", "--max_new_tokens", "16"], out=text) == [answer]
    assert text.getvalue() == answer + "\n"

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from coati.inference.engine import BatchingEngine
    from coati.inference.generation import Generator
    from coati.inference.loading import load_model
    from coati.inference.server import ServerConfig, create_app

    engine = BatchingEngine(Generator(*load_model(out)), max_batch_size=4, batch_wait_s=0).start()

    async def ask():
        transport = httpx.ASGITransport(app=create_app(engine, ServerConfig(model_name="t5")))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return (await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": PAIRS[2][0]}], "max_tokens": 16, "temperature": 0})).json()

    try:
        reply = asyncio.run(ask())
    finally:
        engine.stop()
    assert reply["choices"][0]["message"]["content"] == PAIRS[2][1]


@pytest.mark.parametrize("lora", [False, True])
def test_saved_dir_reloads_with_the_trained_logits(lora, t5_fp32_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "sft"
    _train(t5_fp32_dir, data, out, "--max_steps", "4", *(["--lora_rank", "4", "--model", "t5"] if lora else []),
           monkeypatch=monkeypatch)
    actor = Capture.last.model.eval()
    assert actor.lora_enabled == lora
    if lora:  # the t5 family's targets: attention and (gated) MLP of encoder and decoder
        adapted = {name.split(".")[-1] for name, m in actor.named_modules() if hasattr(m, "lora_A")}
        assert adapted == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
        assert not (out / "adapter_config.json").exists()  # merged
    batch = _batch(tiny.tokenizer("llama"))
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  decoder_input_ids=actor.base_lm.prepare_decoder_input_ids_from_labels(labels=batch["labels"][:, 1:]))
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    base = AutoModelForSeq2SeqLM.from_pretrained(t5_fp32_dir).eval()
    with torch.no_grad():
        want = actor.model(**inputs).logits
        got = reloaded(**inputs).logits
        # the full model saves its fp32 weights as they are; LoRA's merge rounds W + BA once in fp32
        assert torch.equal(got, want) if not lora else torch.allclose(got, want, rtol=0, atol=1e-4)
        assert not torch.allclose(base(**inputs).logits, want, atol=1e-3)  # it did train


def test_resume_continues_exactly(t5_dir, data, tmp_path):
    """Dropout on: a run resumed from step 3 (mid-epoch) ends with the uninterrupted run's weights, bit for bit."""
    common = ("--batch_size", "2", "--max_steps", "6", "--save_interval", "3")
    _train(t5_dir, data, tmp_path / "full", *common)
    _train(t5_dir, data, tmp_path / "resumed", *common, "--resume", str(tmp_path / "full" / "checkpoints" / "step_3"))
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "full")[3:]
    from safetensors.torch import load_file

    full, resumed = (load_file(tmp_path / run / "checkpoints" / "step_6" / "model" / "model.safetensors")
                     for run in ("full", "resumed"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert full["shared.weight"].dtype == torch.float32  # training checkpoints hold the fp32 masters


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_lora_on_a_quantized_base_saves_a_plain_model(quant, t5_fp32_dir, data, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "sft"
    _train(t5_fp32_dir, data, out, "--max_steps", "2", "--lora_rank", "4", "--model", "t5", "--quant", quant,
           monkeypatch=monkeypatch)
    assert quant_mode(Capture.last.model) == quant
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and not (out / "adapter_config.json").exists()
    batch = _batch(tiny.tokenizer("llama"))
    with torch.no_grad():
        logits = AutoModelForSeq2SeqLM.from_pretrained(out)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            decoder_input_ids=torch.zeros_like(batch["input_ids"][:, :3])).logits
    assert torch.isfinite(logits).all()


def test_packing_is_refused_for_an_encoder_decoder(t5_dir, data, tmp_path):
    with pytest.raises(UsageError, match="--packing: model_type 't5'.*use --no-packing"):
        _train(t5_dir, data, tmp_path / "sft", "--packing")


# --- stages that need a causal LM ------------------------------------------------------------------------------

@pytest.mark.parametrize("script, extra", [
    ("train_reward_model", ["--dataset", "preference.jsonl", "--eval_ratio", "0"]),
    ("train_dpo", ["--dataset", "preference.jsonl", "--eval_ratio", "0"]),
    ("train_prompts", ["--prompt_dataset", "prompts.jsonl", "--reward_fn", "tests/dist_ppo.py:target_share"]),
])
def test_causal_stages_refuse_a_seq2seq_model_in_one_line(script, extra, t5_dir, tmp_path):
    (tmp_path / "preference.jsonl").write_text(json.dumps({"prompt": "Q", "chosen": "good", "rejected": "bad"}) + "\n")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Hi"}) + "\n")
    extra = [str(tmp_path / e) if e.endswith(".jsonl") else e for e in extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, f"examples/{script}.py", "--pretrain", str(t5_dir), "--save_path",
                           str(tmp_path / "out"), *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == (
        f"error: {t5_dir}: 't5' is an encoder-decoder (seq2seq) model, which coati trains with SFT only "
        "(examples/train_sft.py); reward models, PPO / GRPO and DPO need a causal LM")
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


# --- distributed -----------------------------------------------------------------------------------------------

@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(strategy, data, tmp_path):
    """2 torchrun processes (gloo) with batch 2 each give the loss curve of one process with batch 4; fsdp shards
    T5Block by T5Block (the model's ``_no_split_modules``)."""
    # small initial weights: the loss starts near ln(vocab), as a real model's would, not at ~36, where fp32
    # rounding alone exceeds 1e-5
    pretrain = tiny.save_tiny_t5(tmp_path / "t5", dropout_rate=0.0, initializer_factor=0.05)
    common = ["examples/train_sft.py", "--pretrain", str(pretrain), "--dataset", str(data), "--max_epochs", "3",
              "--accumulation_steps", "1", "--lr", "3e-3", "--warmup_ratio", "0", "--log_interval", "1", "--seed", "7"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for cmd in ([sys.executable, *common, "--strategy", "naive", "--batch_size", "4",
                 "--save_path", str(tmp_path / "one")],
                [*torchrun(2), *common, "--strategy", strategy, "--batch_size", "2", "--save_path", str(tmp_path / "two")]):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) >= 6 and one[-1] < one[0]
    assert two == pytest.approx(one, abs=1e-5)
