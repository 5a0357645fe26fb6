"""The `merge` strategy (continual merging of task vectors, GCWM arXiv 2605.09608) through its hooks,
against merges computed by hand from the same task vectors; and the loop's boundary evaluation after a
hook that changes the evaluated model."""

import pytest
import torch
from torch import nn

from poise.continual import Batch, Merge, Strategy, fit_stream
from poise.measure import ContinualEvaluator, EvalSchedule
from poise.merge import gcwm_merge

DATA = Batch(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))


def _model():
    torch.manual_seed(0)
    return nn.Linear(3, 4)


def _set(model, w, b):
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.copy_(b)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run_tasks(strategy, model, trained):
    """Drive the hooks as the loop does: task k "trains" by writing trained[k] into the model."""
    seen_at_start = []
    for w, b in trained:
        strategy.before_task(model, DATA)
        seen_at_start.append(_state(model))
        _set(model, w, b)
        strategy.after_task(model, DATA)
    return seen_at_start


def _weights(k):
    g = torch.Generator().manual_seed(k)
    return torch.randn(4, 3, generator=g), torch.randn(4, generator=g)


@pytest.mark.parametrize("method,weights", [("task_arithmetic", "equal"), ("average", "count"), ("average", "equal")])
def test_linear_merges_match_hand_computation(method, weights):
    model = _model()
    trained = [_weights(k) for k in range(4)]
    s = Merge(method=method, weights=weights)
    starts = _run_tasks(s, model, trained)
    base = {"weight": trained[0][0], "bias": trained[0][1]}
    for k in range(1, 4):  # every later task starts from the base
        assert all(torch.equal(starts[k][n], base[n]) for n in base)
    taus = [{"weight": w - base["weight"], "bias": b - base["bias"]} for w, b in trained[1:]]
    delta = taus[0]
    for j, tau in enumerate(taus[1:], start=2):  # j task vectors after this merge
        if method == "task_arithmetic":
            delta = {n: delta[n] + tau[n] for n in delta}
        elif weights == "count":
            delta = {n: (j - 1) / j * delta[n] + tau[n] / j for n in delta}
        else:
            delta = {n: 0.5 * delta[n] + 0.5 * tau[n] for n in delta}
    for n, v in _state(model).items():
        torch.testing.assert_close(v, base[n] + delta[n], rtol=0, atol=1e-6)
    if method == "average" and weights == "count":  # a running mean of the three task vectors
        mean = {n: sum(t[n] for t in taus) / 3 for n in base}
        torch.testing.assert_close(model.weight.detach(), base["weight"] + mean["weight"], rtol=0, atol=1e-6)


def test_gcwm_merge_is_poise_merge_on_the_task_vectors():
    model = _model()
    trained = [_weights(k) for k in range(3)]
    s = Merge(method="gcwm", gcwm={"solver": "closed_form"})
    _run_tasks(s, model, trained)
    base = {"weight": trained[0][0], "bias": trained[0][1]}
    taus = [{"weight": w - base["weight"], "bias": b - base["bias"]} for w, b in trained[1:]]
    merged, stats = gcwm_merge(taus, weights=[0.5, 0.5], solver="closed_form")
    torch.testing.assert_close(model.weight.detach(), base["weight"] + merged["weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.bias.detach(), base["bias"] + merged["bias"], rtol=0, atol=1e-6)
    m = s.after_step(model, DATA)
    assert m["merges"].item() == 2 and m["conflict"].item() == pytest.approx(stats["conflict"])
    assert m["alpha"].item() == pytest.approx(stats["alpha"])


def test_gcwm_plain_holds_the_gate_at_zero():
    model = _model()
    s = Merge(method="gcwm_plain", gcwm={"solver": "closed_form"})
    _run_tasks(s, model, [_weights(k) for k in range(3)])
    assert s.alphas == [0.0]


def test_evaluated_model_is_the_deployed_one_while_a_task_trains():
    model = _model()
    s = Merge(method="task_arithmetic")
    trained = [_weights(k) for k in range(3)]
    _run_tasks(s, model, trained[:2])
    deployed = _state(model)
    s.before_task(model, DATA)
    _set(model, *trained[2])  # training moves the model ...
    ev = s.eval_model(model)
    assert ev is not model and all(torch.equal(v, deployed[k]) for k, v in ev.state_dict().items())  # ... not this
    s.after_task(model, DATA)
    assert s.eval_model(model) is model  # after the merge the model holds the deployed weights


def test_state_dict_round_trip_mid_task_gives_the_same_merge():
    trained = [_weights(k) for k in range(4)]
    ref_model, ref = _model(), Merge(method="average", weights="count")
    _run_tasks(ref, ref_model, trained)

    model, s = _model(), Merge(method="average", weights="count")
    _run_tasks(s, model, trained[:2])
    s.before_task(model, DATA)
    saved = s.state_dict()
    s2 = Merge(method="average", weights="count")
    s2.load_state_dict(saved)
    assert all(torch.equal(v, saved["shadow"][k]) for k, v in s2.eval_model(model).state_dict().items())
    _set(model, *trained[2])
    s2.after_task(model, DATA)
    s2.before_task(model, DATA)
    _set(model, *trained[3])
    s2.after_task(model, DATA)
    got, want = model.state_dict().values(), ref_model.state_dict().values()
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("kw,match", [
    ({"method": "ties"}, "method='ties'; valid choices: gcwm, gcwm_plain, task_arithmetic, average"),
    ({"weights": "uniform"}, "weights='uniform'; valid choices: equal, count"),
    ({"scale": 0}, "scale=0"),
    ({"scale": float("nan")}, "scale=nan"),
    ({"method": "average", "gcwm": {"rank": 4}}, "does not use it"),
    ({"gcwm": {"rnak": 4}}, "unknown keys \\['rnak'\\]"),
    ({"gcwm": {"rank": 0}}, "rank=0"),
    ({"gcwm": {"solver": "sgd"}}, "sgd"),
    ({"method": "average", "scale": 3.0}, "does not use it"),
    ({"method": "gcwm", "scale": 2.0}, "does not use it"),
    ({"method": "task_arithmetic", "weights": "count"}, "sums"),
    ({"method": "gcwm_plain", "gcwm": {"gate_min": 0.5}}, "holds the gate at 0"),
])
def test_bad_arguments_are_refused_naming_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        Merge(**kw)


class _Zeroing(Strategy):
    """Sets every weight to 0 at the end of a task (a stand-in for any strategy that merges or
    recalibrates there)."""

    name = "zeroing"

    @torch.no_grad()
    def after_task(self, model, data):
        for p in model.parameters():
            p.zero_()


class _Task:
    def __init__(self, i, x, y, classes):
        self.id, self.x_train, self.y_train, self.classes, self.restrict = i, x, y, classes, False
        self.x_test, self.y_test = x, y


def test_boundary_evaluation_sees_what_after_task_did():
    torch.manual_seed(0)
    x = torch.randn(40, 5)
    y = (x[:, 0] > 0).long()
    tasks = [_Task(0, x, y, [0, 1])]
    model = nn.Linear(5, 2)
    ev = ContinualEvaluator({0: (x, y)}, schedule=EvalSchedule(0, 1))  # the last step is evaluated too
    fit_stream(model, tasks, _Zeroing(), torch.optim.SGD(model.parameters(), lr=0.5), ev, steps_per_task=30,
               batch_size=16, n_classes=2)
    trained_acc = ev.records[-2].acc[0]
    assert trained_acc > 0.8
    # a zero model predicts class 0 everywhere: the boundary accuracy is the share of class 0
    assert ev.boundary_matrix()[0, 0] == pytest.approx(float((y == 0).float().mean()))


def test_resumed_from_a_checkpoint_it_scores_what_the_uninterrupted_run_scores():
    import numpy as np

    def make():
        torch.manual_seed(0)
        xs = [torch.randn(60, 5) for _ in range(3)]
        tasks = [_Task(i, x, (x[:, i] > 0).long() + (x[:, (i + 1) % 5] > 1).long(), [0, 1, 2])
                 for i, x in enumerate(xs)]
        model = nn.Linear(5, 3)
        ev = ContinualEvaluator({t.id: (t.x_test, t.y_test) for t in tasks}, schedule=EvalSchedule(0, 3))
        return tasks, model, ev, torch.optim.SGD(model.parameters(), lr=0.3)

    kw = dict(steps_per_task=4, batch_size=16, n_classes=3, seed=0)
    tasks, model, ev, opt = make()
    ckpts = {}
    fit_stream(model, tasks, Merge(method="average"), opt, ev, checkpoint_every=4,
               on_checkpoint=lambda s: ckpts.__setitem__(s["step"], s), **kw)
    assert set(ckpts) == {4, 8, 12}
    for at in (4, 8):  # the last step of a task, resumed before its merge (and before the base is taken)
        tasks, model2, ev2, opt2 = make()
        fit_stream(model2, tasks, Merge(method="average"), opt2, ev2, resume=ckpts[at], **kw)
        np.testing.assert_array_equal(ev.boundary_matrix(), ev2.boundary_matrix())
        a1, a2 = ev.curves()[1], ev2.curves()[1]
        np.testing.assert_array_equal(a1[-len(a2):], a2)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values(),
                                                     strict=True))
