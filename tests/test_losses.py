"""Losses and RLHF tensor helpers against hand computations (explicit Python loops over small tensors)."""
import math

import pytest
import torch

from coati.compat import PolicyLoss, PtxLoss, compute_approx_kl, log_probs_from_logits, masked_whiten
from coati.models import GPTLMLoss, LogExpLoss, LogSigLoss, last_token_index, masked_mean, position_ids_from_mask
from coati.rl import ValueLoss, compute_reward

# ragged action masks: 3 valid, 1 valid, 4 valid, 0 valid tokens
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float() * scale


def _seq_then_batch(per_token, mask):
    """Masked mean per row (0 for an empty row), then mean over rows."""
    rows = []
    for i in range(mask.size(0)):
        vals = [per_token(i, t) for t in range(mask.size(1)) if mask[i, t]]
        rows.append(sum(vals) / len(vals) if vals else 0.0)
    return sum(rows) / len(rows)


@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_pairwise_ranking_losses_match_hand(margin):
    chosen = torch.tensor([1.0, -0.5, 2.0, 0.1])
    reject = torch.tensor([0.0, 0.5, 2.5, 0.1])
    expected_sig = sum(-math.log(1 / (1 + math.exp(-(c - r - margin)))) for c, r in zip(chosen.tolist(), reject.tolist())) / 4
    expected_exp = sum(math.log(1 + math.exp(r - c + margin)) for c, r in zip(chosen.tolist(), reject.tolist())) / 4
    assert LogSigLoss(margin)(chosen, reject).item() == pytest.approx(expected_sig, abs=1e-6)
    assert LogExpLoss(margin)(chosen, reject).item() == pytest.approx(expected_exp, abs=1e-6)
    # a larger margin demands a larger gap, so the loss grows
    assert LogSigLoss(margin + 1.0)(chosen, reject).item() > expected_sig


def test_policy_loss_matches_hand():
    eps = 0.2
    log_probs, old, adv = _rand(4, 4, seed=1, scale=0.3), _rand(4, 4, seed=2, scale=0.3), _rand(4, 4, seed=3)
    loss, metrics = PolicyLoss(clip_eps=eps)(log_probs, old, adv, MASK)

    def token_loss(i, t):
        ratio = math.exp(log_probs[i, t].item() - old[i, t].item())
        a = adv[i, t].item()
        return -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)

    def clipped(i, t):
        ratio = math.exp(log_probs[i, t].item() - old[i, t].item())
        a = adv[i, t].item()
        return float(min(max(ratio, 1 - eps), 1 + eps) * a < ratio * a)

    def kl(i, t):
        lr = log_probs[i, t].item() - old[i, t].item()
        return math.exp(lr) - 1 - lr

    assert loss.item() == pytest.approx(_seq_then_batch(token_loss, MASK), abs=1e-6)
    clip_frac = _seq_then_batch(clipped, MASK)
    assert 0 < clip_frac < 1  # the data exercises both branches
    assert float(metrics["clip_frac"]) == pytest.approx(clip_frac, abs=1e-6)
    assert float(metrics["approx_kl"]) == pytest.approx(_seq_then_batch(kl, MASK), abs=1e-6)
    # masked-out tokens carry no gradient
    log_probs.requires_grad_(True)
    PolicyLoss(eps)(log_probs, old, adv, MASK)[0].backward()
    assert torch.all(log_probs.grad[MASK == 0] == 0)


def test_value_loss_matches_hand():
    eps = 0.4
    old, returns = _rand(4, 4, seed=5), _rand(4, 4, seed=6)
    # move half of the values far towards the returns (the clipped error wins there), the rest a little
    step = torch.tensor([[1.0, 0.1, 0.9, 1.0], [0.1, 1.0, 1.0, 1.0], [0.9, 0.2, 1.0, 0.1], [1.0, 1.0, 1.0, 1.0]])
    values = old + step * (returns - old) + _rand(4, 4, seed=4, scale=0.05)
    loss, metrics = ValueLoss(clip_eps=eps)(values, old, returns, MASK)

    def parts(i, t):
        v, o, r = values[i, t].item(), old[i, t].item(), returns[i, t].item()
        v_clip = o + min(max(v - o, -eps), eps)
        return (v - r) ** 2, (v_clip - r) ** 2

    expected = 0.5 * _seq_then_batch(lambda i, t: max(parts(i, t)), MASK)
    clip_frac = _seq_then_batch(lambda i, t: float(parts(i, t)[1] > parts(i, t)[0]), MASK)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert 0 < clip_frac < 1
    assert float(metrics["clip_frac"]) == pytest.approx(clip_frac, abs=1e-6)


def test_masked_mean_and_whiten():
    x = _rand(4, 4, seed=7)
    total = [x[i, t].item() for i in range(4) for t in range(4) if MASK[i, t]]
    assert masked_mean(x, MASK).item() == pytest.approx(sum(total) / len(total), abs=1e-6)
    rows = masked_mean(x, MASK, dim=1)
    for i in range(4):
        vals = [x[i, t].item() for t in range(4) if MASK[i, t]]
        assert rows[i].item() == pytest.approx(sum(vals) / len(vals) if vals else 0.0, abs=1e-6)
    w = masked_whiten(x, MASK)
    wv = torch.tensor([w[i, t].item() for i in range(4) for t in range(4) if MASK[i, t]], dtype=torch.float64)
    assert wv.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert (wv ** 2).mean().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("reward_clip", [None, 1.0])
def test_compute_reward_matches_hand(reward_clip):
    kl_coef = 0.1
    r = torch.tensor([2.5, -0.3, 0.7, 1.0])
    log_probs, ref = _rand(4, 4, seed=8), _rand(4, 4, seed=9)
    out = compute_reward(r, kl_coef, log_probs, ref, MASK, reward_clip=reward_clip)
    for i in range(4):
        valid = [t for t in range(4) if MASK[i, t]]
        for t in range(4):
            expected = 0.0
            if MASK[i, t]:
                expected = -kl_coef * (log_probs[i, t].item() - ref[i, t].item())
                if t == valid[-1]:
                    ri = r[i].item()
                    expected += ri if reward_clip is None else min(max(ri, -reward_clip), reward_clip)
            assert out[i, t].item() == pytest.approx(expected, abs=1e-6), (i, t)


def test_approx_kl_matches_hand():
    log_probs, ref = _rand(4, 4, seed=10, scale=0.5), _rand(4, 4, seed=11, scale=0.5)
    per_seq = compute_approx_kl(log_probs, ref, MASK)
    per_token = compute_approx_kl(log_probs, ref)
    for i in range(4):
        ks = []
        for t in range(4):
            lr = ref[i, t].item() - log_probs[i, t].item()
            k = math.exp(lr) - 1 - lr
            assert per_token[i, t].item() == pytest.approx(k, abs=1e-6)
            if MASK[i, t]:
                ks.append(k)
        assert per_seq[i].item() == pytest.approx(sum(ks) / len(ks) if ks else 0.0, abs=1e-6)
    assert torch.all(per_token >= 0)


def test_lm_loss_matches_hand_cross_entropy():
    logits = _rand(3, 5, 7, seed=12)
    labels = torch.tensor([[5, 1, -100, 3, 6], [-100, -100, -100, -100, -100], [0, 2, 4, 6, -100]])
    logp = torch.log_softmax(logits.double(), -1)
    terms = [-logp[b, t, labels[b, t + 1]].item() for b in range(3) for t in range(4) if labels[b, t + 1] != -100]
    loss_fn = GPTLMLoss()
    assert loss_fn(logits, labels).item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)
    assert loss_fn(logits, labels, reduction="sum").item() == pytest.approx(sum(terms), abs=1e-4)
    # the all -100 row contributes nothing: same mean as the batch without it
    assert loss_fn(logits, labels).item() == pytest.approx(loss_fn(logits[[0, 2]], labels[[0, 2]]).item(), abs=1e-6)
    # a batch with no counted token gives 0, not NaN
    only_masked = loss_fn(logits[1:2], labels[1:2])
    assert not torch.isnan(only_masked) and only_masked.item() == 0.0
    assert PtxLoss()(logits, labels).item() == pytest.approx(loss_fn(logits, labels).item())


def test_log_probs_from_logits_and_index_helpers():
    logits, labels = _rand(2, 3, 6, seed=13), torch.tensor([[1, 5, 0], [2, 2, 4]])
    lp = log_probs_from_logits(logits, labels)
    for b in range(2):
        for t in range(3):
            row = logits[b, t].double()
            expected = row[labels[b, t]].item() - math.log(sum(math.exp(v) for v in row.tolist()))
            assert lp[b, t].item() == pytest.approx(expected, abs=1e-5)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [4, 2, 2, 0]
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 0, 1, 1, 1],
                                                     [0, 0, 0, 0, 0]]
