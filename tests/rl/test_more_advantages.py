"""Hand numbers for ``poise.rl.advantages_more`` and ``poise.rl.kl`` (these run without verl;
verl parity: tests/rl/test_verl_advantages.py, tests/rl/test_verl_parity.py)."""

import math

import pytest
import torch

from poise import _registry
from poise.rl import (
    gpg_advantage,
    kl_estimate,
    opo_advantage,
    outcome_token_rewards,
    passk_advantage,
    reinforce_pp_advantage,
)


def test_registered():
    names = set(_registry.names("advantage"))
    assert {"reinforce_pp", "reinforce_pp_baseline", "opo", "gpg", "grpo_passk", "optimal_token_baseline",
            "normalize_then_sum"} <= names


def test_opo_length_weighted_baseline():
    """Group (r, |y|) = (1, 1), (0, 3): b = (1*1 + 0*3) / 4 = 0.25 -> A = (0.75, -0.25); a group of one keeps r."""
    a = opo_advantage(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0, 0, 1]), torch.tensor([1, 3, 5]))
    assert torch.allclose(a, torch.tensor([0.75, -0.25, 2.0]))


def test_gpg_alpha():
    """r = (1, 0, 0, 0) in groups {0,1}, {2,3}: verl alpha = 4 / 1 nonzero = 4 -> A = 4 * (0.5, -0.5, 0, 0);
    paper alpha = 4 / (4 - 2 all-equal samples) = 2."""
    r, g = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1])
    assert torch.allclose(gpg_advantage(r, g), torch.tensor([2.0, -2.0, 0.0, 0.0]))
    assert torch.allclose(gpg_advantage(r, g, alpha="paper"), torch.tensor([1.0, -1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="valid choices"):
        gpg_advantage(r, g, alpha="batch")


def test_passk_only_best_gets_advantage():
    """(0.2, 0.9, 0.5): best 0.9, second 0.5 -> A = 0.4 on the best only (unscaled)."""
    a = passk_advantage(torch.tensor([0.2, 0.9, 0.5]), torch.tensor([0, 0, 0]), scale=False)
    assert torch.allclose(a, torch.tensor([0.0, 0.4, 0.0]))
    with pytest.raises(ValueError, match="at least 2"):
        passk_advantage(torch.tensor([1.0]), torch.tensor([0]))


def test_reinforce_pp_returns_then_whiten():
    """Outcome reward 1 at the last of 2 tokens and 0 in a second 2-token row, gamma 0.5: returns
    (0.5, 1, 0, 0); mean 0.375, unbiased var = sum (x-m)^2 / 3 = (0.015625+0.390625+2*0.140625)/3."""
    mask = torch.ones(2, 2, dtype=torch.float64)
    tok = outcome_token_rewards(torch.tensor([1.0, 0.0], dtype=torch.float64), mask)
    assert torch.equal(tok, torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64))
    a = reinforce_pp_advantage(tok, mask, gamma=0.5)
    x = torch.tensor([[0.5, 1.0], [0.0, 0.0]], dtype=torch.float64)
    var = ((x - 0.375) ** 2).sum() / 3
    assert torch.allclose(a, (x - 0.375) / torch.sqrt(var + 1e-8), atol=1e-12)


def test_kl_abs_and_straight_through():
    """d = logp - ref = (0.5, -1): abs = (0.5, 1); k3+ has k3's value and k2's gradient d."""
    logp = torch.tensor([[0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-0.5, 0.0]], dtype=torch.float64)
    assert torch.allclose(kl_estimate(logp, ref, kind="abs"), torch.tensor([[0.5, 1.0]], dtype=torch.float64))
    v = kl_estimate(logp, ref, kind="k3+")
    k3 = torch.exp(-torch.tensor([0.5, -1.0])) + torch.tensor([0.5, -1.0]) - 1
    assert torch.allclose(v.detach(), k3.to(v.dtype)[None])
    (g,) = torch.autograd.grad(v.sum(), logp)
    assert torch.allclose(g, torch.tensor([[0.5, -1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="valid choices"):
        kl_estimate(logp, ref, kind="k4")
    masked = kl_estimate(torch.tensor([[0.0, -math.inf]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    assert torch.isfinite(masked).all()
