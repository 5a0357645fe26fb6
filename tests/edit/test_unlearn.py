import math

import pytest
import torch

from poise.edit import AnalyticClassifier, npo_loss

D = torch.float64


def _data(n=40, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=D)
    Y = torch.nn.functional.one_hot(torch.randint(0, c, (n,), generator=g), c).to(D)
    return X, Y


def _ridge(X, Y, gamma):
    return torch.linalg.solve(X.T @ X + gamma * torch.eye(X.shape[1], dtype=D), X.T @ Y)


def test_chunked_learning_equals_batch_ridge():
    X, Y = _data()
    acu = AnalyticClassifier(6, 3, gamma=0.5)
    for i in range(0, 40, 7):
        acu.learn(X[i : i + 7], Y[i : i + 7])
    torch.testing.assert_close(acu.W, _ridge(X, Y, 0.5), atol=1e-12, rtol=0)


def test_unlearning_equals_refitting_without_the_rows_and_learn_unlearn_restores():
    X, Y = _data()
    acu = AnalyticClassifier(6, 3, gamma=0.5)
    acu.learn(X, Y)
    acu.unlearn(X[5:12], Y[5:12])
    keep = torch.ones(40, dtype=torch.bool)
    keep[5:12] = False
    err = float((acu.W - _ridge(X[keep], Y[keep], 0.5)).abs().max())
    print(f"ACU: max |unlearned - refit without the rows| = {err:.1e}")
    assert err < 1e-12
    W0 = acu.W.clone()
    extra_X, extra_Y = _data(n=4, seed=9)
    acu.learn(extra_X, extra_Y)
    acu.unlearn(extra_X, extra_Y)
    err = float((acu.W - W0).abs().max())
    print(f"ACU: max |learn then unlearn - before| = {err:.1e}")
    assert err < 1e-12


def test_unlearning_rows_never_learned_is_an_error_and_changes_nothing():
    X, Y = _data()
    acu = AnalyticClassifier(6, 3)
    acu.learn(X[:10], Y[:10])
    W, R = acu.W.clone(), acu.R.clone()
    with pytest.raises(ValueError, match="row 2 of the unlearning request was never learned"):
        acu.unlearn(X[8:12], Y[8:12])  # request rows 2 and 3 (data rows 10, 11) were never learned
    with pytest.raises(ValueError, match="asked twice"):
        acu.unlearn(torch.cat([X[:1], X[:1]]), torch.cat([Y[:1], Y[:1]]))
    with pytest.raises(ValueError, match=r"X must be \[n, d=6\]"):
        acu.unlearn(X[:2, :3], Y[:2])
    assert torch.equal(acu.W, W) and torch.equal(acu.R, R)


def test_npo_by_hand():
    # at pi = pi_ref: -(2/beta) log sigmoid(0) = (2/beta) log 2
    z = torch.zeros(3)
    assert float(npo_loss(z, z, beta=0.1)) == pytest.approx(20 * math.log(2))
