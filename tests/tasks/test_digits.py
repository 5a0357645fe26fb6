import numpy as np
import pytest
import torch

from poise.tasks import build_model, load_stream


def test_split_digits_class_and_task_incremental():
    s = load_stream("split-digits")
    assert len(s.tasks) == 5 and s.n_classes == 10
    assert [t.classes for t in s.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    for t in s.tasks:
        assert set(t.y_train.unique().tolist()) == set(t.classes)
        assert set(t.y_test.unique().tolist()) == set(t.classes)
        assert not t.restrict
        assert t.x_train.min() >= 0 and t.x_train.max() <= 1
    n_train = sum(len(t.y_train) for t in s.tasks)
    n_test = sum(len(t.y_test) for t in s.tasks)
    assert n_train + n_test == 1797 and abs(n_test / 1797 - 0.3) < 0.01
    assert all(t.restrict for t in load_stream("split-digits", scenario="task").tasks)


def test_rotated_and_permuted_are_domain_incremental():
    r = load_stream("rotated-digits", n_tasks=3)
    base = r.tasks[0]
    assert torch.equal(r.tasks[1].x_train, torch.from_numpy(np.rot90(base.x_train.numpy(), 1, axes=(1, 2)).copy()))
    assert torch.equal(r.tasks[1].y_train, base.y_train)
    p = load_stream("permuted-digits", n_tasks=3)
    a, b = p.tasks[0].x_train.reshape(-1, 64), p.tasks[2].x_train.reshape(-1, 64)
    assert torch.equal(a.sort(1).values, b.sort(1).values) and not torch.equal(a, b)


def test_bad_stream_arguments_name_the_choices():
    with pytest.raises(ValueError, match="valid choices: class, task"):
        load_stream("split-digits", scenario="domain")
    with pytest.raises(ValueError, match="1..4"):
        load_stream("rotated-digits", n_tasks=7)
    want = "valid choices: drift-digits, fscil-digits, permuted-digits, rotated-digits, split-digits"
    with pytest.raises(KeyError, match=want):
        load_stream("mnist")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_models_shape(name):
    m = build_model(name, 64, 10, hidden=32)
    assert m(torch.randn(5, 8, 8)).shape == (5, 10)


def test_the_digits_split_is_parsed_once_and_each_caller_gets_its_own_arrays():
    import numpy as np

    from poise.tasks.digits import _digits, _digits_split

    a = _digits(0)
    hits = _digits_split.cache_info().hits
    b = _digits(0)
    assert _digits_split.cache_info().hits == hits + 1
    assert all(np.array_equal(x, y) and not np.shares_memory(x, y) for x, y in zip(a, b, strict=True))
    a[0][:] = -1.0  # a stream changing its arrays changes no other stream's
    assert (_digits(0)[0] >= 0).all() and len(_digits(1)[0]) == len(a[0]) and not np.array_equal(_digits(1)[0], b[0])
