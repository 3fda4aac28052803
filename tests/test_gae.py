"""GAE, KL controllers and the replay buffer against hand computations."""
import pytest
import torch

from coati.experience import Experience, ReplayBuffer
from coati.rl import AdaptiveKLController, FixedKLController, compute_gae


def _ragged():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [2.0, 9.0, 9.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.5, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    return rewards, values, mask


def test_gae_matches_hand_computation_on_ragged_masks():
    rewards, values, mask = _ragged()
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 3-.3 = 2.7; d1 = 2+.9*.3-.2 = 2.07, A1 = 2.07+.72*2.7; d0 = 1+.9*.2-.1 = 1.08, A0 = 1.08+.72*A1
    # row 1: last valid is t=1 (V after it = 0): A1 = -1-.5 = -1.5; A0 = .5+.9*.5-.4 + .72*(-1.5) = -0.53
    # row 2: only t=0: A0 = 2-.5 = 1.5; the padded 9s and 7s must not leak in
    expected_adv = torch.tensor([[3.97008, 4.014, 2.7], [-0.53, -1.5, 0.0], [1.5, 0.0, 0.0]])
    expected_ret = torch.tensor([[4.07008, 4.214, 3.0], [-0.13, -1.0, 0.0], [2.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, expected_ret, atol=1e-6, rtol=0)


def test_gae_with_gamma_lambda_one_is_monte_carlo_return_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 6), torch.randn(4, 6)
    lengths = torch.tensor([6, 3, 1, 5])
    mask = (torch.arange(6)[None] < lengths[:, None]).long()
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for b in range(4):
        n = int(lengths[b])
        mc = torch.flip(torch.cumsum(torch.flip(rewards[b, :n], [0]), 0), [0])
        torch.testing.assert_close(ret[b, :n], mc, atol=1e-6, rtol=0)
        torch.testing.assert_close(adv[b, :n], mc - values[b, :n], atol=1e-6, rtol=0)
        assert torch.all(adv[b, n:] == 0) and torch.all(ret[b, n:] == 0)


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        compute_gae(torch.zeros(2, 3), torch.zeros(2, 4), None)


def test_adaptive_kl_controller_follows_ziegler_formula():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 9 -> error clip(9/6-1) = 0.2; beta *= 1 + 0.2*256/10000
    assert ctl.update(9.0, 256) == pytest.approx(0.1 * 1.00512, abs=1e-12)
    # KL 3 -> error clip(-0.5) = -0.2; beta *= 1 - 0.2*100/10000
    assert ctl.update(3.0, 100) == pytest.approx(0.1 * 1.00512 * 0.998, abs=1e-12)
    # KL 6.6 -> error 0.1 (inside the clip); beta *= 1 + 0.1*1000/10000
    assert ctl.update(6.6, 1000) == pytest.approx(0.1 * 1.00512 * 0.998 * 1.01, abs=1e-12)
    restored = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = FixedKLController(0.1)
    assert fixed.update(100.0, 1000) == 0.1


def _experience(prompt_lens, action_lens, prompt_width, num_actions, seed):
    g = torch.Generator().manual_seed(seed)
    b = len(prompt_lens)
    seq = torch.zeros(b, prompt_width + num_actions, dtype=torch.long)
    attn = torch.zeros_like(seq)
    amask = torch.zeros(b, num_actions, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompt_lens, action_lens)):
        seq[i, prompt_width - p : prompt_width + a] = torch.randint(3, 100, (p + a,), generator=g)
        attn[i, prompt_width - p : prompt_width + a] = 1
        amask[i, :a] = 1
    rand = lambda: torch.randn(b, num_actions, generator=g) * amask  # noqa: E731
    return Experience(seq, attn, amask, rand(), rand(), rand(), rand(), info={"reward": torch.randn(b, generator=g)})


def test_buffer_repads_samples_from_different_batches():
    e1 = _experience([2, 4], [3, 1], prompt_width=4, num_actions=3, seed=0)
    e2 = _experience([1, 5, 3], [5, 2, 4], prompt_width=6, num_actions=5, seed=1)
    buf = ReplayBuffer(pad_token_id=0, cpu_offload=True)
    buf.append(e1)
    buf.append(e2)
    assert len(buf) == 5 and buf.num_micro_batches(2) == 3
    batches = list(buf.micro_batches(2, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [b.batch_size for b in batches] == [2, 2, 1]
    # Every sample comes back once, with the same valid tokens and per-action values.
    originals = {}
    for e in (e1, e2):
        for i in range(e.batch_size):
            n = int(e.action_mask[i].sum())
            originals[tuple(e.sequences[i][e.attention_mask[i].bool()].tolist())] = e.action_log_probs[i, :n]
    seen = 0
    for b in batches:
        for i in range(b.batch_size):
            key = tuple(b.sequences[i][b.attention_mask[i].bool()].tolist())
            n = int(b.action_mask[i].sum())
            torch.testing.assert_close(b.action_log_probs[i, :n], originals[key])
            assert torch.all(b.action_log_probs[i, n:] == 0)
            # response tokens are the last num_actions columns, prompt left-padded right before them
            assert b.attention_mask[i, -b.num_actions :].sum() == n
            seen += 1
    assert seen == 5
    buf.clear()
    assert len(buf) == 0


def test_buffer_limit_keeps_most_recent():
    buf = ReplayBuffer(limit=3)
    buf.append(_experience([2, 2], [1, 1], 2, 1, seed=0))
    e = _experience([3, 3], [2, 2], 3, 2, seed=1)
    buf.append(e)
    buf.append(_experience([1], [1], 1, 1, seed=2))
    assert len(buf) == 3
    assert torch.equal(buf.items[0].sequences, e.sequences[:1])
