"""StableWorld's dynamic eviction (arXiv 2601.15281) as a replay-buffer policy: scores, exact
eviction of degraded items, and a comparison with reservoir on a stream whose stored items degrade."""

import pytest
import torch
from torch import nn

from poise.continual import Batch, ConsistencyBuffer, FaultyReplay, StableEvictionReplay, consistency_scores


def test_scores_by_hand():
    proj = torch.eye(2)
    anchors = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    cur = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-2.0, 0.0]])
    # cos = 1, 1/sqrt(2), -1
    torch.testing.assert_close(consistency_scores(cur, anchors, proj), torch.tensor([1.0, 2 ** -0.5, -1.0]))


def _stream(n, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(n, d, generator=g), torch.randint(0, 4, (n,), generator=g))


def test_evicts_exactly_the_degraded_items():
    buf = ConsistencyBuffer(20, sketch_dim=8, seed=0)
    buf.add(_stream(20))
    assert torch.allclose(buf.scores(), torch.ones(20))  # clean items are fully consistent
    hit = buf.corrupt(0.3, 2.0)
    assert hit == int(buf.faulty.sum()) > 0
    clean_x = buf._x[: buf.size][~buf.faulty[: buf.size]].clone()
    n, bad = buf.evict(0.9)
    assert n == bad == hit and len(buf) == 20 - hit and not buf.faulty[: len(buf)].any()
    torch.testing.assert_close(buf._x[: len(buf)], clean_x)  # the consistent items are all kept, in order
    assert buf.evict(0.9) == (0, 0)
    assert ConsistencyBuffer(3).evict(0.9) == (0, 0)  # empty buffer: a no-op


def test_eviction_keeps_the_memory_clean_where_reservoir_accumulates_faults():
    res, ev = FaultyReplay(mem_size=50, fault_rate=0.05, fault_scale=1.0), \
        StableEvictionReplay(mem_size=50, fault_rate=0.05, fault_scale=1.0)
    model = nn.Identity()
    for t in range(40):
        b = _stream(8, seed=t)
        r, e = res.after_step(model, b), ev.after_step(model, b)
    assert r["faulty_frac"].item() > 0.3  # reservoir: corrupted items pile up
    assert e["faulty_frac"].item() == 0.0 and e["mem_size"].item() > 40  # refilled by the stream


def test_bad_input_is_refused_without_state_change():
    with pytest.raises(ValueError, match=r"threshold=2.0 must be in \[-1, 1\]"):
        StableEvictionReplay(threshold=2.0)
    with pytest.raises(ValueError, match=r"fault_rate=1.5 must be in \[0, 1\]"):
        FaultyReplay(fault_rate=1.5)
    with pytest.raises(ValueError, match="capacity=0 must be >= 1"):
        ConsistencyBuffer(0)
    s = StableEvictionReplay(mem_size=5)
    assert s.loss_terms(nn.Identity(), _stream(2), None) == {}
    with pytest.raises(RuntimeError, match="empty buffer"):
        s.buffer.sample(1)
