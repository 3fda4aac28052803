"""The chunked LM head: the same log-probs, losses and gradients as full logits, with a fraction of the memory."""
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CohereConfig, Gemma2Config, GraniteConfig

from coati.models import Actor, GPTLMLoss
from coati.models.lm_head import LogitProcessing, fused_head, logit_processing, token_log_probs
from coati.trainer import SFTTrainer
from coati.trainer.strategies import NaiveStrategy
from tests.tiny import llama_config

torch.set_num_threads(1)
V = 97


def _close(a, b, tol=1e-6):
    """Equal to ``tol`` relative to the larger of 1 and the tensor's largest entry (fp32 sums in another order
    differ by a few ulps of their largest terms)."""
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def _reference(hidden, weight, bias, targets, temperature, processing):
    """Log-probs from the whole ``(N, V)`` logits, as a model's forward + log_softmax would give them."""
    logits = F.linear(hidden, weight, bias)
    if processing.scale != 1.0:
        logits = logits * processing.scale
    if processing.softcap is not None:
        logits = processing.softcap * torch.tanh(logits / processing.softcap)
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("processing", [LogitProcessing(), LogitProcessing(softcap=0.5),
                                        LogitProcessing(scale=3.0, softcap=0.4)], ids=["plain", "softcap", "scaled"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_chunked_matches_full_logits_and_gradients(processing, bias, reduction):
    torch.manual_seed(0)
    head = nn.Linear(16, V, bias=bias)
    hidden = torch.randn(23, 16)
    targets = torch.randint(0, V, (23,))
    # per token: rows weighed differently check the per-row grad_output; summed: the scalar one
    weights = torch.randn(23) if reduction == "none" else torch.tensor(-0.7)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    head2 = copy.deepcopy(head)
    got = token_log_probs(head, h1, targets, temperature=0.7, processing=processing, chunk_size=5,
                          reduction=reduction)
    ref = _reference(h2, head2.weight, head2.bias, targets, 0.7, processing)
    ref = ref.sum() if reduction == "sum" else ref
    assert got.shape == ref.shape and _close(got, ref)
    (got * weights).sum().backward()
    (ref * weights).sum().backward()
    assert fused_head(head) is not None  # the autograd functions ran, not the checkpointed module
    assert _close(h1.grad, h2.grad)
    assert _close(head.weight.grad, head2.weight.grad)
    if bias:
        assert _close(head.bias.grad, head2.bias.grad)


def _gemma2():
    return Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _cohere():
    return CohereConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, logit_scale=0.25, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)


def _granite():
    return GraniteConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)


def _batch(seed=0, width=14):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, width), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    labels = ids.masked_fill(mask.eq(0), -100)
    labels[1, :6] = -100  # a prompt
    return ids, mask, labels


def _full_logits_log_probs(actor, ids, mask, labels, temperature):
    """The log-probs from the model's own full forward (its logit processing included)."""
    logits = actor(ids, attention_mask=mask)[:, :-1].float() / temperature
    targets = labels[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return lp * targets.ne(-100)


@pytest.mark.parametrize("make_config", [_gemma2, _cohere, _granite, lambda: llama_config(vocab_size=V)],
                         ids=["gemma2_softcap", "cohere_scale", "granite_scaling", "llama"])
def test_actor_log_probs_match_the_models_own_logits(make_config):
    torch.manual_seed(0)
    config = make_config()
    actor = Actor.from_config(config)
    if config.model_type != "llama":
        assert logit_processing(config) != LogitProcessing()  # the family's processing is read off its config
    ref_actor = copy.deepcopy(actor)
    ids, mask, labels = _batch()
    got = actor(ids, attention_mask=mask, labels=labels, temperature=0.8)
    ref = _full_logits_log_probs(ref_actor, ids, mask, labels, 0.8)
    assert _close(got, ref)
    got.sum().backward()
    ref.sum().backward()
    for (name, p), q in zip(actor.named_parameters(), ref_actor.parameters()):
        assert _close(p.grad, q.grad), name
    # PPO's form: the last tokens' log-probs and entropies
    with torch.no_grad():
        lp, ent = actor(ids, attention_mask=mask, num_actions=5, temperature=0.8, entropy=True)
        logits = ref_actor(ids, attention_mask=mask)[:, -6:-1].float() / 0.8
    expect = torch.log_softmax(logits, -1).gather(-1, ids[:, -5:, None]).squeeze(-1)
    assert _close(lp, expect)
    expect_ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    assert _close(ent, expect_ent, 1e-5)


def test_lora_on_the_head_falls_back_to_the_module_itself():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = Actor.from_config(llama_config(vocab_size=V)).model
    actor = Actor(get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                   init_lora_weights=False)))
    head = actor.base_lm.get_output_embeddings()
    assert fused_head(head) is None  # peft's LoRA layer, which the fused function cannot express
    ref_actor = copy.deepcopy(actor)
    ids, mask, labels = _batch(1)
    got = actor(ids, attention_mask=mask, labels=labels, temperature=1.3)
    ref = _full_logits_log_probs(ref_actor, ids, mask, labels, 1.3)
    assert _close(got, ref)
    got.sum().backward()
    ref.sum().backward()
    trained = [(n, p, q) for (n, p), q in zip(actor.named_parameters(), ref_actor.parameters()) if p.requires_grad]
    assert any("lm_head" in n for n, _, _ in trained)
    for name, p, q in trained:
        assert _close(p.grad, q.grad), name


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.batch


def test_sft_step_equals_full_logits_step_without_full_logits():
    torch.manual_seed(0)
    actor = Actor.from_config(llama_config(vocab_size=V))
    reference = copy.deepcopy(actor)
    ids, mask, labels = _batch(2)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    loader = torch.utils.data.DataLoader(_Batches(batch), batch_size=None)
    strategy = NaiveStrategy(seed=0, grad_clip=0.0)
    trainer = SFTTrainer(actor, strategy, loader, optimizer=torch.optim.SGD(actor.parameters(), lr=0.5),
                         warmup_ratio=0.0, max_epochs=1)
    shapes = []
    actor.base_lm.get_output_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    metrics = trainer._train_step([batch])
    assert shapes == []  # the head's weight was used only by the chunked function, on labelled rows

    # the same step by hand: mean token cross-entropy over the whole (B, T, V) logits, plain SGD
    logits = reference(ids, attention_mask=mask)
    loss = GPTLMLoss()(logits, labels)
    loss.backward()
    assert metrics["loss"] == pytest.approx(float(loss), abs=1e-6)
    with torch.no_grad():
        for (name, p), q in zip(actor.named_parameters(), reference.parameters()):
            assert _close(p, q - 0.5 * q.grad), name


def _rss_peak_mib(fn) -> float:
    """Peak resident memory while ``fn`` runs over the resident memory before it (the kernel's high-water mark,
    reset first): it sees every tensor the CPU allocator hands out."""
    status = Path("/proc/self/status")

    def kib(field):
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read_text(), re.M).group(1))

    Path("/proc/self/clear_refs").write_text("5")
    before = kib("VmRSS")
    fn()
    return (kib("VmHWM") - before) / 1024


def _loss_peaks() -> None:
    """Print the peak memory (MiB) of the LM loss, forward + backward, chunked and from full logits, on vocab
    32000 x 2048 tokens."""
    torch.set_num_threads(1)
    vocab, tokens, hidden_size = 32000, 2048, 64
    torch.manual_seed(0)
    head = nn.Linear(hidden_size, vocab, bias=False)
    hidden = torch.randn(1, tokens + 1, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens + 1))

    def full():  # today's path: (B, T, V) logits, then the LM loss
        GPTLMLoss()(head(hidden), labels, reduction="sum").backward()

    def chunked_sum():  # the LM loss as SFT and PTX compute it
        (-token_log_probs(head, hidden[0, :-1], labels[0, 1:], reduction="sum")).backward()

    def chunked_per_token():  # as PPO and DPO do
        (-token_log_probs(head, hidden[0, :-1], labels[0, 1:]).sum()).backward()

    fns = {"chunked_sum": chunked_sum, "chunked_per_token": chunked_per_token, "full": full}
    for fn in fns.values():  # first calls allocate once-only buffers
        fn()
    print(json.dumps({name: _rss_peak_mib(fn) for name, fn in fns.items()}))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_chunked_loss_peak_memory_is_a_fraction_of_full_logits():
    # A process of its own, with glibc's mmap threshold fixed: every large buffer then goes back to the kernel
    # when freed, so the high-water mark is the peak of live tensors, not of memory malloc kept for reuse.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", "from tests.test_lm_head import _loss_peaks; _loss_peaks()"],
                         env=env, cwd=root, capture_output=True, text=True, check=True).stdout
    peaks = json.loads(out.strip().splitlines()[-1])
    assert peaks["full"] > 4 * peaks["chunked_sum"], peaks
    assert peaks["full"] > 4 * peaks["chunked_per_token"], peaks


@pytest.mark.gpu
@pytest.mark.parametrize("processing", [LogitProcessing(), LogitProcessing(softcap=0.5)], ids=["plain", "softcap"])
def test_liger_fused_loss_on_cuda_matches_full_logits(processing, monkeypatch):
    """The summed log-prob goes through liger-kernel's fused linear cross-entropy on CUDA (where it is
    installed): the same value and gradients as the full fp32 logits."""
    pytest.importorskip("liger_kernel")
    from coati.models import lm_head

    results = []
    original = lm_head._liger_sum
    monkeypatch.setattr(lm_head, "_liger_sum", lambda *a: results.append(original(*a)) or results[-1])
    torch.manual_seed(0)
    head = nn.Linear(64, 32000, bias=False).cuda()
    head2 = copy.deepcopy(head)
    hidden = torch.randn(300, 64, device="cuda")
    targets = torch.randint(0, 32000, (300,), device="cuda")
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    got = token_log_probs(head, h1, targets, processing=processing, reduction="sum")
    ref = _reference(h2, head2.weight, None, targets, 1.0, processing).sum()
    assert len(results) == 1 and results[0] is not None  # liger computed it
    assert _close(got, ref, tol=1e-5)
    (-0.7 * got).backward()
    (-0.7 * ref).backward()
    assert _close(h1.grad, h2.grad, tol=1e-5) and _close(head.weight.grad, head2.weight.grad, tol=1e-5)
