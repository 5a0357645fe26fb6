"""CoIN's adaptive EMA weight (arXiv 2410.10868) against hand computations of the authors' formula."""

import pytest
import torch
from torch import nn

from poise.continual import AdaptiveEMA, Batch, coin_alpha


def test_coin_alpha_matches_hand_computation():
    theta = torch.tensor([3.0, 0.0])
    star = torch.tensor([1.0, 2.0])  # a = |2| + |-2| = 4
    g = torch.tensor([0.2, -0.1])  # b = 0.3
    g_prev = torch.tensor([-0.3, 0.4])  # c = |0.5| + |-0.5| = 1
    # alpha = 2 (1 + 0.3) / (4 * 1) = 0.65
    assert coin_alpha(theta, star, g, g_prev).item() == pytest.approx(0.65)


def test_coin_alpha_falls_back_outside_0_1():
    g, g_prev = torch.tensor([0.2, -0.1]), torch.tensor([-0.3, 0.4])
    # a = 1.5: alpha = 2.6 / 1.5 = 1.733 > 1 -> fallback
    assert coin_alpha(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0]), g, g_prev, 0.05).item() == pytest.approx(0.05)
    # theta = theta*: a = 0, alpha = inf -> fallback (the authors' default 0.01)
    assert coin_alpha(torch.ones(2), torch.ones(2), g, g_prev).item() == pytest.approx(0.01)


def _model(w):
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(w)
    return m


def _set(m, w, g):
    with torch.no_grad():
        m.weight.fill_(w)
    m.weight.grad = torch.full_like(m.weight, g)


def test_strategy_two_steps_and_replace_at_task_end():
    s = AdaptiveEMA()
    m = _model(0.0)
    b = Batch(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))
    s.before_task(m, b)
    _set(m, 1.0, 0.5)
    out = s.after_step(m, b)  # first step: theta* = theta_1 = 1, alpha = fallback
    assert out["alpha_mean"].item() == pytest.approx(0.01) and out["alpha_fallback"].item() == 1.0
    assert s.eval_model(m).weight.item() == pytest.approx(1.0)
    _set(m, 5.0, 2.0)
    out = s.after_step(m, b)
    # a = |5 - 1| = 4, b = 2, c = |2 - 0.5| = 1.5: alpha = 2 * 3 / 6 = 1 -> not < 1 -> fallback 0.01
    assert out["alpha_mean"].item() == pytest.approx(0.01)
    # theta* = 0.99 * 1 + 0.01 * 5 = 1.04
    assert s.eval_model(m).weight.item() == pytest.approx(1.04)
    _set(m, 9.0, 1.5)
    out = s.after_step(m, b)
    # a = |9 - 1.04| = 7.96, b = 1.5, c = |1.5 - 2| = 0.5: alpha = 2 * 2.5 / 3.98 = 1.2563 -> fallback
    assert out["alpha_mean"].item() == pytest.approx(0.01)
    _set(m, 2.0, 3.0)
    out = s.after_step(m, b)
    # theta* = 0.99 * 1.04 + 0.01 * 9 = 1.1196; a = 0.8804, b = 3, c = 1.5: alpha = 8 / 1.3206 > 1 -> fallback
    _set(m, 30.0, 3.5)
    star = 0.99 * 1.1196 + 0.01 * 2.0  # 1.128404
    alpha = 2 * (1 + 3.5) / (abs(30.0 - star) * abs(3.5 - 3.0))  # 9 / 14.4358 = 0.6235
    out = s.after_step(m, b)
    assert out["alpha_mean"].item() == pytest.approx(alpha, rel=1e-5) and out["alpha_fallback"].item() == 0.0
    expect = (1 - alpha) * star + alpha * 30.0
    assert s.eval_model(m).weight.item() == pytest.approx(expect, rel=1e-5)
    s.after_task(m, b)  # ema_replace
    assert m.weight.item() == pytest.approx(expect, rel=1e-5)
    s.before_task(m, b)  # a new task starts a fresh average
    assert s.shadow is None and s.prev_grads == {}


def test_bad_fallback_refused():
    with pytest.raises(ValueError, match=r"fallback=1.0 must be in \(0, 1\)"):
        AdaptiveEMA(fallback=1.0)
