"""IgnoreK: the transform_update hook's implementer (ignore-k, arXiv 2504.09522)."""

import pytest
import torch
from torch import nn

from poise import _registry
from poise.continual import IgnoreK, fit_stream, prune_top
from poise.measure import ContinualEvaluator
from poise.models import GPT, GPTConfig
from poise.transforms import ignore_top_k


def _sgd_step(strategy, w0, grad, lr=1.0):
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([w0]))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.weight.grad = torch.tensor([grad])
    before = {n: p.detach().clone() for n, p in model.named_parameters()} if strategy.needs_update_snapshot else {}
    opt.step()
    if before:
        strategy.transform_update(model, before)
    return model.weight.detach()[0]


def test_ignore_k_by_hand():
    w0, g = [1.0, 2.0, 3.0, 4.0], [0.1, -0.5, 0.2, 0.3]
    # SGD lr 1: delta = -g = [-0.1, 0.5, -0.2, -0.3]
    # k = 0.25: ceil(0.25 * 4) = 1 coordinate dropped, the largest |delta| (0.5): w = [0.9, 2, 2.8, 3.7]
    torch.testing.assert_close(_sgd_step(IgnoreK(0.25), w0, g), torch.tensor([0.9, 2.0, 2.8, 3.7]))
    # k = 0.5: ceil(2) = 2 dropped (0.5 and -0.3): w = [0.9, 2, 2.8, 4]
    torch.testing.assert_close(_sgd_step(IgnoreK(0.5), w0, g), torch.tensor([0.9, 2.0, 2.8, 4.0]))
    # k = 0.3: ceil(1.2) = 2 dropped as well
    torch.testing.assert_close(_sgd_step(IgnoreK(0.3), w0, g), torch.tensor([0.9, 2.0, 2.8, 4.0]))
    # k = 0: untouched, and no snapshot is asked for
    assert not IgnoreK(0.0).needs_update_snapshot
    torch.testing.assert_close(_sgd_step(IgnoreK(0.0), w0, g), torch.tensor([0.9, 2.5, 2.8, 3.7]))


def test_prune_top_is_the_transform_and_leaves_its_input():
    d = torch.tensor([[3.0, -1.0], [-4.0, 2.0]])
    out = prune_top(d, 0.5)  # ceil(2) largest |.|: -4 and 3
    assert torch.equal(out, torch.tensor([[0.0, -1.0], [0.0, 2.0]]))
    assert torch.equal(d, torch.tensor([[3.0, -1.0], [-4.0, 2.0]]))
    assert torch.equal(out, ignore_top_k(0.5).update([d.clone()], [{}], [d], {})[0])


def test_registered_and_checked():
    assert _registry.get("strategy", "ignore_k") is IgnoreK
    with pytest.raises(ValueError, match=r"k=1.0 is out of range; valid: \[0, 1\)"):
        IgnoreK(1.0)


@pytest.mark.parametrize("k", [0.0, 0.08, 0.5])
def test_equals_the_priming_studys_hand_written_loop(k):
    """The priming study's `_learn` pruned the realised Adam update by hand (snapshot, step,
    ``q.copy_(b + prune(q - b))`` over ``model.parameters()``, tied GPT weights once); the
    strategy's hooks give the same weights bit for bit."""

    def run(use_strategy, k=k):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.Adam(params, lr=0.01)
        strategy = IgnoreK(k)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randint(0, 11, (3, 8), generator=g)
            loss = nn.functional.cross_entropy(model(x[:, :-1])[0].flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if use_strategy:
                before = ({n: q.detach().clone() for n, q in model.named_parameters()}
                          if strategy.needs_update_snapshot else {})
                opt.step()
                if before:
                    strategy.transform_update(model, before)
            else:  # priming_study._learn as of 2026-12-02
                before = [q.detach().clone() for q in params] if k else None
                opt.step()
                if before is not None:
                    with torch.no_grad():
                        for q, b in zip(params, before, strict=True):
                            d = q - b
                            q.copy_(b + ignore_top_k(k).update([d.clone()], [{}], [d], {})[0])
        return [q.detach().clone() for q in model.parameters()]

    by_hand, by_strategy = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(by_hand, by_strategy, strict=True))
    if k:  # and the pruning did something
        assert not all(torch.equal(a, b) for a, b in zip(by_strategy, run(True, k=0.0), strict=True))


def test_in_the_loop_sparser_updates():
    class T:
        def __init__(self):
            self.id, self.classes, self.restrict = 0, [0, 1], False
            self.x_train, self.y_train = torch.randn(20, 5), torch.randint(0, 2, (20,))

    def final(k):
        torch.manual_seed(0)
        model = nn.Linear(5, 2)
        w0 = model.weight.detach().clone()
        t = T()
        ev = ContinualEvaluator({0: (t.x_train, t.y_train)})
        fit_stream(model, [t], IgnoreK(k), torch.optim.SGD(model.parameters(), lr=0.1), ev, steps_per_task=1,
                   batch_size=8, n_classes=2)
        return model.weight.detach() - w0

    # one SGD step: the kept coordinates equal plain SGD's, the ceil(0.5 * 10) = 5 largest are 0
    full, pruned = final(0.0), final(0.5)
    assert int((pruned == 0).sum()) == 5
    kept = pruned != 0
    torch.testing.assert_close(pruned[kept], full[kept])
    assert full[~kept].abs().min() >= full[kept].abs().max()
