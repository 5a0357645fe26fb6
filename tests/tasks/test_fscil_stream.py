"""The few-shot class-incremental digits stream: base session of every training sample of the base
classes, then ``ways``-way ``shots``-shot sessions; every session tested on all its classes' test data."""

import numpy as np
import pytest
import torch

from poise.tasks.digits import _digits
from poise.tasks.fscil import fscil_digits


def test_default_protocol_6_base_classes_then_4_one_way_5_shot_sessions():
    s = fscil_digits()
    xtr, xte, ytr, yte = _digits(0)
    assert s.n_classes == 10 and len(s.tasks) == 5
    assert s.tasks[0].classes == [0, 1, 2, 3, 4, 5]
    assert len(s.tasks[0].y_train) == int(np.isin(ytr, range(6)).sum())  # every base training sample
    for i, t in enumerate(s.tasks[1:], start=1):
        assert t.classes == [5 + i] and not t.restrict
        assert t.y_train.tolist() == [5 + i] * 5
        assert len(t.y_test) == int((yte == 5 + i).sum())  # all test samples of the class
    seen = [c for t in s.tasks for c in t.classes]
    assert sorted(seen) == list(range(10))


def test_shots_ways_and_seeded_draw():
    s = fscil_digits(n_tasks=3, ways=2, shots=3)
    assert s.tasks[0].classes == [0, 1, 2, 3, 4, 5]  # 10 - 2 * 2
    assert s.tasks[1].classes == [6, 7] and torch.bincount(s.tasks[1].y_train, minlength=10)[6:8].tolist() == [3, 3]
    again = fscil_digits(n_tasks=3, ways=2, shots=3)
    assert torch.equal(s.tasks[2].x_train, again.tasks[2].x_train)
    other = fscil_digits(n_tasks=3, ways=2, shots=3, shot_seed=1)
    assert not torch.equal(s.tasks[2].x_train, other.tasks[2].x_train)
    # the few shots are training samples of their class
    xtr, _, ytr, _ = _digits(0)
    for x, y in zip(s.tasks[1].x_train, s.tasks[1].y_train, strict=True):
        assert any(np.array_equal(x.numpy(), xtr[j]) for j in np.flatnonzero(ytr == int(y)))


@pytest.mark.parametrize("kwargs, msg", [
    ({"scenario": "task"}, "valid choices: class"),
    ({"n_tasks": 10}, "valid range: 1..9"),
    ({"n_tasks": 0}, "valid range"),
    ({"ways": 0}, "ways=0"),
    ({"ways": 2, "n_tasks": 6}, "valid range: 1..5"),
    ({"shots": 0}, "shots=0"),
    ({"shots": 10_000}, "valid range: 1.."),
])
def test_bad_input_names_the_range(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        fscil_digits(**kwargs)
