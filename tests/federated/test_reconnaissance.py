import itertools

import pytest
import torch

from poise.federated import class_prototypes, merge_many, merge_prototypes, prototype_logits, prototype_predict


def test_class_prototypes_by_hand():
    emb = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    means, counts = class_prototypes(emb, torch.tensor([1, 1, 3]))
    assert counts == {1: 2, 3: 1}
    assert torch.equal(means[1], torch.tensor([1.0, 0.0])) and torch.equal(means[3], torch.tensor([0.0, 4.0]))


def test_merge_by_hand():
    # class 1: (2*[1,0] + 1*[4,3]) / 3 = [2,1], n = 3; class 2 only on the client; class 5 only on the server
    means, counts = merge_prototypes({1: torch.tensor([1.0, 0.0]), 5: torch.tensor([9.0, 9.0])}, {1: 2, 5: 4},
                                     {1: torch.tensor([4.0, 3.0]), 2: torch.tensor([7.0, 7.0])}, {1: 1, 2: 6})
    assert counts == {1: 3, 2: 6, 5: 4}
    assert torch.allclose(means[1], torch.tensor([2.0, 1.0]))
    assert torch.equal(means[2], torch.tensor([7.0, 7.0])) and torch.equal(means[5], torch.tensor([9.0, 9.0]))


def _clients(seed: int = 0, n_clients: int = 4):
    g = torch.Generator().manual_seed(seed)
    out, all_e, all_y = [], [], []
    for c in range(n_clients):
        n = 5 + 3 * c
        e = torch.randn(n, 3, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4 + c, (n,), generator=g)  # overlapping and client-specific classes
        out.append(class_prototypes(e, y))
        all_e.append(e)
        all_y.append(y)
    return out, torch.cat(all_e), torch.cat(all_y)


def test_merge_equals_centralized_mean():
    clients, e, y = _clients()
    means, counts = merge_many(clients)
    c_means, c_counts = class_prototypes(e, y)
    assert counts == c_counts
    for k in c_means:
        assert torch.allclose(means[k], c_means[k], atol=1e-12)


def test_merge_is_order_invariant():
    clients, _, _ = _clients(seed=1)
    ref_m, ref_n = merge_many(clients)
    for perm in itertools.permutations(range(len(clients))):
        m, n = merge_many([clients[i] for i in perm])
        assert n == ref_n
        assert all(torch.allclose(m[k], ref_m[k], atol=1e-12) for k in ref_m)


def test_chunked_merge_is_batch_mean():
    g = torch.Generator().manual_seed(2)
    e = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.zeros(30, dtype=torch.long)
    chunks = [class_prototypes(e[i:j], y[i:j]) for i, j in ((0, 1), (1, 11), (11, 30))]
    means, counts = merge_many(chunks)
    assert counts == {0: 30} and torch.allclose(means[0], e.mean(0), atol=1e-12)


def test_merge_is_pure():
    m = {0: torch.tensor([1.0, 1.0])}
    n = {0: 1}
    merge_prototypes(m, n, {0: torch.tensor([3.0, 3.0])}, {0: 1})
    assert n == {0: 1} and torch.equal(m[0], torch.tensor([1.0, 1.0]))


def test_predict_nearest_prototype():
    means = {3: torch.tensor([0.0, 0.0]), 7: torch.tensor([10.0, 0.0])}
    x = torch.tensor([[1.0, 1.0], [9.0, -1.0], [4.9, 0.0]])
    assert prototype_predict(x, means).tolist() == [3, 7, 3]
    logits, classes = prototype_logits(x[:1], means)
    assert classes == [3, 7] and torch.allclose(logits, torch.tensor([[-2.0, -82.0]]))  # -(1+1), -(81+1)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"counts\[0\]=0"):
        merge_prototypes({}, {}, {0: torch.zeros(2)}, {0: 0})
    with pytest.raises(ValueError, match="different classes"):
        merge_prototypes({0: torch.zeros(2)}, {}, {}, {})
    with pytest.raises(ValueError, match="shape"):
        merge_prototypes({0: torch.zeros(2)}, {0: 1}, {0: torch.zeros(3)}, {0: 1})
    with pytest.raises(ValueError, match="no examples"):
        class_prototypes(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        class_prototypes(torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="labels"):
        class_prototypes(torch.zeros(2, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="no prototypes"):
        prototype_predict(torch.zeros(1, 2), {})
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        prototype_predict(torch.zeros(1, 3), {0: torch.zeros(2)})
