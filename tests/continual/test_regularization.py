import pytest
import torch
from torch import nn

from poise.continual import EWC, Batch, LwF, diagonal_fisher


def test_fisher_matches_per_sample_loop(tiny):
    model, t0, _ = tiny
    f = diagonal_fisher(model, t0, batch_size=7)
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(t0)):
        model.zero_grad()
        nn.functional.cross_entropy(model(t0.x[i : i + 1]), t0.y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            want[n] += p.grad**2 / len(t0)
    for n in want:
        torch.testing.assert_close(f[n], want[n], rtol=1e-4, atol=1e-7)


def test_ewc_zero_at_anchor_and_gradient_away_from_it(tiny):
    model, t0, t1 = tiny
    ewc = EWC(lam=10.0)
    ewc.after_task(model, t0)
    b = t1.index(torch.arange(8))
    pen = ewc.loss_terms(model, b, model(b.x))["ewc"]
    assert pen.item() == 0.0
    model.zero_grad()
    pen.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())
    # move away: gradient = lam * F * (theta - theta*)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    model.zero_grad()
    ewc.penalty(model).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 10.0 * ewc.fisher[n] * 0.1, rtol=1e-5, atol=1e-8)


def test_online_ewc_accumulates_decayed_fisher(tiny):
    model, t0, t1 = tiny
    ewc = EWC(lam=1.0, decay=0.5)
    ewc.after_task(model, t0)
    f1 = {n: f.clone() for n, f in ewc.fisher.items()}
    ewc.after_task(model, t1)
    f2 = diagonal_fisher(model, t1)
    for n in f1:  # F = gamma * F_1 + F_2
        torch.testing.assert_close(ewc.fisher[n], 0.5 * f1[n] + f2[n])


def test_ewc_rejects_bad_values():
    with pytest.raises(ValueError, match="decay=2"):
        EWC(decay=2)
    with pytest.raises(ValueError, match="lam=-1"):
        EWC(lam=-1)


def test_lwf_zero_at_snapshot_and_positive_after_change(tiny):
    model, t0, t1 = tiny
    lwf = LwF(alpha=1.0, temperature=2.0)
    lwf.after_task(model, t0)
    assert lwf.old_units == [0, 1]
    b = t1.index(torch.arange(8))
    assert lwf.loss_terms(model, b, model(b.x))["lwf"].abs().item() < 1e-6
    with torch.no_grad():
        model[2].weight[0].add_(1.0)
    assert lwf.loss_terms(model, b, model(b.x))["lwf"].item() > 1e-4


def test_ewc_with_masked_batches(tiny):
    model, t0, _ = tiny
    mask = torch.zeros(len(t0), 4, dtype=torch.bool)
    mask[:, :2] = True
    f = diagonal_fisher(model, Batch(t0.x, t0.y, mask))
    assert all(torch.isfinite(v).all() for v in f.values())
