"""Model-FLOPs counting for MFU: the weight matmuls against the matmuls a training step actually dispatches,
attention against the query-key pairs of the packed causal mask, the shape against a 1B parameter count."""
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from tests import tiny
from coati.dataset import SFTCollator
from coati.dataset.packing import model_inputs, pack
from coati.models import Actor
from coati.utils.flops import DecoderShape, batch_sample_lengths, head_positions, peak_bf16_tflops


class MatmulFlops(TorchDispatchMode):
    """2 m k n for every (batched) matrix product dispatched, in-place accumulations included."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in ("mm", "addmm", "addmm_", "bmm", "baddbmm"):
            a, b = (args[1], args[2]) if name.startswith(("addmm", "baddbmm")) else (args[0], args[1])
            self.flops += 2 * a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))


def _step_flops(actor, batch) -> int:
    """The matmul FLOPs one SFT forward + backward of ``actor`` on ``batch`` dispatches."""
    counter = MatmulFlops()
    with counter:
        actor(batch["input_ids"], labels=batch["labels"], reduction="sum", **model_inputs(batch)).sum().backward()
    return counter.flops


def _samples(lens, prompt=3):
    torch.manual_seed(0)
    ids = [torch.randint(3, 100, (n,)) for n in lens]
    labels = [i.clone() for i in ids]
    for lab in labels:
        lab[:prompt] = -100
    return ids, labels


def _one_row(lens):
    """Samples of these lengths (3 prompt tokens each) packed into one row with no pad slot, and the positions
    whose next token is a label (the head's), counted by hand."""
    ids, labels = _samples(lens)
    return pack(ids, labels, sum(lens), 0, attention="varlen"), sum(n - 3 for n in lens)


def test_matmul_flops_equal_the_matmuls_a_packed_training_step_runs():
    lens = [7, 12, 5, 9]
    batch, head_tokens = _one_row(lens)
    assert batch["input_ids"].shape == (1, sum(lens))
    torch.manual_seed(0)
    actor = Actor(LlamaForCausalLM(tiny.llama_config(num_key_value_heads=2)).float())
    flops = _step_flops(actor, batch)
    shape = DecoderShape.of(actor)
    assert head_positions(batch) == head_tokens
    assert batch_sample_lengths(batch) == lens
    # sdpa's attention products run inside its own kernel, so what was dispatched is the weights' matmuls
    assert flops == shape.matmul_flops(sum(lens), head_tokens)


def test_lora_counts_no_weight_gradient_for_frozen_weights():
    """LoRA's frozen base and head cost their forward and input gradient only (4 FLOPs per element and
    token); its adapters train (6). Exact against what a step dispatches where the embedding trains (every
    layer then needs its input gradient); with the embedding frozen too, autograd skips exactly the input
    gradients of the first layer's q / k / v (base and adapter A), which the count leaves in."""
    from coati.models import LoraSettings

    lens = [7, 12, 5, 9]
    batch, head_tokens = _one_row(lens)
    torch.manual_seed(0)  # the tiny config's head is untied: frozen apart from the embedding
    actor = Actor.from_config(tiny.llama_config(num_key_value_heads=2), lora=LoraSettings(rank=4))
    shape = DecoderShape.of(actor)
    assert 0 < shape.body_frozen < shape.body_weights and shape.head_frozen == shape.head_weights
    embedding = actor.model.get_input_embeddings().weight
    embedding.requires_grad_(True)
    assert _step_flops(actor, batch) == shape.matmul_flops(sum(lens), head_tokens)
    embedding.requires_grad_(False)
    attn = actor.model.base_model.model.model.layers[0].self_attn
    skipped = sum(p.base_layer.weight.numel() + p.lora_A["default"].weight.numel()
                  for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert shape.matmul_flops(sum(lens), head_tokens) - _step_flops(actor, batch) == 2 * sum(lens) * skipped


def test_a_head_peft_trains_as_a_copy_counts_once():
    """peft's ``modules_to_save`` keeps the original head beside the copy that trains; only the copy runs.
    The head then runs as a module, recomputed in backward (checkpointed chunks): one head forward more than
    the model FLOPs, which count no recomputation."""
    from peft import LoraConfig, get_peft_model

    lens = [7, 12, 5, 9]
    batch, head_tokens = _one_row(lens)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(tiny.llama_config(num_key_value_heads=2)),  # untied head
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    actor = Actor(model)
    actor.model.get_input_embeddings().weight.requires_grad_(True)
    shape = DecoderShape.of(actor)
    cfg = model.config
    assert (shape.head_weights, shape.head_frozen) == (cfg.vocab_size * cfg.hidden_size, 0)
    recomputed = 2 * shape.head_weights * head_tokens
    assert _step_flops(actor, batch) - shape.matmul_flops(sum(lens), head_tokens) == recomputed


def test_attention_flops_count_the_query_key_pairs_of_the_packed_causal_mask():
    lens = [7, 12, 5, 9, 3]
    ids, labels = _samples(lens, prompt=1)
    batch = pack(ids, labels, 20, 0)
    sid = batch["packed"].sample_ids
    allowed = ((sid[:, :, None] == sid[:, None, :]) & (sid[:, :, None] >= 0)
               & torch.ones(sid.shape[1], sid.shape[1], dtype=torch.bool).tril())
    shape = DecoderShape.of(LlamaForCausalLM(tiny.llama_config()))
    assert sorted(batch_sample_lengths(batch)) == sorted(lens)
    per_pair = 3 * 4 * shape.layers * shape.attention_width  # fwd + bwd, q.k and p.v, 2 FLOPs per multiply-add
    assert shape.attention_flops(batch_sample_lengths(batch)) == per_pair * int(allowed.sum())
    padded = SFTCollator(0)([{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)])
    assert batch_sample_lengths(padded) == lens and head_positions(padded) == head_positions(batch)


def test_the_1b_shape_accounts_for_every_parameter():
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    shape = DecoderShape.of(model)
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    embedding = cfg.vocab_size * cfg.hidden_size
    assert shape.body_weights + shape.head_weights + embedding + norms == sum(p.numel() for p in model.parameters())
    assert (shape.layers, shape.attention_width) == (22, 2048)


def test_peak_lookup_takes_the_variant_before_the_family():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.4
    assert peak_bf16_tflops("NVIDIA GeForce RTX 3090") is None


def _hand_flops(cfg, lens, head_tokens) -> float:
    """A LLaMA step's model FLOPs from its config alone: q, k, v, o and the gated MLP per layer, the head on
    the labelled positions, causal attention within each sample; backward twice the forward."""
    d, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    per_layer = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 3 * d * cfg.intermediate_size
    dense = 2 * cfg.num_hidden_layers * per_layer * sum(lens) + 2 * cfg.vocab_size * d * head_tokens
    attention = 4 * cfg.num_hidden_layers * d * sum(n * (n + 1) // 2 for n in lens)
    return 3 * (dense + attention)


def test_sft_logs_mfu_on_the_clock_of_its_throughput(monkeypatch, tmp_path):
    from coati.dataset import PackingCollator
    from coati.trainer import SFTTrainer
    from coati.trainer.strategies import NaiveStrategy

    lens = [7, 12, 5, 9, 14, 3, 8, 6]
    ids, labels = _samples(lens, prompt=2)
    items = [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]
    cfg = tiny.llama_config()

    def run(name):
        torch.manual_seed(0)
        strategy = NaiveStrategy(seed=0)
        actor = strategy.prepare_model(Actor.from_config(cfg))
        loader = strategy.setup_dataloader(items, 4, shuffle=False, collate_fn=PackingCollator(0, 64))
        SFTTrainer(actor, strategy, loader, log_interval=1, max_epochs=1, save_path=str(tmp_path / name)).fit()
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                if "perf/throughput" in json.loads(x)]

    assert all("perf/mfu" not in row for row in run("cpu"))  # a CPU has no peak to measure against
    monkeypatch.setenv("COATI_PEAK_TFLOPS", "0.5")
    rows = run("peak")
    assert len(rows) == 2
    for row, step in zip(rows, (slice(0, 4), slice(4, 8))):
        # one clock for both: their ratio is the model FLOPs per real token, counted by hand from the config
        per_token = _hand_flops(cfg, lens[step], sum(n - 2 for n in lens[step])) / sum(lens[step])
        assert row["perf/mfu"] * 0.5e12 / row["perf/throughput"] == pytest.approx(per_token, rel=1e-9)
