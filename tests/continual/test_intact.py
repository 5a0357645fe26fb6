"""InTAct (arXiv 2511.17439): exact interval bounds, the drift penalty is zero iff the layer is
unchanged on the box, and the strategy records per-task intervals without stored data."""

import itertools

import pytest
import torch
from torch import nn

from poise.continual import Batch, InTAct, activation_interval, interval_bounds, interval_drift


def test_bounds_contain_the_output_change_and_are_attained_at_corners():
    g = torch.Generator().manual_seed(0)
    dW, db = torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
    lb = torch.randn(3, generator=g)
    ub = lb + torch.rand(3, generator=g) + 0.1
    lower, upper = interval_bounds(dW, db, lb, ub)
    a = lb + (ub - lb) * torch.rand(1000, 3, generator=g)  # random points in the box
    change = a @ dW.T + db
    assert (change >= lower - 1e-6).all() and (change <= upper + 1e-6).all()
    box = [(lo, hi) for lo, hi in zip(lb.tolist(), ub.tolist(), strict=True)]
    corners = torch.tensor(list(itertools.product(*box)))
    cc = corners @ dW.T + db
    torch.testing.assert_close(cc.min(0).values, lower)  # tight: interval arithmetic is exact for one layer
    torch.testing.assert_close(cc.max(0).values, upper)


def test_bounds_by_hand():
    # dW = [[2, -1]], db = [0.5], box a1 in [0, 1], a2 in [1, 3]
    # lower = 2*0 - 1*3 + 0.5 = -2.5, upper = 2*1 - 1*1 + 0.5 = 1.5
    lo, up = interval_bounds(torch.tensor([[2.0, -1.0]]), torch.tensor([0.5]), torch.tensor([0.0, 1.0]),
                             torch.tensor([1.0, 3.0]))
    assert lo.tolist() == [-2.5] and up.tolist() == [1.5]
    # unit: mean(6.25) + mean(2.25) = 8.5
    assert interval_drift(lo, up).item() == pytest.approx(8.5)


def test_drift_is_zero_iff_unchanged():
    lb, ub = torch.zeros(3), torch.ones(3)
    zero = interval_drift(*interval_bounds(torch.zeros(2, 3), torch.zeros(2), lb, ub))
    assert zero.item() == 0.0
    for i, j in itertools.product(range(2), range(3)):
        dW = torch.zeros(2, 3)
        dW[i, j] = 1e-3
        assert interval_drift(*interval_bounds(dW, torch.zeros(2), lb, ub)).item() > 0
    assert interval_drift(*interval_bounds(torch.zeros(2, 3), torch.tensor([0.0, -1e-3]), lb, ub)).item() > 0
    # the authors' sum-then-square form can cancel across units: changed, yet zero
    lo, up = interval_bounds(torch.zeros(2, 3), torch.tensor([1.0, -1.0]), lb, ub)
    assert interval_drift(lo, up, "sum").item() == 0.0 and interval_drift(lo, up, "unit").item() == 2.0


def test_activation_interval_order_statistics():
    acts = torch.arange(20.0).reshape(20, 1).flip(0)
    lo, hi = activation_interval(acts, 0.05, 0.95)  # indices int(1.0) = 1 and int(19.0) = 19 of the sorted column
    assert lo.tolist() == [1.0] and hi.tolist() == [19.0]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_strategy_records_intervals_and_penalises_only_change():
    m = _model()
    x = torch.randn(50, 4)
    data = Batch(x, torch.randint(0, 3, (50,)))
    s = InTAct(var_scale=0.0)
    assert s.loss_terms(m, data, m(x)) == {}  # nothing protected before the first task's end
    s.after_task(m, data)
    acts = torch.relu(m[0](x))
    lo, hi = activation_interval(acts.detach())
    torch.testing.assert_close(s.lb["2"], lo)
    torch.testing.assert_close(s.ub["2"], hi)
    assert len(s.intervals) == 1 and set(s.intervals[0]) == {"2"}
    terms = s.loss_terms(m, data, m(x))
    assert terms["int_drift"].item() == 0.0 and terms["feat"].item() == 0.0  # unchanged model
    with torch.no_grad():
        m[2].weight[0, 0] += 0.5
        m[0].weight[0, 0] += 0.5
    terms = s.loss_terms(m, data, m(x))
    assert terms["int_drift"].item() > 0 and terms["feat"].item() > 0
    terms["int_drift"].backward()
    assert m[2].weight.grad is not None and m[2].weight.grad.abs().sum() > 0
    # a second task widens the cumulative box and keeps each task's own interval
    s.after_task(m, Batch(x * 3, data.y))
    assert len(s.intervals) == 2
    assert (s.lb["2"] <= torch.minimum(s.intervals[0]["2"][0], s.intervals[1]["2"][0])).all()
    assert (s.ub["2"] >= s.intervals[1]["2"][1]).all()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"'nope' is not an nn.Linear of the model; valid choices: \['0', '2'\]"):
        InTAct(layers=["nope"]).after_task(_model(), Batch(torch.randn(5, 4), torch.zeros(5, dtype=torch.long)))
    with pytest.raises(ValueError, match="reduction='max'; valid choices: 'unit', 'sum'"):
        InTAct(reduction="max")
    s = InTAct()
    with pytest.raises(ValueError, match="the task's data is empty"):
        s.after_task(_model(), Batch(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)))
    assert s.tasks == 0 and s.lb == {}
