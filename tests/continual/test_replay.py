import numpy as np
import torch

from poise.continual import Batch, Replay, ReservoirBuffer


def test_reservoir_inclusion_probability_is_uniform():
    # Offer n = 500 items to a buffer of 50, many times: every item should be kept with
    # probability 50/500 = 0.1, whatever its position in the stream.
    n, cap, trials = 500, 50, 300
    counts = np.zeros(n)
    items = Batch(torch.arange(n).float()[:, None], torch.arange(n))
    for t in range(trials):
        buf = ReservoirBuffer(cap, seed=t)
        for i in range(0, n, 25):  # offered in batches of 25
            buf.add(items.index(torch.arange(i, i + 25)))
        assert len(buf) == cap and buf.seen == n
        counts[buf._y[: buf.size].numpy()] += 1
    # chi-square over 10 position buckets: expected cap * trials / 10 each
    buckets = counts.reshape(10, -1).sum(1)
    expected = cap * trials / 10
    chi2 = ((buckets - expected) ** 2 / expected).sum()
    assert chi2 < 27.9  # 99.9% quantile of chi2 with 9 dof
    assert abs(counts.mean() / trials - cap / n) < 1e-12  # exactly cap kept per trial


def test_reservoir_keeps_everything_until_full_and_masks_follow():
    buf = ReservoirBuffer(10)
    mask = torch.zeros(6, 4, dtype=torch.bool)
    mask[:, :2] = True
    buf.add(Batch(torch.randn(6, 3), torch.arange(6), mask))
    assert len(buf) == 6 and sorted(buf._y[:6].tolist()) == list(range(6))
    s = buf.sample(4)
    assert s.mask is not None and s.mask[:, :2].all() and not s.mask[:, 2:].any()


def test_replay_adds_memory_loss_after_first_step(tiny):
    model, t0, _ = tiny
    r = Replay(mem_size=20, batch_size=8)
    b = t0.index(torch.arange(8))
    assert r.loss_terms(model, b, model(b.x)) == {}  # empty memory: no term
    r.after_step(model, b)
    terms = r.loss_terms(model, b, model(b.x))
    assert set(terms) == {"replay"} and terms["replay"] > 0
