import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from poise.measure import ContinualEvaluator, EvalSchedule, EvalSet
from poise.measure import metrics as M


class Scripted(nn.Module):
    """Predicts the right label for the first ``k[task]`` samples of each task's eval set,
    so the accuracy curve is whatever the test scripts."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.acc = {}
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        task, idx = x[:, 0].long(), x[:, 1].long()
        right = torch.tensor([idx_i < round(self.acc.get(int(t), 0.0) * self.n)
                              for t, idx_i in zip(task.tolist(), idx.tolist(), strict=True)])
        label = torch.where(right, torch.zeros_like(idx), torch.ones_like(idx))
        return nn.functional.one_hot(label, 2).float()


def _sets(n_tasks, n=10):
    return {t: (torch.stack([torch.full((n,), float(t)), torch.arange(n).float()], 1),
                torch.zeros(n, dtype=torch.long)) for t in range(n_tasks)}


def test_evaluator_reproduces_scripted_curve_and_metrics():
    m = Scripted(10)
    ev = ContinualEvaluator(_sets(2), schedule=EvalSchedule(dense_steps=0, every=1))
    t0 = [0.5, 0.8, 1.0, 0.7, 0.4, 0.9]
    t1 = [None, None, None, 0.3, 0.6, 0.8]
    for task, steps in ((0, range(3)), (1, range(3, 6))):
        ev.begin_task(task)
        for s in steps:
            m.acc = {0: t0[s], 1: t1[s] or 0.0}
            ev.maybe_eval(m)
        ev.end_task(m)
    steps, acc = ev.curves()
    assert steps.tolist() == [1, 2, 3, 4, 5, 6]  # end_task reuses the step-3 and step-6 evaluations
    np.testing.assert_allclose(acc[:, 0], t0)
    assert np.isnan(acc[:3, 1]).all()  # unseen task not evaluated
    res = ev.metrics()
    assert res["min_acc"] == pytest.approx(0.4)
    assert res["wc_acc"] == pytest.approx(0.6)
    assert res["acc"] == pytest.approx((0.9 + 0.8) / 2)
    assert res["forgetting"] == pytest.approx(0.1)
    assert res["per_task"]["0"]["gap_depth"] == pytest.approx(0.6)
    assert res["wf10"] == pytest.approx(M.windowed_forgetting(acc, 10))


def test_schedule_dense_then_sparse():
    s = EvalSchedule(dense_steps=5, every=10)
    due = [k for k in range(1, 41) if s.due(k)]
    assert due == [1, 2, 3, 4, 5, 10, 20, 30, 40]
    with pytest.raises(ValueError, match="every=0"):
        EvalSchedule(every=0)


def test_subset_is_fixed_and_seeded():
    x = torch.arange(100).float()[:, None]
    y = torch.zeros(100, dtype=torch.long)
    a = ContinualEvaluator({0: (x, y)}, subset_size=10, seed=3)
    b = ContinualEvaluator({0: (x, y)}, subset_size=10, seed=3)
    c = ContinualEvaluator({0: (x, y)}, subset_size=10, seed=4)
    assert torch.equal(a.sets[0].x, b.sets[0].x)
    assert not torch.equal(a.sets[0].x, c.sets[0].x)
    assert len(a.sets[0].y) == 10


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))

    def forward(self, x):
        return self.body(x) + 0.01 * torch.randn(len(x), 3)  # consumes the global RNG


def test_maybe_eval_leaves_model_and_rng_untouched():
    torch.manual_seed(0)
    model = Noisy()
    model.train()
    model.body[2].eval()  # a mixed set of flags must come back exactly
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = repr(opt.state_dict())
    ev = ContinualEvaluator({0: (torch.randn(50, 4), torch.randint(0, 3, (50,)))},
                            schedule=EvalSchedule(0, 1))
    rng = torch.get_rng_state()
    ev.begin_task(0)
    assert ev.maybe_eval(model) is not None
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN stats too
    assert torch.equal(torch.get_rng_state(), rng)
    assert repr(opt.state_dict()) == opt_state
    assert all(p.grad is not None for p in model.parameters())  # grads not cleared either


@settings(max_examples=60, deadline=None)
@given(budget=st.floats(0.05, 3.0), batch=st.integers(1, 64), steps=st.integers(1, 60),
       dense=st.integers(0, 10), every=st.integers(1, 7), n_tasks=st.integers(1, 3))
def test_budget_never_exceeded(budget, batch, steps, dense, every, n_tasks):
    model = nn.Linear(2, 2)
    sets = {t: (torch.randn(20, 2), torch.randint(0, 2, (20,))) for t in range(n_tasks)}
    ev = ContinualEvaluator(sets, schedule=EvalSchedule(dense, every), budget=budget)
    for t in range(n_tasks):
        ev.begin_task(t)
        for _ in range(steps):
            ev.maybe_eval(model, n_samples=batch)
            assert ev.eval_samples - ev.boundary_eval_samples <= budget * ev.train_samples
        ev.end_task(model)


def test_budget_needs_sample_counts_and_errors_are_clear():
    ev = ContinualEvaluator({0: (torch.randn(4, 2), torch.zeros(4, dtype=torch.long))}, budget=1.0)
    ev.begin_task(0)
    with pytest.raises(ValueError, match="n_samples"):
        ev.maybe_eval(nn.Linear(2, 2))
    with pytest.raises(KeyError, match="unknown task 7"):
        ContinualEvaluator({0: (torch.randn(4, 2), torch.zeros(4, dtype=torch.long))}).begin_task(7)
    with pytest.raises(RuntimeError, match="begin_task"):
        ContinualEvaluator({0: (torch.randn(4, 2), torch.zeros(4))}).maybe_eval(nn.Linear(2, 2))


def test_task_incremental_restricts_prediction():
    # logits favour class 3 everywhere; restricted to classes [0, 1] the argmax is 1
    model = nn.Linear(1, 4)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, 1.0, 0.0, 5.0]))
    x, y = torch.zeros(5, 1), torch.ones(5, dtype=torch.long)
    assert ContinualEvaluator({0: EvalSet(x, y, classes=[0, 1])}).evaluate(model)[0] == 1.0
    assert ContinualEvaluator({0: EvalSet(x, y)}).evaluate(model)[0] == 0.0


def test_hf_style_output_is_accepted():
    class Out:
        def __init__(self, logits):
            self.logits = logits

    class HF(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return Out(self.lin(x))

    ev = ContinualEvaluator({0: (torch.randn(6, 3), torch.zeros(6, dtype=torch.long))})
    assert 0.0 <= ev.evaluate(HF())[0] <= 1.0


def test_state_dict_round_trip_mid_task_gives_the_same_curves_and_metrics():
    import io
    import json

    t0 = [0.5, 0.8, 1.0, 0.7, 0.4, 0.9]
    t1 = [None, None, None, 0.3, 0.6, 0.8]
    m = Scripted(10)

    def make():
        return ContinualEvaluator(_sets(2), schedule=EvalSchedule(dense_steps=1, every=2), subset_size=8, seed=1)

    def run(ev, steps):
        for s in steps:
            if s in (0, 3):
                ev.begin_task(0 if s == 0 else 1)
            m.acc = {0: t0[s], 1: t1[s] or 0.0}
            ev.maybe_eval(m, n_samples=4)
            if s in (2, 5):
                ev.end_task(m)

    ref = make()
    run(ref, range(6))
    first = make()
    run(first, range(4))  # stop inside task 1
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    run(resumed, range(4, 6))
    for a, b in zip(resumed.curves(), ref.curves(), strict=True):
        np.testing.assert_array_equal(a, b)
    got, want = resumed.metrics(), ref.metrics()
    got.pop("eval_seconds"), want.pop("eval_seconds")
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)  # NaN-aware equality
    assert resumed.boundaries == ref.boundaries == {0: 3, 1: 6}
    assert resumed.train_samples == 24 and resumed.eval_samples == ref.eval_samples

    fresh = make()  # without the state the continuation has nothing to continue
    with pytest.raises(RuntimeError, match="outside a task"):
        run(fresh, range(4, 6))
    with pytest.raises(ValueError, match=r"evaluator state is for tasks \[0, 1\], this evaluator has \[0, 1, 2\]"):
        ContinualEvaluator(_sets(3)).load_state_dict(first.state_dict())


# --- non-finite evaluation is reported as such, never as an accuracy (issue 19) --------------------------


class Poisoned(nn.Module):
    """Right on every sample (logits favour label 0) until ``poison`` is set: then the logits of the samples
    of the tasks in ``poison`` are ``value`` (NaN, +inf, ...) in column ``col`` (None: every column)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.poison, self.value, self.col = set(), math.nan, None

    def forward(self, x):
        out = torch.tensor([[1.0, 0.0, -1.0]]).repeat(len(x), 1)
        rows = torch.tensor([int(t) in self.poison for t in x[:, 0].tolist()])
        if self.col is None:
            out[rows] = self.value
        else:
            out[rows, self.col] = self.value
        return out


def _sets3(n_tasks, n=10):
    return {t: (torch.full((n, 1), float(t)), torch.zeros(n, dtype=torch.long)) for t in range(n_tasks)}


def test_a_nan_model_scores_nan_not_chance_and_is_counted():
    # before: argmax of a NaN row is 0 in torch, so with labels 0 a NaN model "scored" 1.0 here (0.2 with 5 classes)
    m = Poisoned()
    ev = ContinualEvaluator(_sets3(2), schedule=EvalSchedule(dense_steps=0, every=1))
    ev.begin_task(0)
    assert ev.maybe_eval(m) == {0: 1.0}
    ev.end_task(m)
    ev.begin_task(1)
    m.poison = {0}  # the model's output on task 0 turns NaN; task 1 stays finite
    accs = ev.maybe_eval(m)
    assert math.isnan(accs[0]) and accs[1] == 1.0
    assert ev.records[-1].nonfinite == [0] and ev.nonfinite_evals == 1
    m.poison = {0, 1}
    assert all(math.isnan(a) for a in ev.maybe_eval(m).values())
    ev.end_task(m)  # the boundary evaluation is step 3's: counted once
    assert ev.nonfinite_evals == 3
    res = ev.metrics()
    assert res["nonfinite_evals"] == 3 and res["nonfinite_tasks"] == ["0", "1"]
    assert res["first_nonfinite_step"] == 2
    for k in ("acc", "forgetting", "bwt", "min_acc", "wc_acc", "wf10", "wp10", "gap_depth"):
        assert math.isnan(res[k]), k  # never a number computed around the NaN
    assert all(math.isnan(v) for v in res["per_task"]["0"].values())
    steps, acc = ev.curves()
    assert np.isnan(acc[1:, 0]).all() and acc[0, 0] == 1.0


def test_finite_runs_carry_zero_flags_and_unchanged_metrics():
    m = Poisoned()
    ev = ContinualEvaluator(_sets3(1), schedule=EvalSchedule(dense_steps=0, every=1))
    ev.begin_task(0)
    ev.maybe_eval(m)
    ev.end_task(m)
    res = ev.metrics()
    assert (res["nonfinite_evals"], res["nonfinite_tasks"], res["first_nonfinite_step"]) == (0, [], None)
    assert res["acc"] == 1.0 and res["min_acc"] != res["min_acc"]  # one task: min-ACC has nothing to cover (NaN)


@pytest.mark.parametrize("value,col,nonfinite", [(math.nan, 2, True), (math.inf, 1, True), (-math.inf, None, True),
                                                 (-math.inf, 2, False), (1e30, 1, False)])
def test_what_counts_as_non_finite_output(value, col, nonfinite):
    # NaN or +inf in any column, or every column -inf: no prediction. A -inf column is a mask ("impossible
    # class") and a huge finite logit is a prediction: those keep their accuracy (1e30 in column 1 wins: 0.0)
    m = Poisoned()
    m.poison, m.value, m.col = {0}, value, col
    got = ContinualEvaluator(_sets3(1)).evaluate(m)[0]
    if nonfinite:
        assert math.isnan(got)
    else:
        assert got == (0.0 if value == 1e30 else 1.0)


def test_restricted_classes_ignore_a_nan_outside_them():
    # task-incremental: the task is scored on classes [0, 1]; a NaN in class 2 is not part of its prediction
    m = Poisoned()
    m.poison, m.value, m.col = {0}, math.nan, 2
    x, y = torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)
    assert ContinualEvaluator({0: EvalSet(x, y, classes=[0, 1])}).evaluate(m)[0] == 1.0  # before: argmax -> 2, 0.0
    m.col = 1
    assert math.isnan(ContinualEvaluator({0: EvalSet(x, y, classes=[0, 1])}).evaluate(m)[0])


def test_a_custom_predict_returning_nan_is_flagged():
    ev = ContinualEvaluator(_sets3(1), predict=lambda model, x, classes: torch.full((len(x),), math.nan))
    assert math.isnan(ev.evaluate(nn.Linear(1, 1))[0])


def test_an_empty_evaluation_set_is_refused_naming_the_task():
    # before: 0 / max(1, 0) = 0.0, an accuracy of 0 that lowered every average
    sets = {**_sets3(2), "late": (torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))}
    with pytest.raises(ValueError, match=r"task 'late': the evaluation set is empty \(0 samples\)"):
        ContinualEvaluator(sets)
    with pytest.raises(ValueError, match=r"task 3: the evaluation set is empty"):
        ContinualEvaluator({3: EvalSet(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))})


def test_nonfinite_flags_survive_a_state_dict_round_trip():
    import io

    m = Poisoned()
    ev = ContinualEvaluator(_sets3(1), schedule=EvalSchedule(dense_steps=0, every=1))
    ev.begin_task(0)
    ev.maybe_eval(m)
    m.poison = {0}
    ev.maybe_eval(m)
    buf = io.BytesIO()
    torch.save(ev.state_dict(), buf)
    buf.seek(0)
    back = ContinualEvaluator(_sets3(1), schedule=EvalSchedule(dense_steps=0, every=1))
    back.load_state_dict(torch.load(buf, weights_only=True))
    assert back.nonfinite_evals == 1 and back.records[-1].nonfinite == [0]
    back.end_task(m)
    assert back.metrics()["first_nonfinite_step"] == 2


def test_a_budget_that_removes_most_dense_evaluations_after_a_switch_warns():
    import warnings

    import torch

    from poise.measure import ContinualEvaluator, EvalSchedule

    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    model = torch.nn.Linear(3, 2)

    def run(budget):
        ev = ContinualEvaluator({0: (x, y), 1: (x, y)}, schedule=EvalSchedule(dense_steps=10, every=5), budget=budget)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            for t in (0, 1):
                ev.begin_task(t)
                for _ in range(20):
                    ev.maybe_eval(model, n_samples=8)
                ev.end_task(model)
        return [str(w.message) for w in got if "dense evaluations" in str(w.message)], ev

    msgs, ev = run(0.5)  # 8 training samples per step cannot pay for 80 evaluation samples
    assert len(msgs) == 1 and "budget=0.5 skipped" in msgs[0] and "after the switch to task 1" in msgs[0]
    assert run(None)[0] == [] and run(100.0)[0] == []  # no budget / an ample one: no warning


def test_metrics_of_a_model_that_went_non_finite_before_a_switch_are_nan_not_an_error():
    import math

    import torch

    from poise.measure import ContinualEvaluator

    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    model = torch.nn.Linear(3, 2)
    ev = ContinualEvaluator({0: (x, y), 1: (x, y), 2: (x, y)})
    for t in (0, 1, 2):
        ev.begin_task(t)
        if t == 1:
            with torch.no_grad():
                model.weight.fill_(float("nan"))
        ev.maybe_eval(model)
        ev.end_task(model)
    m = ev.metrics()  # task 1's switch was scored NaN: its gap cannot be measured, and nothing raises
    assert m["nonfinite_evals"] > 0 and math.isnan(m["gap_depth"]) and math.isnan(m["acc"])


def test_batched_evaluation_gives_the_task_by_task_numbers():
    """One pass over every task's concatenated inputs (the default) = task by task, with class masks, a task
    seen late, and a model whose output turns NaN on one task's inputs."""
    import math

    import torch

    from poise.measure import ContinualEvaluator, EvalSchedule, EvalSet

    g = torch.Generator().manual_seed(0)
    sets = {t: EvalSet(torch.randn(37 + 5 * t, 6, generator=g), torch.randint(2 * t, 2 * t + 2, (37 + 5 * t,),
                                                                              generator=g), [2 * t, 2 * t + 1])
            for t in range(3)}
    sets[3] = EvalSet(torch.full((9, 6), float("nan")), torch.zeros(9, dtype=torch.long))  # its output is NaN
    curves = []
    for batched in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        ev = ContinualEvaluator(sets, schedule=EvalSchedule(0, 1), batch_size=16, batched=batched)
        for t in range(4):
            ev.begin_task(t)
            for _ in range(3):
                with torch.no_grad():
                    model[0].weight.mul_(1.01)
                ev.maybe_eval(model)
            ev.end_task(model)
        curves.append([{t: (None if math.isnan(a) else a) for t, a in r.acc.items()} for r in ev.records])
    assert curves[0] == curves[1] and any(r[3] is None for r in curves[0] if 3 in r)


@pytest.mark.parametrize("classes", [None, [0, 1]])
@pytest.mark.parametrize("value,col", [(math.nan, 2), (math.nan, 0), (math.inf, 1), (-math.inf, None), (-math.inf, 2),
                                       (-math.inf, 0), (1e30, 1), (1e30, 2)])
def test_one_pass_scoring_flags_what_task_by_task_flags(value, col, classes):
    # the batched scorer checks finiteness once for all tasks and only then per row: every case of
    # test_what_counts_as_non_finite_output (and restricted classes), beside a clean task, gives the
    # per-task numbers and the same NaN flags
    got = []
    for batched in (True, False):
        m = Poisoned()
        sets = {t: EvalSet(x, y, classes) for t, (x, y) in _sets3(3, n=7).items()}
        ev = ContinualEvaluator(sets, schedule=EvalSchedule(0, 1), include_unseen=True, batched=batched)
        ev.begin_task(0)
        m.poison, m.value, m.col = {1}, value, col
        accs = ev.maybe_eval(m)
        got.append(({t: None if math.isnan(a) else a for t, a in accs.items()}, ev.records[-1].nonfinite))
    assert got[0] == got[1]
    assert got[0][0][0] == 1.0 and got[0][0][2] == 1.0  # the clean tasks keep their accuracy


@pytest.mark.parametrize("batched", [True, False])
def test_one_label_per_sample_is_required_in_both_paths(batched):
    x = torch.randn(6, 3)
    ev = ContinualEvaluator({0: EvalSet(x, torch.zeros(6, 1, dtype=torch.long))}, schedule=EvalSchedule(0, 1),
                            batched=batched)
    ev.begin_task(0)
    with pytest.raises(ValueError, match=r"one label per sample \(y of shape \(n,\)\)"):
        ev.maybe_eval(nn.Linear(3, 4))


class _IntLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)

    def forward(self, x):
        return (self.lin(x) * 10).round().long()


@pytest.mark.parametrize("case", ["classes as a tensor", "integer logits", "a head that grows"])
def test_one_pass_scoring_of_unusual_inputs_equals_task_by_task(case):
    torch.manual_seed(0)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    classes = torch.tensor([0, 1, 2]) if case == "classes as a tensor" else (0, 2, 1, 2)
    models = {"classes as a tensor": [nn.Linear(4, 5)], "integer logits": [_IntLogits()],
              "a head that grows": [nn.Linear(4, 5), nn.Linear(4, 8), nn.Linear(4, 5)]}[case]
    got = []
    for batched in (True, False):
        ev = ContinualEvaluator({0: EvalSet(x, y, classes), 1: EvalSet(x, y)}, schedule=EvalSchedule(0, 1),
                                include_unseen=True, batched=batched, batch_size=5)
        ev.begin_task(0)
        got.append([ev.maybe_eval(m) for m in models])
    assert got[0] == got[1]


def test_an_empty_class_list_is_refused_naming_the_task():
    with pytest.raises(ValueError, match=r"task 'b': classes=\[\] restricts the prediction to no class"):
        ContinualEvaluator({"a": EvalSet(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)),
                            "b": EvalSet(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), [])})


@pytest.mark.parametrize("batched", [True, False])
def test_one_dimensional_logits_are_refused_in_both_paths(batched):
    # before, task by task: the 0-d argmax of (n,) logits was compared with every label and scored a number
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x).squeeze(-1)

    ev = ContinualEvaluator({0: EvalSet(torch.randn(6, 3), torch.zeros(6, dtype=torch.long))},
                            schedule=EvalSchedule(0, 1), batched=batched)
    ev.begin_task(0)
    with pytest.raises(ValueError, match=r"one label per sample"):
        ev.maybe_eval(Flat())
