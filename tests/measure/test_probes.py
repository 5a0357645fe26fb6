import pytest
import torch
from torch import nn

from poise.measure import kl_drift, model_kl_drift, model_negative_flips, negative_flip_rate, positive_flip_rate


def test_flip_rates_by_hand():
    y = torch.tensor([0, 1, 2, 3, 4])
    old = torch.tensor([0, 1, 9, 9, 4])   # right on 0, 1, 4
    new = torch.tensor([0, 9, 2, 9, 9])   # right on 0, 2
    # negative flips: samples 1 and 4 (old right, new wrong) -> 2/5
    assert negative_flip_rate(old, new, y) == pytest.approx(0.4)
    # positive flips: sample 2 -> 1/5
    assert positive_flip_rate(old, new, y) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="shapes differ"):
        negative_flip_rate(old, new[:3], y)


def test_kl_drift_by_hand():
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.25, 0.75]]))
    # KL(p||q) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
    want = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2 / 3))
    assert kl_drift(p, q) == pytest.approx(float(want), abs=1e-6)
    assert kl_drift(p, p) == pytest.approx(0.0, abs=1e-7)


def test_model_probes():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 4), nn.Linear(3, 4)
    x, y = torch.randn(32, 3), torch.randint(0, 4, (32,))
    assert model_kl_drift(a, a, x) == pytest.approx(0.0, abs=1e-7)
    assert model_kl_drift(a, b, x) > 0
    r = model_negative_flips(a, a, x, y)
    assert r["negative_flip_rate"] == 0 and r["positive_flip_rate"] == 0
