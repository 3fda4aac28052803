"""Padding-free packing and length grouping: a packed sample sees only itself (its logits equal its logits
alone) on every architecture the registry lets pack, the others are refused; packed SFT, RM and DPO give the
unpacked per-sample numbers and gradients; resume stays exact; the padding share is counted by hand."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch
from transformers import (
    BloomConfig, Gemma2Config, Gemma3TextConfig, GemmaConfig, MistralConfig, OPTConfig, Phi3Config, Qwen2Config,
    Qwen3Config,
)

from coati.dataset import (
    PackingCollator, PackingPreferenceCollator, PackingRewardCollator, PreferenceCollator, RewardCollator,
    SFTCollator, sample_lengths,
)
from coati.dataset import packing
from coati.dataset.packing import first_fit, model_inputs, pack, pack_pairs, shared_prefix_len
from coati.errors import UsageError
from coati.models import Actor, RewardModel, packing_attention
from coati.models.segment_attention import Segments, segment_sdpa_forward
from coati.models.families import FAMILIES, resolve_packing, supports_packing
from coati.trainer import DPOTrainer, PreferenceConfig, RewardModelTrainer, SFTTrainer
from coati.trainer.base import epoch_iter
from coati.trainer.dpo import batch_logps
from coati.trainer.strategies import NaiveStrategy
from coati.trainer.strategies.base import LengthGroupedSampler
from tests import tiny

VOCAB = 64
MAX_LEN = 24
_SMALL = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_GQA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            **_SMALL)
_GEMMA = dict(head_dim=8, **_GQA)

CONFIGS = {
    "llama": lambda: tiny.llama_config(**_SMALL),
    "gpt2": lambda: tiny.gpt2_config(**_SMALL),
    "gpt_neox": lambda: tiny.gpt_neox_config(**_SMALL),
    "qwen2": lambda: Qwen2Config(**_GQA),
    "qwen3": lambda: Qwen3Config(head_dim=8, **_GQA),
    "mistral": lambda: MistralConfig(sliding_window=None, **_GQA),
    "gemma": lambda: GemmaConfig(**_GEMMA),
    # soft-capped attention scores: transformers runs Gemma 2 on eager attention (sdpa cannot cap)
    "gemma2": lambda: Gemma2Config(query_pre_attn_scalar=8, sliding_window=64, **_GEMMA),
    "gemma3_text": lambda: Gemma3TextConfig(query_pre_attn_scalar=8, sliding_window=64, **_GEMMA),
    "phi3": lambda: Phi3Config(**_GQA),
    "opt": lambda: OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                             word_embed_proj_dim=32, max_position_embeddings=64, **_SMALL),
    "bloom": lambda: BloomConfig(hidden_size=32, n_layer=2, n_head=4, **_SMALL),
}
PACKING = sorted({t for f in FAMILIES.values() for t in f.packing_model_types})
EAGER = {"gemma2"}  # its default attention is eager: packed rows carry an explicit mask ("dense"), no segments
REFUSED = sorted(set(CONFIGS) - set(PACKING))


_SEGMENTS_PAY = packing._segments_pay


@pytest.fixture(autouse=True)
def _segments_whenever_asked(monkeypatch):
    """The samples here are short and mostly share no prompt; lay them out by segments anyway, as long pairs
    are (one test checks the rule)."""
    monkeypatch.setattr(packing, "_segments_pay", lambda units, sizes: True)


def _ragged(seed: int, lengths=(5, 11, 3, 8, 7, 2, 9)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def _sft_items(seed: int = 0, lengths=(5, 11, 3, 8, 7, 2, 9)) -> list[dict]:
    items = []
    for ids in _ragged(seed, lengths):
        labels = ids.clone()
        labels[: len(ids) // 3] = -100  # a prompt the loss skips
        items.append({"input_ids": ids, "labels": labels})
    return items


def _pairs(seed: int = 0, n: int = 4) -> list[dict]:
    chosen, rejected = _ragged(seed, (6, 10, 4, 9)[:n]), _ragged(seed + 1, (8, 3, 7, 5)[:n])
    out = []
    for c, r in zip(chosen, rejected):
        cl, rl = c.clone(), r.clone()
        cl[:2] = rl[:2] = -100
        out.append({"chosen_input_ids": c, "chosen_labels": cl, "rejected_input_ids": r, "rejected_labels": rl})
    return out


def _prompt_pairs(seed: int = 0) -> list[dict]:
    """Pairs as a preference set holds them: both sides open with the same prompt (labels -100 there), the
    answers differ from their first token; the last two pairs share nothing (the longest, 23 tokens, makes rows
    long enough to hold several pairs where rows stop at the longest unit)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p, c, r in ((5, 4, 6), (3, 7, 2), (8, 1, 3), (0, 5, 4), (0, 11, 12)):
        prompt = torch.randint(3, VOCAB, (p,), generator=g)
        answers = [torch.randint(3, VOCAB, (n,), generator=g) for n in (c, r)]
        answers[1][0] = 3 + (int(answers[0][0]) - 2) % (VOCAB - 3)  # differ at the first answer token
        item = {}
        for side, answer in zip(("chosen", "rejected"), answers):
            ids = torch.cat([prompt, answer])
            labels = ids.clone()
            labels[:p] = -100
            item[f"{side}_input_ids"], item[f"{side}_labels"] = ids, labels
        out.append(item)
    return out


def test_the_registry_packs_exactly_the_checked_architectures():
    assert PACKING == ["gemma", "gemma2", "gemma3_text", "gpt2", "gpt_neox", "llama", "mistral", "phi3", "qwen2",
                       "qwen3"]
    assert REFUSED == ["bloom", "opt"]


@pytest.mark.parametrize("attention", ["segments", "dense"])
@pytest.mark.parametrize("model_type", PACKING)
def test_a_packed_sample_has_its_logits_alone(model_type, attention):
    torch.manual_seed(0)
    config = CONFIGS[model_type]()
    assert config.model_type == model_type
    actor = Actor.from_config(config).eval()
    # coati runs sdpa models on segment attention
    assert packing_attention(actor) == ("dense" if model_type in EAGER else "segments")
    seqs = _ragged(0)
    batch = pack(seqs, None, MAX_LEN, 0, attention=attention)
    if packing_attention(actor) != attention == "segments":
        with pytest.raises(UsageError, match=r"attention=packing_attention\(model\)"):
            actor(batch["input_ids"], **model_inputs(batch))
        return
    assert batch["input_ids"].shape[0] < len(seqs)  # rows really hold several samples
    assert (batch["packed"].segments is not None) == (attention == "segments")
    with torch.no_grad():
        packed = actor(batch["input_ids"], **model_inputs(batch))
        for i, ids in enumerate(seqs):
            alone = actor(ids[None])[0]
            torch.testing.assert_close(packed[batch["packed"].sample_ids == i], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", REFUSED)
def test_architectures_that_cannot_isolate_samples_are_refused(model_type):
    family = FAMILIES[model_type]
    assert not supports_packing(family, model_type) and not supports_packing("auto", model_type)
    assert resolve_packing("auto", family, model_type) is False
    with pytest.raises(UsageError, match="--no-packing"):
        resolve_packing(True, family, model_type)
    # and refusing is right: packed, a later sample would see the one before it
    torch.manual_seed(0)
    actor = Actor.from_config(CONFIGS[model_type]()).eval()
    seqs = _ragged(0)
    batch = pack(seqs, None, MAX_LEN, 0)
    with torch.no_grad():
        packed = actor(batch["input_ids"], position_ids=batch["packed"].position_ids)
        worst = max(float((packed[batch["packed"].sample_ids == i] - actor(s[None])[0]).abs().max())
                    for i, s in enumerate(seqs))
    assert worst > 1e-3


@pytest.mark.parametrize("attention", ["segments", "dense"])
@pytest.mark.parametrize("model_type", PACKING)
def test_a_pair_sharing_its_prompt_has_each_sides_logits_alone(model_type, attention):
    """The rejected side, laid out after the chosen one and reading the prompt they share, sees exactly its own
    tokens: its logits equal its logits alone, as do the chosen side's."""
    torch.manual_seed(0)
    actor = Actor.from_config(CONFIGS[model_type]()).eval()
    if packing_attention(actor) != attention == "segments":
        pytest.skip("eager attention takes no segment layout (checked above)")
    pairs = _prompt_pairs()
    batch = PackingRewardCollator(0, MAX_LEN, attention)([{k: v for k, v in p.items() if "input_ids" in k}
                                                          for p in pairs])
    n = len(pairs)
    assert any(len({int(i) % n for i in row[row >= 0]}) > 1 for row in batch["packed"].sample_ids)  # rows mix pairs
    # by hand: the prompts (5, 3, 8 tokens; the answers differ from their first token) once, the last pair apart
    assert int((batch["packed"].shared_ids >= 0).sum()) == 5 + 3 + 8
    assert int((batch["packed"].sample_ids >= 0).sum()) == sum(len(p[k]) for p in pairs for k in p if "input_ids" in k) - 16
    with torch.no_grad():
        packed = actor(batch["input_ids"], **model_inputs(batch))
        for i, p in enumerate(pairs):
            for j, side in ((i, "chosen"), (n + i, "rejected")):
                ids = p[f"{side}_input_ids"]
                alone = actor(ids[None])[0]
                mine = batch["packed"].sample_ids == j
                if side == "chosen":
                    mine |= batch["packed"].shared_ids == n + i  # the shared prefix is counted as the chosen side's
                torch.testing.assert_close(packed[mine], alone[-int(mine.sum()):], atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["flash_attention_2", "flex_attention"])
def test_attention_without_given_masks_gets_the_pair_sides_packed_apart(impl):
    """Flash / flex attention take no explicit 4D mask: a shared-prompt batch is refused in one line that names
    the switch, and the collator built with it packs each side whole, position ids alone keeping them apart."""
    model = RewardModel.from_config(CONFIGS["llama"]())
    assert packing_attention(model) == "segments"
    model.config._attn_implementation = impl
    assert packing_attention(model) == "varlen"
    pairs = [{k: v for k, v in p.items() if "input_ids" in k} for p in _prompt_pairs()]
    for attention in ("dense", "segments"):
        shared = PackingRewardCollator(0, MAX_LEN, attention)(pairs)
        with pytest.raises(UsageError, match=r"attention=packing_attention\(model\)"):
            model(shared["input_ids"], **model_inputs(shared))
    apart = PackingRewardCollator(0, MAX_LEN, attention=packing_attention(model))(pairs)
    assert apart["packed"].shared_ids is None and model_inputs(apart)["attention_mask"] is None
    assert int((apart["packed"].sample_ids >= 0).sum()) == _pair_tokens(pairs)


def test_rows_for_dense_attention_stop_at_the_longest_sample():
    """sdpa / eager score every query-key pair of a row, so rows are cut to the batch's longest sample: never
    more rows, slots or attention scores than the padded batch. Flash / flex rows fill max_len."""
    seqs = [torch.arange(3, 3 + n) for n in (2, 3, 4, 10)]
    dense = pack(seqs, None, 64, 0)
    assert dense["input_ids"].shape == (2, 10)  # by hand: [10], [4 3 2 + 1 pad]
    assert pack(seqs, None, 64, 0, attention="varlen")["input_ids"].shape == (1, 19)
    one = pack(seqs, None, 8, 0, attention="segments")  # by segments: one row of every token, whatever max_len
    assert one["input_ids"].shape == (1, 19)
    assert one["packed"].segments.rows == (((0, 10, 0, 0), (10, 14, 10, 0), (14, 17, 14, 0), (17, 19, 17, 0)),)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        lens = torch.randint(1, 40, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        rows, width = pack([torch.arange(3, 3 + n) for n in lens], None, 64, 0)["input_ids"].shape
        assert width == max(lens) and rows <= len(lens)
    # pairs that share nothing are two samples, placed apart: rows as long as the longest side
    chosen, rejected = [torch.arange(3, 3 + n) for n in (9, 4, 6)], [torch.arange(40, 40 + n) for n in (5, 9, 2)]
    pairs = pack_pairs(chosen, rejected, 64, 0)
    assert pairs["input_ids"].shape == (4, 9) and pairs["packed"].shared_ids is None  # by hand: [9] [9] [6 2 + pad] [5 4]
    # a pair sharing 2 prompt tokens, by segments: the chosen side whole, then the rejected side after the prompt,
    # reading the chosen side's first 2 tokens
    shared = pack_pairs([torch.tensor([3, 4, 5, 6])], [torch.tensor([3, 4, 9])], 64, 0, attention="segments")
    assert shared["input_ids"].tolist() == [[3, 4, 5, 6, 9]]
    assert shared["packed"].segments.rows == (((0, 4, 0, 0), (4, 5, 0, 2)),)


def test_segments_only_where_a_long_unit_shares_its_prompt(monkeypatch):
    """Where every unit is short, or no pair shares its prompt, a call per piece costs more than the masked
    scores it saves: the batch is laid out dense (rows as long as its longest unit, no segment layout); one
    long pair sharing its prompt makes it segments."""
    monkeypatch.setattr(packing, "_segments_pay", _SEGMENTS_PAY)
    monkeypatch.setattr(packing, "SEGMENT_MIN_UNIT", 9)
    samples = [torch.arange(3, 3 + n) for n in (2, 3, 4, 9, 10)]
    batch = pack(samples, None, 64, 0, attention="segments")  # one unit of 10 > 9 tokens, but nothing shared
    assert batch["packed"].segments is None and batch["input_ids"].shape == (3, 10)
    short = [torch.tensor([3, 4, 5]), torch.tensor([3, 4, 6, 7])]
    batch = pack_pairs(short[:1], short[1:], 64, 0, attention="segments")  # shares [3, 4]; a unit of 5
    assert batch["packed"].segments is None and batch["input_ids"].shape == (1, 5)
    long = [torch.arange(3, 13), torch.cat([torch.arange(3, 8), torch.tensor([20, 21])])]  # share 5 of 10 + 7
    batch = pack_pairs([short[0], long[0]], [short[1], long[1]], 64, 0, attention="segments")
    assert batch["input_ids"].shape == (1, 17) and len(batch["packed"].segments.rows[0]) == 4
    apart = [torch.arange(3, 13), torch.arange(20, 30)]  # a long pair sharing nothing: two units of 10
    batch = pack_pairs([short[0], apart[0]], [short[1], apart[1]], 64, 0, attention="segments")
    assert batch["packed"].segments is None and batch["input_ids"].shape == (3, 10)


def test_shared_prefix_stops_before_the_rejected_sides_first_label_and_last_token():
    t = torch.tensor
    chosen, rejected = t([5, 6, 7, 8, 9]), t([5, 6, 7, 4])
    assert shared_prefix_len(chosen, rejected) == 3
    assert shared_prefix_len(chosen, t([5, 6, 7])) == 2  # the rejected side keeps a last token of its own
    assert shared_prefix_len(t([5, 6]), t([5, 6, 7, 8])) == 2  # the chosen side may be all prefix
    assert shared_prefix_len(chosen, rejected, t([-100, -100, 7, 4])) == 1  # its first label: token 2
    assert shared_prefix_len(chosen, rejected, t([-100, 6, 7, 4])) == 0
    assert shared_prefix_len(t([4, 6]), rejected) == 0


def test_eager_attention_gets_the_shared_prefix_mask_as_an_additive_one():
    torch.manual_seed(0)
    sdpa = Actor.from_config(CONFIGS["llama"]()).eval()
    config = CONFIGS["llama"]()  # a config of its own: a model keeps the config object it was built from
    config._attn_implementation = "eager"
    eager = Actor.from_config(config).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert (packing_attention(sdpa), packing_attention(eager)) == ("segments", "dense")
    batch = PackingPreferenceCollator(0, MAX_LEN)(_prompt_pairs())
    with torch.no_grad():
        torch.testing.assert_close(eager(batch["input_ids"], **model_inputs(batch)),
                                   sdpa(batch["input_ids"], **model_inputs(batch)), atol=1e-5, rtol=0)
    by_segments = PackingPreferenceCollator(0, MAX_LEN, "segments")(_prompt_pairs())
    with pytest.raises(UsageError, match=r"attention=packing_attention\(model\)"):
        eager(by_segments["input_ids"], **model_inputs(by_segments))


@pytest.mark.parametrize("attention", ["segments", "dense"])
@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "gemma2", "gemma3_text"])
def test_a_sliding_window_applies_to_pairs_sharing_a_prompt(model_type, attention):
    """transformers takes the given mask as is, so the window (Mistral: every layer; Qwen2: the layers past
    ``max_window_layers``; Gemma 2 / 3: the layers ``layer_types`` marks sliding) must be in it: each side's
    logits still equal its logits alone, where the model applies the window itself, and differ from the logits
    without a window."""
    torch.manual_seed(0)
    config = CONFIGS[model_type]()
    config.sliding_window = 4
    if model_type == "qwen2":
        config.use_sliding_window, config.max_window_layers = True, 1
        config.layer_types = ["full_attention", "sliding_attention"]
    if model_type.startswith("gemma"):
        assert "sliding_attention" in config.layer_types
    actor = Actor.from_config(config).eval()
    if packing_attention(actor) != attention == "segments":
        pytest.skip("eager attention takes no segment layout")
    pairs = _prompt_pairs()
    batch = PackingPreferenceCollator(0, MAX_LEN, attention)(pairs)
    n = len(pairs)
    with torch.no_grad():
        packed = actor(batch["input_ids"], **model_inputs(batch))
        unwindowed = Actor.from_config(CONFIGS[model_type]()).eval()
        unwindowed.load_state_dict(actor.state_dict())
        worst = 0.0
        for i, p in enumerate(pairs):
            for j, side in ((i, "chosen"), (n + i, "rejected")):
                ids = p[f"{side}_input_ids"]
                mine = batch["packed"].sample_ids == j
                if side == "chosen" and batch["packed"].shared_ids is not None:
                    mine |= batch["packed"].shared_ids == n + i
                alone = actor(ids[None])[0][-int(mine.sum()):]
                torch.testing.assert_close(packed[mine], alone, atol=1e-5, rtol=0)
                worst = max(worst, float((unwindowed(ids[None])[0][-int(mine.sum()):] - alone).abs().max()))
    assert worst > 1e-3  # the window really cut attention here


def _masked_attention(q, k, v, allowed):
    """Attention by hand: softmax over the allowed keys, zero for a query with none (padding)."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return (weights @ v).transpose(1, 2)


@pytest.mark.parametrize("window", [None, 3])
def test_segment_attention_equals_attention_under_the_layouts_mask(window):
    """Two rows by hand: row 0 a pair sharing a 3-token prompt (chosen 0..6, rejected part 6..9 reading 0..3)
    then a sample 9..12 and 2 pad slots; row 1 one sample and 9 pad slots. GQA: 4 query heads on 2 kv heads."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 14, 8, generator=g)
    k, v = torch.randn(2, 2, 14, 8, generator=g), torch.randn(2, 2, 14, 8, generator=g)
    layout = Segments((((0, 6, 0, 0), (6, 9, 0, 3), (9, 12, 9, 0)), ((0, 5, 0, 0),)))
    allowed = torch.zeros(2, 14, 14, dtype=torch.bool)
    position = torch.zeros(2, 14, dtype=torch.long)
    for r, pieces in enumerate(layout.rows):
        for start, end, prefix_start, prefix_len in pieces:
            keys = list(range(prefix_start, prefix_start + prefix_len)) + list(range(start, end))
            for n, i in enumerate(range(start, end)):
                position[r, i] = prefix_len + n
                for j in keys[:prefix_len + n + 1]:
                    allowed[r, i, j] = True
    if window is not None:
        for r in range(2):
            for i in range(14):
                for j in range(14):
                    if allowed[r, i, j] and position[r, i] - position[r, j] >= window:
                        allowed[r, i, j] = False
    module = torch.nn.Module()
    out, _ = segment_sdpa_forward(module, q, k, v, None, coati_segments=layout, sliding_window=window)
    torch.testing.assert_close(out, _masked_attention(q, k, v, allowed[:, None]), atol=1e-5, rtol=0)
    assert float(out[0, 12:].abs().max()) == 0.0 and float(out[1, 5:].abs().max()) == 0.0  # padding


def test_a_layout_that_never_reaches_the_attention_fails_loudly():
    """The placeholder mask of a segment call is empty: an attention called without the layout refuses it
    instead of attending across samples."""
    q = k = v = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="did not reach the attention"):
        segment_sdpa_forward(torch.nn.Module(), q, k, v, torch.zeros(1, 1, 0, 0, dtype=torch.bool))


def test_first_fit_fills_rows_up_to_max_len_deterministically():
    lengths = [5, 11, 3, 8, 7, 2, 9]
    rows = first_fit(lengths, 12)
    assert rows == [[1], [6, 2], [3, 5], [4, 0]]
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 12 for r in rows)


def _pair_tokens(pairs: list[dict]) -> int:
    return sum(len(p[k]) for p in pairs for k in p if k.endswith("input_ids"))


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)


def _loader(strategy, data, collate, batch_size):
    return strategy.setup_dataloader(data, batch_size, shuffle=False, collate_fn=collate)


@pytest.mark.parametrize("attention,grad_checkpoint", [("dense", False), ("segments", False), ("segments", True)])
@pytest.mark.parametrize("model_type", PACKING)
def test_packed_sft_gives_the_unpacked_loss_and_gradient(model_type, attention, grad_checkpoint):
    """Activation checkpointing recomputes each layer in backward: the segment layout must reach it again."""
    if model_type in EAGER and attention == "segments":
        pytest.skip("eager attention takes no segment layout")
    items = _sft_items()
    results = []
    for collate in (SFTCollator(0), PackingCollator(0, MAX_LEN, attention)):
        torch.manual_seed(0)
        strategy = NaiveStrategy(seed=0)
        model = strategy.prepare_model(Actor.from_config(CONFIGS[model_type](), grad_checkpoint=grad_checkpoint))
        trainer = SFTTrainer(model, strategy, _loader(strategy, items, collate, len(items)), log_interval=100)
        batch = collate(items)
        loss_sum, count, _ = trainer.compute_loss(batch)
        loss_sum.backward()
        # per-sample losses: each sample's summed token loss from its own labelled positions
        with torch.no_grad():
            logits = model(batch["input_ids"], **model_inputs(batch))
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                    reduction="none")
            if "packed" in batch:
                picked = batch["labels"][:, 1:] != -100
                per_sample = torch.zeros(len(items)).index_add(0, batch["packed"].sample_ids[:, 1:][picked], nll[picked])
            else:
                per_sample = nll.sum(1)
        results.append((float(loss_sum.detach()), int(count), per_sample, _grads(model)))
    (plain_loss, plain_n, plain_ps, plain_g), (packed_loss, packed_n, packed_ps, packed_g) = results
    assert packed_n == plain_n == sum(int((it["labels"][1:] != -100).sum()) for it in items)
    assert packed_loss == pytest.approx(plain_loss, abs=1e-5, rel=1e-6)
    torch.testing.assert_close(packed_ps, plain_ps, atol=1e-5, rtol=1e-6)
    _assert_same_grads(plain_g, packed_g)


def test_packed_reward_model_gives_the_unpacked_rewards_and_gradient():
    pairs = _pairs() + _prompt_pairs()
    results = []
    for collate in (RewardCollator(0),
                    *(PackingRewardCollator(0, MAX_LEN, a) for a in ("segments", "dense", "varlen"))):
        torch.manual_seed(0)
        strategy = NaiveStrategy(seed=0)
        model = strategy.prepare_model(RewardModel.from_config(CONFIGS["llama"]()))
        trainer = RewardModelTrainer(model, strategy, _loader(strategy, pairs, collate, len(pairs)), log_interval=100)
        batch = collate(pairs)
        if isinstance(collate, PackingRewardCollator):  # the prompts, 5 + 3 + 8 tokens, once when shared
            shares = collate.attention != "varlen"
            assert (batch["packed"].shared_ids is not None) == shares and (batch["packed"].segments is not None) == (collate.attention == "segments")
            assert int((batch["packed"].sample_ids >= 0).sum()) == _pair_tokens(pairs) - 16 * shares
            if shares:
                assert int((batch["packed"].shared_ids >= 0).sum()) == 16
        chosen, rejected = trainer.rewards(batch)
        loss_sum, count, _ = trainer.compute_loss(batch)
        loss_sum.backward()
        results.append((chosen.detach(), rejected.detach(), float(loss_sum), int(count), _grads(model)))
    plain = results[0]
    for packed in results[1:]:
        assert packed[3] == plain[3] == len(pairs)
        torch.testing.assert_close(packed[0], plain[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[1], plain[1], atol=1e-5, rtol=0)
        assert packed[2] == pytest.approx(plain[2], abs=1e-5)
        _assert_same_grads(plain[4], packed[4])


def test_packed_dpo_gives_the_unpacked_logps_loss_and_gradient():
    pairs = _pairs() + _prompt_pairs()
    results = []
    for collate in (PreferenceCollator(0),
                    *(PackingPreferenceCollator(0, MAX_LEN, a) for a in ("segments", "dense", "varlen"))):
        torch.manual_seed(0)
        strategy = NaiveStrategy(seed=0)
        model = strategy.prepare_model(Actor.from_config(CONFIGS["llama"]()))
        trainer = DPOTrainer(model, strategy, _loader(strategy, pairs, collate, len(pairs)), log_interval=100,
                             config=PreferenceConfig(loss_type="dpo", sft_coef=0.5))
        with torch.no_grad():  # the reference copy starts equal to the policy: move the policy off it
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        batch = collate(pairs)
        if isinstance(collate, PackingPreferenceCollator):
            assert (batch["packed"].shared_ids is not None) == (collate.attention != "varlen")
            if collate.attention != "varlen":  # the prompts (5, 3, 8 tokens) but the last token each side keeps
                assert int((batch["packed"].shared_ids >= 0).sum()) == 4 + 2 + 7
        logps, lengths = batch_logps(model, batch)
        loss_sum, count, _ = trainer.compute_loss(batch)
        loss_sum.backward()
        results.append((logps.detach(), lengths, float(loss_sum), int(count), _grads(model)))
    plain = results[0]
    for packed in results[1:]:
        assert packed[0].shape == (2 * len(pairs),)
        torch.testing.assert_close(packed[0], plain[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[1], plain[1])
        assert packed[3] == plain[3] == len(pairs)
        assert packed[2] == pytest.approx(plain[2], abs=1e-5)
        _assert_same_grads(plain[4], packed[4])


# ----- resume, grouping, metrics ----------------------------------------------------------------------

def _fit_items(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return _sft_items(seed, [int(x) for x in torch.randint(3, 13, (n,), generator=g)])


def _sft_trainer(save_path: pathlib.Path, *, packing: bool, group_by_length: bool, log_interval: int = 100):
    strategy = NaiveStrategy(seed=0)
    torch.manual_seed(0)
    config = tiny.gpt2_config(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, **_SMALL)
    model = strategy.prepare_model(Actor.from_config(config))
    data = _fit_items(24, seed=1)
    collate = PackingCollator(0, MAX_LEN) if packing else SFTCollator(0)
    lengths = sample_lengths(data) if group_by_length else None
    train = strategy.setup_dataloader(data, 4, shuffle=True, collate_fn=collate, drop_last=True, lengths=lengths)
    return SFTTrainer(model, strategy, train, None, lr=1e-3, max_epochs=2, accumulation_steps=2,
                      save_path=str(save_path), save_interval=4, log_interval=log_interval)


@pytest.mark.parametrize("packing,group_by_length", [(True, False), (False, True)])
def test_resume_is_exact_with_packing_and_with_length_grouping(packing, group_by_length, tmp_path):
    full = _sft_trainer(tmp_path / "full", packing=packing, group_by_length=group_by_length).fit()
    assert len(full) == 6
    resumed = _sft_trainer(tmp_path / "resumed", packing=packing, group_by_length=group_by_length).fit(
        resume_from=tmp_path / "full" / "checkpoints" / "step_4")
    assert [h["loss"] for h in resumed[4:]] == [h["loss"] for h in full[4:]]


def test_length_grouping_keeps_every_sample_once_and_groups_lengths_across_ranks():
    lengths = [int(x) for x in torch.randint(1, 200, (103,), generator=torch.Generator().manual_seed(0))]
    data = list(range(103))
    shares = []
    for rank in range(2):
        s = LengthGroupedSampler(data, lengths, 4, num_replicas=2, rank=rank, shuffle=True, seed=3, drop_last=True)
        s.set_epoch(1)
        shares.append(list(s))
    assert not set(shares[0]) & set(shares[1]) and len(shares[0]) == len(shares[1]) == 51
    # a whole epoch fits in one group here: each rank's order, and a step's batches across ranks, fall in length
    for share in shares:
        assert [lengths[i] for i in share] == sorted((lengths[i] for i in share), reverse=True)
    spread = [max(lengths[i] for s in shares for i in s[b:b + 4]) - min(lengths[i] for s in shares for i in s[b:b + 4])
              for b in range(0, 48, 4)]
    assert max(spread) < 40  # 8 of 102 random lengths in 1..199
    # seeded: the same epoch gives the same order, another epoch another one
    again = LengthGroupedSampler(data, lengths, 4, num_replicas=2, rank=0, shuffle=True, seed=3, drop_last=True)
    again.set_epoch(1)
    assert list(again) == shares[0]
    again.set_epoch(2)
    assert list(again) != shares[0]


@pytest.mark.parametrize("packing", [False, True])
def test_padding_share_is_the_hand_count_of_pad_slots(packing, tmp_path):
    trainer = _sft_trainer(tmp_path / "run", packing=packing, group_by_length=False, log_interval=1)
    batches = list(epoch_iter(trainer.train_dataloader, 0))
    history = trainer.fit()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if r["split"] == "train"]
    assert [r["step"] for r in logged] == list(range(1, 7))
    for step in range(3):
        group = batches[2 * step: 2 * step + 2]
        slots = sum(b["input_ids"].numel() for b in group)
        real = sum(int(b["packed"].seq_lens.sum()) if packing else int(b["attention_mask"].sum()) for b in group)
        assert logged[step]["perf/padding_share"] == pytest.approx(1 - real / slots)
        assert logged[step]["perf/throughput"] > 0
        assert history[step]["loss"] > 0
    if packing:
        # rows that fill exactly carry no padding at all
        exact = pack([torch.arange(3, 3 + n) for n in (10, 14, 24, 6, 18)], None, 24, 0)
        assert int((exact["packed"].sample_ids < 0).sum()) == 0


def test_a_packed_row_without_padding_has_padding_share_zero():
    from coati.dataset.packing import batch_token_counts

    batch = PackingCollator(0, 12)(_sft_items(0, (5, 7, 12, 4, 8)))
    assert batch["input_ids"].shape == (3, 12)
    assert batch_token_counts(batch) == (36, 36)
    padded = SFTCollator(0)(_sft_items(0, (5, 7, 12, 4, 8)))
    assert batch_token_counts(padded) == (36, 60)


# ----- the scripts --------------------------------------------------------------------------------------

def _sft_script_run(tmp_path: pathlib.Path, name: str, model_dir: pathlib.Path, *flags: str) -> list[dict]:
    from tests.scripts import load_script

    # lengths spread widely, so rows as long as the longest sample hold several of the short ones
    records = [{"instruction": "Say " + "hello " * (n * n // 2 + 1), "output": "Hello " * (n % 5 + 1)}
               for n in range(1, 9)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / name
    load_script("examples/train_sft.py").main(
        ["--pretrain", str(model_dir), "--dataset", str(data), "--batch_size", "8", "--accumulation_steps", "1",
         "--max_len", "128", "--max_steps", "1", "--max_epochs", "1", "--log_interval", "1", "--save_path", str(out),
         *flags])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_sft_packs_by_default_where_the_architecture_allows_and_refuses_it_where_not(tmp_path):
    llama = tiny.save_tiny_model("llama", tmp_path / "llama")
    packed = _sft_script_run(tmp_path, "packed", llama)[0]
    padded = _sft_script_run(tmp_path, "padded", llama, "--no-packing")[0]
    assert packed["perf/padding_share"] < padded["perf/padding_share"]
    assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-5)
    opt = tmp_path / "opt"
    config = CONFIGS["opt"]()
    config.vocab_size, config.max_position_embeddings = tiny.LLAMA_VOCAB, 256
    tiny._save(config, tiny.tokenizer("llama"), opt, seed=0)
    assert _sft_script_run(tmp_path, "opt_auto", opt)[0]["perf/padding_share"] > 0  # auto: padded
    with pytest.raises(UsageError, match=r"model_type 'opt' \(family 'auto'\) cannot keep packed samples apart"):
        _sft_script_run(tmp_path, "opt_packed", opt, "--packing")


@pytest.mark.parametrize("script", ["train_reward_model", "train_dpo"])
def test_pair_scripts_pack_shared_prompts_with_the_padded_losses(script, tmp_path):
    """The scripts' default ``--packing`` lays each pair out with its prompt once: the same losses as padded,
    the later steps' too (so the updates were the same)."""
    from tests.scripts import load_script

    llama = tiny.save_tiny_model("llama", tmp_path / "llama")
    records = [{"prompt": "Tell me about the number " + "one two three " * n,
                "chosen": "It is " + "fine " * (n % 3 + 1), "rejected": "No" + " no" * (n % 4)} for n in range(1, 9)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = []
    for name, flags in (("packed", []), ("padded", ["--no-packing"])):
        out = tmp_path / name
        load_script(f"examples/{script}.py").main(
            ["--pretrain", str(llama), "--dataset", str(data), "--batch_size", "4", "--accumulation_steps", "1",
             "--max_len", "128", "--max_steps", "3", "--max_epochs", "2", "--log_interval", "1", "--lr", "1e-3",
             "--eval_ratio", "0", "--save_path", str(out), *flags])
        logged = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        runs.append([r for r in logged if r["split"] == "train"])
    packed, padded = runs
    assert len(packed) == len(padded) == 3
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], abs=1e-5)
    assert max(abs(r["loss"] - packed[0]["loss"]) for r in packed) > 1e-3  # the steps moved the model


def test_packed_ptx_batches_give_the_padded_lm_loss():
    """PPO-ptx's pretraining batches go through the same model call (``model_inputs``) and the mean LM loss."""
    from coati.dataset.packing import model_inputs
    from coati.compat import PtxLoss

    torch.manual_seed(0)
    actor = Actor.from_config(CONFIGS["llama"]()).eval()
    items = _sft_items(3)
    losses = []
    for collate in (SFTCollator(0), PackingCollator(0, MAX_LEN)):
        batch = collate(items)
        with torch.no_grad():
            losses.append(float(PtxLoss()(actor(batch["input_ids"], **model_inputs(batch)), batch["labels"])))
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)


def test_kto_refuses_an_explicit_packing_and_leaves_auto_off():
    import argparse

    from coati.cli import packing_from_args

    args = argparse.Namespace(packing=True, model="auto", pretrain="unused", trust_remote_code=False)
    with pytest.raises(UsageError, match="KTO batches are not packed; use --no-packing"):
        packing_from_args(args, stage_packs=False, stage="KTO")
    args.packing = "auto"
    assert packing_from_args(args, stage_packs=False, stage="KTO") is False


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["sdpa", "flex_attention"])
def test_a_packed_sample_has_its_logits_alone_on_cuda(impl):
    """The GPU attention kernels a packed batch runs through (sdpa as coati's segment attention, one row;
    FlexAttention's document mask over rows of max_len) isolate each sample as the CPU path does."""
    torch.manual_seed(0)
    config = CONFIGS["llama"]()
    config._attn_implementation = impl
    actor = Actor.from_config(config).cuda().eval()
    seqs = [s.cuda() for s in _ragged(0)]
    layout = packing_attention(actor)
    assert layout == ("segments" if impl == "sdpa" else "varlen")
    batch = {k: v.cuda() if torch.is_tensor(v) else v
             for k, v in pack(seqs, None, MAX_LEN, 0, attention=layout).items()}
    with torch.no_grad():
        packed = actor(batch["input_ids"], **model_inputs(batch))
        for i, ids in enumerate(seqs):
            alone = actor(ids[None])[0]
            torch.testing.assert_close(packed[batch["packed"].sample_ids == i], alone, atol=1e-4, rtol=0)
