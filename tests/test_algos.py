"""The RL algorithm pieces against independent hand computations (explicit Python loops over lists).

One fixed batch: 7 responses of ragged lengths (one empty), 4 prompts: a group of 3 with different rewards,
a group of 2 with equal rewards, and two groups of one.
"""
import math

import pytest
import torch

from coati import rl

LENGTHS = [4, 2, 3, 1, 4, 0, 2]
GROUP = [0, 0, 0, 1, 1, 2, 3]
SCORES = [1.0, 0.0, 0.5, 0.7, 0.7, 2.0, -1.0]
A = 4


def _mask():
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(A)] for n in LENGTHS])


def _rand(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(LENGTHS), A, generator=g) * scale


def _groups():
    out = {}
    for i, g in enumerate(GROUP):
        out.setdefault(g, []).append(SCORES[i])
    return out


def _close(tensor, rows, tol=1e-5):
    assert tensor.shape == (len(rows), A)
    for i, row in enumerate(rows):
        for t in range(A):
            assert abs(float(tensor[i, t]) - row[t]) < tol, (i, t, float(tensor[i, t]), row[t])


def _per_token(values):
    return [[values[i] if t < LENGTHS[i] else 0.0 for t in range(A)] for i in range(len(LENGTHS))]


def _whiten_rows(rows):
    vals = [rows[i][t] for i in range(len(rows)) for t in range(LENGTHS[i])]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / len(vals)
    return [[(rows[i][t] - mean) / math.sqrt(var + 1e-8) if t < LENGTHS[i] else 0.0 for t in range(A)]
            for i in range(len(rows))]


def _inputs(**extra):
    return dict(scores=torch.tensor(SCORES), group=torch.tensor(GROUP), mask=_mask(), **extra)


def test_grpo_is_group_zscore_and_zero_without_signal():
    groups = _groups()
    expected = []
    for i, g in enumerate(GROUP):
        xs = groups[g]
        if len(xs) == 1:
            expected.append(0.0)
            continue
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        expected.append((SCORES[i] - mean) / (std + 1e-6))
    adv, ret = rl.ADV_ESTIMATORS["grpo"](**_inputs())
    _close(adv, _per_token(expected))
    _close(ret, _per_token(expected))
    assert not torch.isnan(adv).any()
    assert float(adv[3].abs().sum()) == 0.0  # the all-equal group


def test_dr_grpo_subtracts_the_group_mean_only():
    groups = _groups()
    expected = [0.0 if len(groups[g]) == 1 else SCORES[i] - sum(groups[g]) / len(groups[g])
                for i, g in enumerate(GROUP)]
    adv, _ = rl.ADV_ESTIMATORS["dr_grpo"](**_inputs())
    _close(adv, _per_token(expected))


def test_rloo_baseline_leaves_the_sample_out():
    expected = []
    for i, g in enumerate(GROUP):
        others = [SCORES[j] for j, h in enumerate(GROUP) if h == g and j != i]
        expected.append(SCORES[i] - sum(others) / len(others) if others else 0.0)
    adv, _ = rl.ADV_ESTIMATORS["rloo"](**_inputs())
    _close(adv, _per_token(expected))


def _token_rewards(kl):
    """Per-token rewards as the experience maker builds them: -0.1 * kl on each token, score on the last."""
    rows = []
    for i, n in enumerate(LENGTHS):
        row = [-0.1 * float(kl[i, t]) if t < n else 0.0 for t in range(A)]
        if n:
            row[n - 1] += SCORES[i]
        rows.append(row)
    return rows


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_whitens_discounted_returns_over_the_batch(gamma):
    rows = _token_rewards(_rand(1))
    returns = []
    for i, n in enumerate(LENGTHS):
        out = [0.0] * A
        for t in range(n):
            out[t] = sum(gamma ** (k - t) * rows[i][k] for k in range(t, n))
        returns.append(out)
    adv, ret = rl.ADV_ESTIMATORS["reinforce_pp"](token_rewards=torch.tensor(rows), gamma=gamma, **_inputs())
    _close(ret, returns)
    _close(adv, _whiten_rows(returns), tol=1e-4)


def test_reinforce_pp_global_whitening_uses_the_reduced_statistics():
    """Split the batch across two "processes": with a summing reduce each half is whitened with the whole
    batch's statistics, so the halves together equal one process."""
    rows = torch.tensor(_token_rewards(_rand(2)))
    mask = _mask()
    whole, _ = rl.ADV_ESTIMATORS["reinforce_pp"](token_rewards=rows, mask=mask)
    halves = [slice(0, 3), slice(3, 7)]
    parts = {}
    # two threads stand for the two processes; reduce_sum is a real all-reduce between them
    import threading

    barrier, slots = threading.Barrier(2), {}

    def reduce_sum(t):
        me = threading.get_ident()
        slots[me] = t.clone()
        barrier.wait()
        total = sum(slots.values())
        barrier.wait()
        return total

    def run(h):
        parts[h.start], _ = rl.ADV_ESTIMATORS["reinforce_pp"](token_rewards=rows[h], mask=mask[h],
                                                                 reduce_sum=reduce_sum)

    threads = [threading.Thread(target=run, args=(h,)) for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.allclose(torch.cat([parts[0], parts[3]]), whole, atol=1e-6)


def test_gae_matches_the_recursion():
    rewards, values = _token_rewards(_rand(3)), _rand(4)
    expected_adv, expected_ret = [], []
    for i, n in enumerate(LENGTHS):
        adv = [0.0] * A
        nxt_v, nxt_a = 0.0, 0.0
        for t in reversed(range(n)):
            v = float(values[i, t])
            delta = rewards[i][t] + 0.9 * nxt_v - v
            adv[t] = delta + 0.9 * 0.8 * nxt_a
            nxt_v, nxt_a = v, adv[t]
        expected_adv.append(adv)
        expected_ret.append([adv[t] + float(values[i, t]) if t < n else 0.0 for t in range(A)])
    adv, ret = rl.ADV_ESTIMATORS["gae"](token_rewards=torch.tensor(rewards), values=values, gamma=0.9, lam=0.8,
                                           whiten_advantages=False, **_inputs())
    _close(adv, expected_adv)
    _close(ret, expected_ret)
    white, _ = rl.ADV_ESTIMATORS["gae"](token_rewards=torch.tensor(rewards), values=values, gamma=0.9, lam=0.8,
                                           **_inputs())
    _close(white, _whiten_rows(expected_adv), tol=1e-4)


@pytest.mark.parametrize("mode", rl.AGG_MODES)
def test_aggregation_modes(mode):
    loss = _rand(5)
    rows = [[float(loss[i, t]) for t in range(LENGTHS[i])] for i in range(len(LENGTHS))]
    if mode == "token_mean":
        flat = [x for r in rows for x in r]
        expected = sum(flat) / len(flat)
    elif mode == "seq_mean_token_mean":
        expected = sum(sum(r) / len(r) if r else 0.0 for r in rows) / len(rows)
    elif mode == "seq_mean_token_sum":
        expected = sum(sum(r) for r in rows) / len(rows)
    else:
        expected = sum(sum(r) / 16 for r in rows) / len(rows)
    got = rl.agg_loss(loss, _mask(), mode, norm_len=16)
    assert abs(float(got) - expected) < 1e-6
    with pytest.raises(ValueError, match="aggregation"):
        rl.agg_loss(loss, _mask(), "sum")


@pytest.mark.parametrize("kind", rl.KL_ESTIMATORS)
def test_kl_estimators(kind):
    logp, ref = _rand(6, 0.5), _rand(7, 0.5)
    out = rl.kl_estimate(logp, ref, kind)
    for i in range(len(LENGTHS)):
        for t in range(A):
            d = float(logp[i, t]) - float(ref[i, t])
            expected = {"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) - 1 + d}[kind]
            assert abs(float(out[i, t]) - expected) < 1e-5
    if kind == "k3":
        assert float(out.min()) >= 0.0


def test_kl_estimates_and_ratios_are_clamped_and_the_clamped_share_counted():
    """One token 13 nats below the reference: unclamped k3 would be e^13 - 14 = 4.4e5; it is 10 (veRL / OpenRLHF's
    bound) with no gradient, and the share of clamped tokens is that token's share of the valid ones."""
    logp = torch.zeros(len(LENGTHS), A)
    ref = torch.zeros(len(LENGTHS), A)
    ref[0, 1] = 13.0  # row 0 has 4 valid tokens
    ref[6, 3] = 30.0  # a padded position: not counted
    logp.requires_grad_(True)
    k3 = rl.kl_estimate(logp, ref, "k3")
    assert math.exp(13.0) - 14 > 4e5 and float(k3[0, 1].detach()) == rl.KL_CLAMP
    k3.sum().backward()
    assert float(logp.grad[0, 1]) == 0.0
    valid = sum(LENGTHS)
    assert float(rl.kl_clamped_share(logp, ref, "k3", _mask())) == pytest.approx(1 / valid)
    assert float(rl.kl_clamped_share(logp, ref, "k1", _mask())) == pytest.approx(1 / valid)  # 13 > 10
    assert float(rl.kl_clamped_share(logp, ref, "k3", _mask(), dim=-1)[0]) == pytest.approx(1 / 4)
    # the importance ratio's log is clamped to +-20 before exp: a 50-nat jump is a ratio of e^20, not e^50
    old = torch.zeros(len(LENGTHS), A)
    old[0, 0] = -50.0
    _, metrics = rl.POLICY_LOSSES["ppo"](torch.zeros(len(LENGTHS), A), old, torch.ones(len(LENGTHS), A), _mask())
    assert float(metrics["ratio_max"]) == pytest.approx(math.exp(rl.LOG_RATIO_CLAMP), rel=1e-5)


def _ppo_by_hand(logp, old, adv, lo, hi, dual):
    """Per-token loss and clipped flag, as PPO / DAPO / dual-clip define them."""
    losses, clipped = [], []
    for i in range(len(LENGTHS)):
        lrow, crow = [], []
        for t in range(A):
            r = math.exp(float(logp[i, t]) - float(old[i, t]))
            a = float(adv[i, t])
            s1, s2 = r * a, min(max(r, 1 - lo), 1 + hi) * a
            loss = -min(s1, s2)
            if dual is not None and a < 0:
                loss = min(loss, -dual * a)
            lrow.append(loss)
            crow.append(1.0 if s2 < s1 else 0.0)
        losses.append(lrow)
        clipped.append(crow)
    return losses, clipped


def _seq_token_mean(rows):
    return sum(sum(r[:n]) / n if n else 0.0 for r, n in zip(rows, LENGTHS)) / len(rows)


@pytest.mark.parametrize("lo, hi, dual", [(0.2, None, None), (0.2, 0.28, None), (0.2, None, 3.0)])
def test_ppo_clip_variants(lo, hi, dual):
    logp, old, adv = _rand(8, 0.4), _rand(9, 0.4), _rand(10)
    logp.requires_grad_(True)
    losses, clipped = _ppo_by_hand(logp.detach(), old, adv, lo, hi if hi is not None else lo, dual)
    loss, metrics = rl.POLICY_LOSSES["ppo"](logp, old, adv, _mask(), clip_low=lo, clip_high=hi, dual_clip=dual)
    assert abs(float(loss.detach()) - _seq_token_mean(losses)) < 1e-5
    assert abs(float(metrics["pg_clipfrac"]) - _seq_token_mean(clipped)) < 1e-6
    hi_ = hi if hi is not None else lo
    ratios = [[math.exp(float(logp[i, t]) - float(old[i, t])) for t in range(A)] for i in range(len(LENGTHS))]
    high = [[1.0 if r > 1 + hi_ and float(adv[i, t]) > 0 else 0.0 for t, r in enumerate(row)]
            for i, row in enumerate(ratios)]
    low = [[1.0 if r < 1 - lo and float(adv[i, t]) < 0 else 0.0 for t, r in enumerate(row)]
           for i, row in enumerate(ratios)]
    assert abs(float(metrics["pg_clipfrac_high"]) - _seq_token_mean(high)) < 1e-6
    assert abs(float(metrics["pg_clipfrac_low"]) - _seq_token_mean(low)) < 1e-6
    valid = [r for row, n in zip(ratios, LENGTHS) for r in row[:n]]
    assert float(metrics["ratio_max"]) == pytest.approx(max(valid), rel=1e-6)
    assert float(metrics["ratio_min"]) == pytest.approx(min(valid), rel=1e-6)
    loss.backward()
    assert float(logp.grad[_mask() == 0].abs().sum()) == 0.0  # padding gets no gradient


def test_ppo_clip_at_ratio_one_is_minus_advantage_and_unclipped():
    logp, adv = _rand(11), _rand(12)
    loss, metrics = rl.POLICY_LOSSES["ppo"](logp, logp.clone(), adv, _mask(), agg_mode="token_mean")
    m = _mask()
    assert abs(float(loss) + float((adv * m).sum() / m.sum())) < 1e-6
    assert float(metrics["pg_clipfrac"]) == 0.0 and abs(float(metrics["ppo_kl"])) < 1e-7
    assert float(metrics["ratio_max"]) == float(metrics["ratio_min"]) == 1.0


def test_gspo_uses_one_ratio_per_sequence():
    logp, old = _rand(13, 2e-4), _rand(14, 2e-4)
    per_seq_adv = [0.5, -1.0, 2.0, 0.3, -0.3, 1.0, 1.5]
    adv = torch.tensor(_per_token(per_seq_adv))
    lo, hi = 3e-4, 4e-4
    expected, grads = [], []
    for i, n in enumerate(LENGTHS):
        if n == 0:
            expected.append(0.0)
            continue
        s = math.exp(sum(float(logp[i, t]) - float(old[i, t]) for t in range(n)) / n)
        a = per_seq_adv[i]
        s1, s2 = s * a, min(max(s, 1 - lo), 1 + hi) * a
        expected.append(-min(s1, s2))
        # d loss_i / d logp_t = -(s a / n) when the unclipped branch is the minimum, else 0
        grads.append((i, n, -(s * a) / n if s1 <= s2 else 0.0))
    logp.requires_grad_(True)
    loss, _ = rl.POLICY_LOSSES["gspo"](logp, old, adv, _mask())
    assert abs(float(loss) - sum(expected) / len(LENGTHS)) < 1e-6
    loss.backward()
    for i, n, g in grads:
        for t in range(n):
            assert abs(float(logp.grad[i, t]) - g / len(LENGTHS)) < 1e-6


def test_gspo_dual_clip_bounds_a_negative_sequence_by_c_times_its_advantage():
    """Sequence-level dual clip: a negative-advantage sequence whose ratio s exceeds c loses -c A (no gradient)
    instead of -s A; a positive one, or one with s < c, keeps GSPO's clipped loss."""
    n = 3
    mask = torch.ones(2, n)
    old = torch.zeros(2, n)
    logp = torch.full((2, n), math.log(5.0))  # s = 5 for both sequences
    adv = torch.tensor([[-1.0] * n, [2.0] * n])
    logp.requires_grad_(True)
    loss, _ = rl.POLICY_LOSSES["gspo"](logp, old, adv, mask, dual_clip=3.0)
    # row 0: -min(5 * -1, (1 + 4e-4) * -1) = 5, bounded by -3 * -1 = 3; row 1: -min(10, (1 + 4e-4) * 2)
    assert float(loss) == pytest.approx((3.0 + -(1 + 4e-4) * 2) / 2, rel=1e-6)
    loss.backward()
    assert float(logp.grad.abs().sum()) == 0.0  # both branches taken are constants
    plain, _ = rl.POLICY_LOSSES["gspo"](logp.detach(), old, adv, mask)
    assert float(plain) == pytest.approx((5.0 + -(1 + 4e-4) * 2) / 2, rel=1e-6)


def test_rloo_aggregation_gives_every_token_its_sequences_advantage():
    """seq_mean_token_sum (RLOO's preset) on the policy: on-policy, d loss / d log pi_t = -A_i / B for every
    token of sequence i, whatever its length; seq_mean_token_mean gave a token of a 4-token answer a quarter
    of what a 1-token answer's token got."""
    adv = torch.tensor(_per_token([1.0] * len(LENGTHS)))
    for mode, want in (("seq_mean_token_sum", lambda n: -1.0 / len(LENGTHS)),
                       ("seq_mean_token_mean", lambda n: -1.0 / n / len(LENGTHS))):
        logp = _rand(15).requires_grad_(True)
        loss, _ = rl.POLICY_LOSSES["ppo"](logp, logp.detach(), adv, _mask(), agg_mode=mode)
        loss.backward()
        for i, n in enumerate(LENGTHS):
            for t in range(n):
                assert float(logp.grad[i, t]) == pytest.approx(want(n), rel=1e-6), (mode, i, t)
    assert rl.PRESETS["rloo"]["loss_agg_mode"] == "seq_mean_token_sum"


def test_overlong_penalty_depends_on_length_and_budget_only():
    """DAPO's penalty of a 60-token answer with a 100-token budget and a 50-token buffer: (50 - 60) / 50 = -0.2,
    whatever batch it is in; a buffer larger than the budget is an error, not a silent clamp."""
    lengths = torch.tensor([40.0, 60.0, 100.0, 130.0])
    got = rl.overlong_penalty(lengths, 100, 50, factor=1.0)
    assert got.tolist() == pytest.approx([0.0, -0.2, -1.0, -1.0])
    with pytest.raises(ValueError, match="exceeds the generation budget"):
        rl.overlong_penalty(lengths, 100, 4096)
    assert rl.PRESETS["dapo"]["overlong_buffer_len"].tokens(20480) == 4096  # DAPO's own setting
