"""Rollout-correction diagnostics and the masked-IS denominator, on hand-computable numbers
(verl parity: tests/rl/test_verl_rollout_correction.py)."""

import math

import pytest
import torch

from poise.rl import DIAGNOSTIC_KEYS, aggregate, rollout_correction, rollout_diagnostics


def test_identical_policies_give_neutral_diagnostics():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.5], [0.1, 0.2, 0.3]], dtype=torch.float64))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float64)
    d = rollout_diagnostics(lp, lp, mask, prefix="")
    assert set(d) == set(DIAGNOSTIC_KEYS)
    for k in ("kl", "k3_kl", "chi2_token", "chi2_seq", "log_ppl_diff", "log_ppl_abs_diff"):
        assert float(d[k]) == pytest.approx(0.0, abs=1e-15), k
    for k in ("ppl_ratio", "ess_token", "ess_seq"):
        assert float(d[k]) == pytest.approx(1.0, abs=1e-15), k
    # training ppl: row 1 exp(-(log .5 + log .25)/2) = sqrt(8); row 2 exp(-(log .006)/3) = 0.006^(-1/3)
    assert float(d["training_ppl"]) == pytest.approx((8 ** 0.5 + 0.006 ** (-1 / 3)) / 2, rel=1e-12)


def test_one_token_ratio_two():
    """pi = 0.5, mu = 0.25: rho = 2, l = log 2. chi2_token = chi2_seq = 4 - 1 = 3; kl (k1 of KL(mu||pi))
    = -log 2; k3 = 2 - log 2 - 1; ppl: training 2, rollout 4, ratio 1/2; ess of one weight = 1."""
    trainer = torch.log(torch.tensor([[0.5, 0.9]], dtype=torch.float64))
    sampler = torch.log(torch.tensor([[0.25, 0.1]], dtype=torch.float64))
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    d = rollout_diagnostics(trainer, sampler, mask)
    assert float(d["rollout_corr/chi2_token"]) == pytest.approx(3.0, rel=1e-12)
    assert float(d["rollout_corr/chi2_seq"]) == pytest.approx(3.0, rel=1e-12)
    assert float(d["rollout_corr/kl"]) == pytest.approx(-math.log(2), rel=1e-12)
    assert float(d["rollout_corr/k3_kl"]) == pytest.approx(1 - math.log(2), rel=1e-12)
    assert float(d["rollout_corr/training_ppl"]) == pytest.approx(2.0, rel=1e-12)
    assert float(d["rollout_corr/rollout_ppl"]) == pytest.approx(4.0, rel=1e-12)
    assert float(d["rollout_corr/ppl_ratio"]) == pytest.approx(0.5, rel=1e-12)
    assert float(d["rollout_corr/ess_token"]) == pytest.approx(1.0, rel=1e-12)


def test_ess_two_tokens():
    """weights 1 and 3: ess = (1 + 3)^2 / (2 (1 + 9)) = 0.8."""
    trainer = torch.log(torch.tensor([[0.2, 0.6]], dtype=torch.float64))
    sampler = torch.log(torch.tensor([[0.2, 0.2]], dtype=torch.float64))
    d = rollout_diagnostics(trainer, sampler, torch.ones(1, 2), prefix="")
    assert float(d["ess_token"]) == pytest.approx(0.8, rel=1e-12)


def test_diagnostics_ignore_padding_and_empty_rows():
    trainer = torch.tensor([[-1.0, float("-inf")], [float("nan"), float("inf")]], dtype=torch.float64)
    sampler = torch.tensor([[-1.0, float("nan")], [-float("inf"), 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    d = rollout_diagnostics(trainer, sampler, mask, prefix="")
    assert all(torch.isfinite(v) for v in d.values())
    assert float(d["training_ppl"]) == pytest.approx(math.e, rel=1e-12)  # the empty row is not averaged in
    empty = rollout_diagnostics(trainer, sampler, torch.zeros(2, 2, dtype=torch.float64), prefix="")
    assert all(torch.isfinite(v) for v in empty.values())
    with pytest.raises(ValueError, match="shapes differ"):
        rollout_diagnostics(trainer, sampler[:, :1], mask)


def test_masked_is_five_tokens_three_rejected():
    """5 tokens with rho = (1, 1.5, 3, 4, 0.25) and IcePop bounds [0.5, 2]: tokens 3-5 are rejected.
    Per-token loss values v = (1, 2, 3, 4, 5). The kept tokens carry w v = (1, 3):
    denominator "kept" (the default): (1 + 3) / 2 = 2; "all": (1 + 3) / 5 = 0.8."""
    rho = torch.tensor([[1.0, 1.5, 3.0, 4.0, 0.25]], dtype=torch.float64)
    sampler = torch.full((1, 5), -2.0, dtype=torch.float64)
    trainer = sampler + torch.log(rho)
    mask = torch.ones(1, 5, dtype=torch.float64)
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]], dtype=torch.float64)
    kept = rollout_correction(trainer, sampler, mask, is_level="token", is_mode="mask", is_min=0.5, is_max=2.0)
    assert torch.equal(kept.loss_mask, torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(kept.weights, torch.tensor([[1.0, 1.5, 0.0, 0.0, 0.0]], dtype=torch.float64))
    assert float(aggregate(v * kept.weights, kept.loss_mask, "token_mean")) == pytest.approx(2.0, rel=1e-12)
    every = rollout_correction(trainer, sampler, mask, is_level="token", is_mode="mask", is_min=0.5, is_max=2.0,
                               denominator="all")
    assert float(aggregate(v * every.weights, every.loss_mask, "token_mean")) == pytest.approx(0.8, rel=1e-12)
    assert float(kept.metrics["is/masked_frac"]) == pytest.approx(0.6, rel=1e-12)


def test_rejection_rule_also_leaves_the_denominator():
    """token_k2 <= 0.5 rejects |log rho| > 1: of log rho = (0, 0.5, 2) the third; with TIS at 10 the
    kept weights are (1, e^0.5); token mean over the 2 kept tokens of v = (1, 1, 1): (1 + e^0.5) / 2."""
    sampler = torch.zeros(1, 3, dtype=torch.float64)
    trainer = torch.tensor([[0.0, 0.5, 2.0]], dtype=torch.float64)
    c = rollout_correction(trainer - 3, sampler - 3, torch.ones(1, 3), is_max=10.0, reject={"token_k2": 0.5})
    assert float(aggregate(c.weights, c.loss_mask, "token_mean")) == pytest.approx((1 + math.exp(0.5)) / 2)
    assert float(c.metrics["rs/masked_frac"]) == pytest.approx(1 / 3)
