import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poise.measure import metrics as M

NAN = float("nan")
# Boundary matrix: R[k, i] = accuracy on task i after training task k.
R = np.array([[0.9, NAN, NAN],
              [0.6, 0.8, NAN],
              [0.5, 0.7, 0.95]])

# Two tasks, |T_0| = 3, |T_1| = 6, evaluated after every step.
STEPS = [1, 2, 3, 4, 5, 6]
T0 = [0.5, 0.8, 1.0, 0.7, 0.4, 0.9]
T1 = [NAN, NAN, NAN, 0.3, 0.6, 0.8]
ACC = np.array([T0, T1]).T
B = [3, 6]


def test_average_accuracy():
    assert M.average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)  # 0.71667
    assert M.average_accuracy(R, k=1) == pytest.approx((0.6 + 0.8) / 2)  # 0.7
    assert M.average_accuracy(R, k=0) == pytest.approx(0.9)


def test_forgetting_and_bwt():
    # ((0.9 - 0.5) + (0.8 - 0.7)) / 2 = 0.25
    assert M.forgetting(R) == pytest.approx(0.25)
    assert M.backward_transfer(R) == pytest.approx(-0.25)
    assert M.forgetting(R, k=1) == pytest.approx(0.3)  # 0.9 - 0.6
    assert M.forgetting(R, k=0) == 0.0
    assert M.backward_transfer(R, k=0) == 0.0


def test_min_acc_and_wc_acc():
    # task 0 after step 3: 0.7, 0.4, 0.9 -> min 0.4
    assert M.min_acc(STEPS, ACC, B) == pytest.approx(0.4)
    # up to step 4 only: min 0.7
    assert M.min_acc(STEPS, ACC, B, t=4) == pytest.approx(0.7)
    # WC-ACC = 1/2 * A(E_1, f_6) + 1/2 * min-ACC = 0.5 * 0.8 + 0.5 * 0.4 = 0.6
    assert M.wc_acc(STEPS, ACC, B) == pytest.approx(0.6)
    # with one task WC-ACC is the current accuracy and min-ACC undefined
    assert M.wc_acc(STEPS[:3], ACC[:3, :1], B[:1]) == pytest.approx(1.0)
    assert math.isnan(M.min_acc(STEPS[:3], ACC[:3, :1], B[:1]))


def test_windowed_forgetting_and_plasticity():
    # task 0: largest drop between neighbours (w=2) is 0.3 (1.0->0.7 or 0.7->0.4);
    # within 3 evaluations (w=3) it is 0.6 (1.0 -> 0.4). Task 1 never drops.
    assert M.windowed_forgetting(ACC, 1) == 0.0
    assert M.windowed_forgetting(ACC, 2) == pytest.approx((0.3 + 0.0) / 2)
    assert M.windowed_forgetting(ACC, 3) == pytest.approx((0.6 + 0.0) / 2)
    # largest rise, w=2: task 0 0.4 -> 0.9 = 0.5; task 1 0.3 -> 0.6 = 0.3
    assert M.windowed_plasticity(ACC, 2) == pytest.approx((0.5 + 0.3) / 2)
    # w=3: task 0 0.5 -> 1.0 = 0.5; task 1 0.3 -> 0.8 = 0.5
    assert M.windowed_plasticity(ACC, 3) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="w=0"):
        M.windowed_forgetting(ACC, 0)


def test_stability_gap():
    g = M.stability_gap(STEPS, T0, switch_step=3, end_step=6, eps=0.02)
    # at the switch 1.0; minimum 0.4 at step 5; never back above 0.98 -> not recovered
    assert g.reference == 1.0 and g.depth == pytest.approx(0.6) and g.min_step == 5
    assert math.isnan(g.recovery_steps)
    g = M.stability_gap(STEPS, T0, switch_step=3, end_step=6, eps=0.1)
    assert g.recovery_steps == 3  # 0.9 >= 1.0 - 0.1 at step 6, 3 steps after the switch
    flat = M.stability_gap([1, 2, 3], [0.9, 0.95, 0.9], switch_step=1, eps=0.02)
    assert flat.depth == 0.0 and flat.recovery_steps == 0.0


curves = st.lists(st.floats(0, 1, allow_nan=False), min_size=2, max_size=40)


@settings(max_examples=200, deadline=None)
@given(curves, st.integers(1, 20))
def test_wf_non_decreasing_in_w(seq, w):
    assert M.max_window_drop(seq, w) <= M.max_window_drop(seq, w + 1) + 1e-12


@settings(max_examples=50, deadline=None)
@given(curves)
def test_wf_zero_for_monotone_curve(seq):
    assert M.max_window_drop(sorted(seq), 10) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 5), st.integers(2, 6), st.data())
def test_min_acc_below_final_and_wc_below_acc(n_tasks, per_task, data):
    n = n_tasks * per_task
    steps = np.arange(1, n + 1)
    acc = np.array(data.draw(st.lists(st.lists(st.floats(0, 1), min_size=n_tasks, max_size=n_tasks),
                                      min_size=n, max_size=n)))
    b = [per_task * (i + 1) for i in range(n_tasks)]
    for i in range(n_tasks):  # a task is evaluated only once it has begun
        acc[: per_task * i, i] = np.nan
    final = acc[-1]
    # per-task minimum after learning <= its final accuracy
    for i in range(n_tasks - 1):
        # min-ACC of the single task i equals its minimum after learning, <= its final value
        one = M.min_acc(steps, acc[:, [i, i + 1]], [b[i], b[-1]], k=1)
        assert one == pytest.approx(np.nanmin(acc[steps > b[i], i]))
        assert one <= final[i]
    assert M.min_acc(steps, acc, b) <= np.mean(final[:-1]) + 1e-12
    R = np.array([[acc[bk - 1, i] for i in range(n_tasks)] for bk in b])
    assert M.wc_acc(steps, acc, b) <= M.average_accuracy(R) + 1e-12


def test_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        M.min_acc([1, 2], np.zeros((3, 2)), [1])
    with pytest.raises(ValueError, match="out of range"):
        M.average_accuracy(R, k=3)
