"""DPO-family losses: each equals a hand computation on fixed log-probs, and TRL 1.16's implementation on the
same tensors where TRL has the loss (TRL's trainer methods are called directly, without building a trainer);
each loss type's default beta / gamma."""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from coati.errors import UsageError
from coati.models import preference_loss as pl
from coati.trainer import DPOTrainer, PreferenceConfig
from coati.utils.config import config_from_args
from tests.scripts import load_script

# Four pairs: summed response log-probs of policy and reference, and response lengths.
PC = torch.tensor([-12.0, -30.5, -8.25, -19.0])
PR = torch.tensor([-14.0, -28.0, -9.5, -25.0])
RC = torch.tensor([-13.0, -29.0, -8.0, -21.0])
RR = torch.tensor([-13.5, -29.5, -9.0, -22.0])
LC = torch.tensor([6.0, 15.0, 4.0, 10.0])
LR = torch.tensor([7.0, 14.0, 5.0, 12.0])


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def rows():
    return zip(PC.tolist(), PR.tolist(), RC.tolist(), RR.tolist(), LC.tolist(), LR.tolist())


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_by_hand(eps):
    beta = 0.5
    expect = []
    for pc, pr, rc, rr, _, _ in rows():
        h = (pc - rc) - (pr - rr)
        expect.append(-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h))
    got = pl.dpo_loss(PC, PR, RC, RR, beta, label_smoothing=eps)
    assert got.tolist() == pytest.approx(expect, abs=1e-6)


def test_ipo_by_hand():
    beta = 0.2
    expect = []
    for pc, pr, rc, rr, lc, lr in rows():
        h = (pc - rc) / lc - (pr - rr) / lr
        expect.append((h - 1 / (2 * beta)) ** 2)
    assert pl.ipo_loss(PC, PR, RC, RR, LC, LR, beta).tolist() == pytest.approx(expect, abs=1e-5)


def test_kto_by_hand():
    beta, wd, wu = 0.3, 1.0, 1.5
    logps = torch.cat([PC, PR])
    ref = torch.cat([RC, RR])
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    kl_logps, ref_kl = torch.tensor([-20.0, -18.0, -31.0]), torch.tensor([-21.0, -18.5, -30.0])
    z0 = max(0.0, ((-20 + 21) + (-18 + 18.5) + (-31 + 30)) / 3)
    assert float(pl.kto_kl_baseline(kl_logps, ref_kl)) == pytest.approx(z0)
    assert float(pl.kto_kl_baseline(ref_kl, kl_logps)) == 0.0  # a negative estimate is clamped
    expect = []
    for lp, rp, d in zip(logps.tolist(), ref.tolist(), desirable.tolist()):
        r = lp - rp
        expect.append(wd * (1 - sig(beta * (r - z0))) if d else wu * (1 - sig(beta * (z0 - r))))
    got = pl.kto_loss(logps, ref, desirable, pl.kto_kl_baseline(kl_logps, ref_kl), beta, wd, wu)
    assert got.tolist() == pytest.approx(expect, abs=1e-6)


def test_orpo_and_simpo_by_hand():
    lam, beta, gamma = 0.25, 2.0, 0.5
    ac, ar = (PC / LC).tolist(), (PR / LR).tolist()
    orpo, simpo = [], []
    for c, r in zip(ac, ar):
        log_odds = (c - r) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(r)))
        orpo.append(-c - lam * logsig(log_odds))
        simpo.append(-logsig(beta * (c - r) - gamma))
    assert pl.orpo_loss(PC / LC, PR / LR, lam).tolist() == pytest.approx(orpo, abs=1e-5)
    assert pl.simpo_loss(PC / LC, PR / LR, beta, gamma).tolist() == pytest.approx(simpo, abs=1e-6)
    assert pl.sft_nll(PC, LC).tolist() == pytest.approx([-c for c in ac])


@pytest.mark.parametrize("loss_type, beta", [("dpo", 0.1), ("ipo", 0.1), ("kto", 0.1), ("orpo", 0.1), ("simpo", 2.0)])
def test_beta_and_gamma_default_per_loss_type(loss_type, beta):
    """SimPO's paper (Llama-3-Base) trains with beta 2.0 and gamma 1.0; the others keep TRL's beta 0.1."""
    cfg = PreferenceConfig(loss_type=loss_type)
    assert (cfg.beta, cfg.gamma) == (beta, 1.0)
    explicit = PreferenceConfig(loss_type=loss_type, beta=2.5, gamma=0.3)
    assert (explicit.beta, explicit.gamma) == (2.5, 0.3)
    with pytest.raises(UsageError, match="beta"):
        PreferenceConfig(loss_type=loss_type, beta=0.0)
    parser = load_script("examples/train_dpo.py").build_parser()
    args = parser.parse_args(f"--pretrain P --dataset F --loss_type {loss_type}".split())
    assert (args.beta, args.gamma) == (None, None)  # the flags leave them to the config
    flags = config_from_args(PreferenceConfig, args)
    assert (flags.beta, flags.gamma) == (beta, 1.0)
    beta_help = next(a.help for a in parser._actions if "--beta" in a.option_strings)
    assert f"{loss_type} {beta}" in beta_help


def test_simpo_loss_with_the_default_config_is_the_papers():
    """The trainer's SimPO loss under ``PreferenceConfig(loss_type="simpo")`` is -log s(2 (a_c - a_r) - 1)."""
    cfg = PreferenceConfig(loss_type="simpo")
    loss, n, metrics = DPOTrainer._paired_loss(SimpleNamespace(config=cfg), {}, torch.cat([PC, PR]),
                                               torch.cat([LC, LR]))
    margins = [pc / lc - pr / lr for pc, pr, _, _, lc, lr in rows()]
    assert float(loss) == pytest.approx(sum(-logsig(2.0 * m - 1.0) for m in margins), abs=1e-5)
    assert int(n) == 4 and float(metrics["rewards/margins"]) == pytest.approx(2.0 * sum(margins), abs=1e-5)


def test_log1mexp_is_stable_near_zero():
    x = torch.tensor([-1e-7, -0.5, -0.7, -30.0])
    expect = [math.log(-math.expm1(v)) for v in x.tolist()]
    assert pl._log1mexp(x).tolist() == pytest.approx(expect, rel=1e-5)


# ----- TRL 1.16 on the same tensors ----------------------------------------------------------------------

try:
    import trl
except ImportError:  # the hand computations above still run
    trl = None
needs_trl = pytest.mark.skipif(trl is None, reason="TRL comparison needs the bench extra (pip install coati[bench])")
ACC = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def _per_token(sums: torch.Tensor, lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (shifted, ``(B, width-1)``) that sum to ``sums`` over a completion of ``lengths``
    tokens at the end of each row, and the completion mask ``(B, width)``."""
    b = len(sums)
    mask = torch.zeros(b, width, dtype=torch.long)
    logps = torch.zeros(b, width - 1)
    for i in range(b):
        n = int(lengths[i])
        mask[i, width - n:] = 1
        logps[i, width - 1 - n:] = sums[i] / n
    return logps, mask


def _fake_model(per_token_by_width: dict[int, torch.Tensor]):
    """Stands in for TRL's fused-head forward: returns the given per-token log-probs for a batch width."""
    def forward(input_ids, **_):
        lp = per_token_by_width[input_ids.shape[1]]
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                               is_top1=torch.zeros_like(lp, dtype=torch.bool))
    forward.training = False
    return forward


def _trl_dpo(loss_type: str, beta: float, label_smoothing: float, pc, pr, rc, rr, lc, lr) -> float:
    from trl import DPOTrainer

    t = DPOTrainer.__new__(DPOTrainer)
    width = int(max(lc.max(), lr.max())) + 3
    logps, mask = _per_token(torch.cat([pc, pr]), torch.cat([lc, lr]), width)
    t.__dict__.update(beta=beta, label_smoothing=label_smoothing, loss_types=[loss_type], loss_weights=[1.0],
                      f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=True,
                      use_weighting=False, aux_loss_enabled=False, accelerator=ACC, _tp_size=1,
                      _total_train_tokens=0, _metrics=defaultdict(lambda: defaultdict(list)))
    t.model = _fake_model({width: logps})
    inputs = {"input_ids": torch.ones(len(mask), width, dtype=torch.long), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return float(t._compute_loss(t.model, inputs, return_outputs=False))


@needs_trl
def test_dpo_and_ipo_equal_trl():
    beta = 0.5
    ours = pl.dpo_loss(PC, PR, RC, RR, beta).mean()
    assert float(ours) == pytest.approx(_trl_dpo("sigmoid", beta, 0.0, PC, PR, RC, RR, LC, LR), abs=1e-5)
    ours = pl.ipo_loss(PC, PR, RC, RR, LC, LR, 0.2).mean()
    assert float(ours) == pytest.approx(_trl_dpo("ipo", 0.2, 0.0, PC, PR, RC, RR, LC, LR), abs=1e-5)


@needs_trl
def test_conservative_dpo_equals_trl_aot_on_single_pairs():
    """TRL's sigmoid loss has no label smoothing; its "aot" loss is the label-smoothed sigmoid of the sorted
    log-ratio margins, which for one pair is exactly conservative DPO."""
    for i in range(len(PC)):
        s = slice(i, i + 1)
        ours = pl.dpo_loss(PC[s], PR[s], RC[s], RR[s], 0.5, label_smoothing=0.2)
        assert float(ours) == pytest.approx(_trl_dpo("aot", 0.5, 0.2, PC[s], PR[s], RC[s], RR[s], LC[s], LR[s]),
                                            abs=1e-5)


@needs_trl
def test_kto_equals_trl():
    from trl import KTOTrainer

    beta, wd, wu = 0.3, 1.0, 1.5
    logps, ref = torch.cat([PC, PR]), torch.cat([RC, RR])
    lengths = torch.cat([LC, LR])
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    kl_sums, ref_kl = logps.roll(1) + 0.75, ref.roll(1)  # mismatched pairs: prompt i with completion i-1
    w, w_kl = int(lengths.max()) + 3, int(lengths.max()) + 5  # distinct widths tell the fake model apart
    per_tok, mask = _per_token(logps, lengths, w)
    kl_tok, kl_mask = _per_token(kl_sums, lengths.roll(1), w_kl)
    t = KTOTrainer.__new__(KTOTrainer)
    t.__dict__.update(beta=beta, desirable_weight=wd, undesirable_weight=wu, loss_type="kto", calculate_KL=True,
                      precompute_ref_logps=True, aux_loss_enabled=False, accelerator=ACC, _tp_size=1,
                      _total_train_tokens=0, _metrics=defaultdict(lambda: defaultdict(list)))
    t.model = _fake_model({w: per_tok, w_kl: kl_tok})
    batch = {"input_ids": torch.ones(8, w, dtype=torch.long), "attention_mask": torch.ones(8, w, dtype=torch.long),
             "completion_mask": mask, "KL_input_ids": torch.ones(8, w_kl, dtype=torch.long),
             "KL_attention_mask": torch.ones(8, w_kl, dtype=torch.long), "KL_completion_mask": kl_mask,
             "label": desirable, "ref_logps": ref, "ref_KL_logps": ref_kl}
    trl_loss = float(t._compute_loss(t.model, batch, return_outputs=False))
    ours = pl.kto_loss(logps, ref, desirable, pl.kto_kl_baseline(kl_sums, ref_kl), beta, wd, wu).mean()
    assert float(ours) == pytest.approx(trl_loss, abs=1e-5)
    assert float(pl.kto_kl_baseline(kl_sums, ref_kl)) == pytest.approx(t._metrics["eval"]["kl"][0], abs=1e-6)


@needs_trl
def test_orpo_equals_trl():
    from trl.experimental.orpo import ORPOTrainer

    lam = 0.25
    t = ORPOTrainer.__new__(ORPOTrainer)
    t.__dict__.update(beta=lam, accelerator=ACC)
    ac, ar = PC / LC, PR / LR
    losses, *_ = t.odds_ratio_loss(ac, ar)
    trl_loss = (-ac).mean() - losses.mean()  # TRL's NLL is the chosen token mean: equal here for a fixed length
    lengths = torch.full_like(LC, 8.0)
    nll = pl.sft_nll(ac * lengths, lengths)
    assert float(nll.mean()) == pytest.approx(float((-ac).mean()))
    assert float(pl.orpo_loss(ac, ar, lam).mean()) == pytest.approx(float(trl_loss), abs=1e-6)


@needs_trl
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_equals_trl(eps):
    from trl.experimental.cpo import CPOTrainer

    beta, gamma = 2.0, 0.5
    t = CPOTrainer.__new__(CPOTrainer)
    t.__dict__.update(beta=beta, simpo_gamma=gamma, label_smoothing=eps, loss_type="simpo", alpha=0.0,
                      accelerator=ACC)
    losses, _, _ = t.cpo_loss(PC / LC, PR / LR)
    assert pl.simpo_loss(PC / LC, PR / LR, beta, gamma, eps).tolist() == pytest.approx(losses.tolist(), abs=1e-6)
