"""ReLoop2's error memory (arXiv 2306.08717): retrieval and compensation by hand, the ring buffer,
lam = 0 and the empty memory as exact no-ops, bad input refused without a state change; the
strategy in the loop with checkpointing; and the drifting digits stream."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from poise.continual import fit_stream
from poise.continual.reloop import CompensatedClassifier, ErrorMemory, ReLoop, classification_error
from poise.measure import ContinualEvaluator, EvalSchedule, EvalSet
from poise.tasks.drift import drift_digits, label_maps


def _mem(**kw):
    m = ErrorMemory(**{"capacity": 4, "k": 1, "lam": 1.0, "temperature": 1.0, **kw})
    m.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.5, -0.5], [-0.2, 0.2]]))
    return m


def test_retrieval_and_compensation_by_hand():
    m = _mem()
    # k = 1: the nearest key by cosine; (3, 0.1) is nearest e1, whose error is (0.5, -0.5)
    assert m.retrieve(torch.tensor([[3.0, 0.1]])).tolist() == [[0.5, -0.5]]
    # k = 2, tau = 1, query e1: cosines (1, 0) -> weights softmax = (e/(e+1), 1/(e+1))
    m2 = _mem(k=2, lam=0.5)
    w = math.e / (math.e + 1)
    want = torch.tensor([[w * 0.5 - (1 - w) * 0.2, -w * 0.5 + (1 - w) * 0.2]])
    torch.testing.assert_close(m2.retrieve(torch.tensor([[1.0, 0.0]])), want)
    pred = torch.tensor([[0.3, 0.7]])
    torch.testing.assert_close(m2.compensate(torch.tensor([[1.0, 0.0]]), pred), pred + 0.5 * want)


def test_lam_zero_and_empty_memory_are_exact_no_ops():
    pred = torch.rand(3, 2)
    keys = torch.rand(3, 2)
    assert _mem(lam=0.0).compensate(keys, pred) is pred
    empty = ErrorMemory(4, k=2)
    assert empty.compensate(keys, pred) is pred and len(empty) == 0
    assert empty.retrieve(keys, n_out=2).abs().sum() == 0
    with pytest.raises(ValueError, match="needs n_out"):
        empty.retrieve(keys)


def test_ring_buffer_keeps_the_most_recent_rows_and_k_above_size_uses_all():
    m = ErrorMemory(capacity=3, k=10, temperature=1.0)
    m.update(torch.eye(3)[:2], torch.tensor([[1.0], [2.0]]))
    assert len(m) == 2  # k = 10 > 2 rows: all of them are used (documented)
    got = m.retrieve(torch.tensor([[1.0, 1.0, 0.0]]))  # equal cosines to both: the mean 1.5
    torch.testing.assert_close(got, torch.tensor([[1.5]]))
    m.update(torch.eye(3)[2:].repeat(2, 1), torch.tensor([[3.0], [4.0]]))  # 4 rows written into 3
    assert len(m) == 3 and m.written == 4 and m.errors.flatten().tolist() == [4.0, 2.0, 3.0]
    m.update(torch.eye(3).repeat(3, 1), torch.arange(9.0).unsqueeze(1))  # a batch larger than the memory
    assert sorted(m.errors.flatten().tolist()) == [6.0, 7.0, 8.0]


def test_min_error_writes_only_error_samples():
    m = ErrorMemory(4, min_error=0.1)
    assert m.update(torch.eye(2), torch.tensor([[0.05, 0.0], [0.5, 0.0]])) == 1 and len(m) == 1


@pytest.mark.parametrize("kwargs, msg", [
    ({"capacity": 0}, "capacity=0 must be an int >= 1"),
    ({"capacity": 4, "k": 0}, "k=0 must be an int >= 1"),
    ({"capacity": 4, "lam": -1.0}, "lam=-1.0"),
    ({"capacity": 4, "temperature": 0.0}, "temperature=0.0"),
])
def test_bad_construction(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        ErrorMemory(**kwargs)


def test_bad_updates_change_nothing():
    m = _mem()
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in m.state_dict().items()}
    for keys, errs, msg in [(torch.rand(2, 3), torch.rand(2, 2), "widths 2 and 2"),
                            (torch.rand(2, 2), torch.rand(3, 2), "same B"),
                            (torch.tensor([[float("nan"), 0.0]]), torch.rand(1, 2), "finite")]:
        with pytest.raises(ValueError, match=msg):
            m.update(keys, errs)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) if isinstance(before[k], torch.Tensor) else before[k] == after[k]
               for k in before)
    with pytest.raises(ValueError, match="width 3"):
        m.compensate(torch.rand(1, 2), torch.rand(1, 3))


def test_state_round_trip():
    m = _mem(k=2)
    m2 = ErrorMemory(4, k=2, temperature=1.0)
    m2.load_state_dict(m.state_dict())
    q = torch.rand(5, 2)
    assert torch.equal(m.retrieve(q), m2.retrieve(q)) and m2.ptr == 2
    with pytest.raises(ValueError, match="capacity 3"):
        ErrorMemory(3).load_state_dict(m.state_dict())


def test_classification_error_is_onehot_minus_probabilities():
    e = classification_error(torch.zeros(1, 4), torch.tensor([2]))
    assert e.tolist() == [[-0.25, -0.25, 0.75, -0.25]]


def test_compensation_flips_a_wrong_prediction_after_one_error():
    """A model that always says class 0; after seeing one sample of class 1 with its error, the
    compensated prediction for that input is class 1 (p' = p + (onehot - p) = onehot)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([2.0, 0.0]))
    mem = ErrorMemory(8, k=1, lam=1.0)
    x = torch.tensor([[1.0, 2.0]])
    clf = CompensatedClassifier(model, mem)
    assert clf(x).argmax().item() == 0
    mem.update(x, classification_error(model(x), torch.tensor([1])))
    assert clf(x).argmax().item() == 1


class _Task:
    def __init__(self, i):
        g = torch.Generator().manual_seed(i)
        self.id, self.classes, self.restrict = i, [0, 1, 2], False
        self.x_train = torch.randn(20, 5, generator=g)
        self.y_train = torch.randint(0, 3, (20,), generator=g)
        self.x_test, self.y_test = self.x_train, self.y_train


def _run(resume=None, keep=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
    s = ReLoop(capacity=12, k=3)
    ev = ContinualEvaluator({t: EvalSet(_Task(t).x_test, _Task(t).y_test) for t in range(2)},
                            schedule=EvalSchedule(0, 2))
    saved = []
    out = fit_stream(model, [_Task(0), _Task(1)], s, torch.optim.SGD(model.parameters(), lr=0.1), ev,
                     steps_per_task=5, batch_size=4, n_classes=3, checkpoint_every=0 if keep is None else 1,
                     on_checkpoint=None if keep is None else saved.append, resume=resume)
    return (saved[keep - 1] if keep else None), model, s, out


def test_reloop_strategy_in_the_loop_and_resume():
    _, model, s, out = _run()
    assert len(s.memory) == 12 and s.memory.written == 40  # 10 steps x 4 samples, the last 12 kept
    state, *_ = _run(keep=7)
    _, model2, s2, out2 = _run(resume=state)
    assert torch.equal(s.memory.keys, s2.memory.keys) and out["acc"] == out2["acc"]
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# -- the drifting stream ---------------------------------------------------------------------
def test_label_maps_are_cumulative_swaps():
    maps = label_maps(3, swaps=1, drift_seed=0)
    assert maps[0].tolist() == list(range(10))
    for a, b in zip(maps, maps[1:], strict=False):
        assert (a != b).sum() == 2 and sorted(b.tolist()) == list(range(10))  # one swap: a permutation


def test_drift_digits_label_and_rotate():
    s = drift_digits(n_tasks=3, kind="label", swaps=2)
    maps = label_maps(3, 2, 0)
    assert len(s.tasks) == 3 and all(torch.equal(t.x_train, s.tasks[0].x_train) for t in s.tasks)
    assert torch.equal(s.tasks[2].y_train, torch.from_numpy(maps[2][s.tasks[0].y_train.numpy()]))
    r = drift_digits(n_tasks=2, kind="rotate", angle=90.0)
    torch.testing.assert_close(r.tasks[1].x_train, torch.from_numpy(np.rot90(r.tasks[0].x_train.numpy(), 1,
                                                                            axes=(1, 2)).copy()), atol=1e-5, rtol=0)
    assert torch.equal(r.tasks[1].y_train, r.tasks[0].y_train)


@pytest.mark.parametrize("kwargs, msg", [({"scenario": "class"}, "valid choices: domain"),
                                         ({"kind": "noise"}, "valid choices: label, rotate"),
                                         ({"n_tasks": 0}, "n_tasks=0"), ({"swaps": 6}, "valid range: 1..5")])
def test_drift_bad_input(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        drift_digits(**kwargs)
