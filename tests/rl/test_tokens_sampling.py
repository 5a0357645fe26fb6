import math

import pytest
import torch

from poise.rl import (
    AdaSampler,
    StalenessBuffer,
    bapo_bounds,
    capo_mask,
    capo_token_kl,
    echo_clip_eps,
    global_stat_advantage,
    gtpo_conflict_weights,
    gtpo_entropy_filter,
    ppo_clip_loss,
)


def test_gtpo_protects_shared_prefix_and_suffix():
    # group of 2: completion 0 positive, 1 negative; they share the prefix [5, 6] and the
    # final token 9 (right-aligned, different lengths)
    ids = torch.tensor([[5, 6, 1, 9], [5, 6, 2, 9]])
    mask = torch.ones(2, 4)
    w = gtpo_conflict_weights(ids, torch.tensor([1.0, -1.0]), torch.tensor([0, 0]), mask)
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.0, 1.0, 2.0], [0.0, 0.0, 1.0, 0.0]]))
    # a group with only positive advantages has no conflicts
    w2 = gtpo_conflict_weights(ids, torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), mask)
    assert torch.equal(w2, torch.ones(2, 4))
    # padding never counts
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    w3 = gtpo_conflict_weights(ids, torch.tensor([1.0, -1.0]), torch.tensor([0, 0]), m)
    assert torch.equal(w3[0, 2:], torch.ones(2))


def test_gtpo_entropy_filter():
    out = gtpo_entropy_filter(torch.tensor([1.0, 1.0]), torch.tensor([0.9, 0.5]))
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0 - 0.05]))


def test_bapo_raises_high_bound_until_target_and_documents_low_direction():
    r = torch.tensor([[1.5, 1.5, 0.5, 0.5]])
    a = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    m = torch.ones(1, 4)
    # pos = 2 min(1.5, c_high), neg = 2 max(0.5, c_low) = 1.2 at c_low = 0.6
    lo, hi, met = bapo_bounds(r, a, m, target=1.9, c_low=0.6, c_low_max=0.6, c_high=1.2, c_high_max=2.0,
                              step_high=0.1)
    assert lo == 0.6 and hi == pytest.approx(1.2)  # 2.4 / 1.2 = 2 >= 1.9 already
    lo, hi, met = bapo_bounds(r, a, m, target=2.3, c_low=0.6, c_low_max=0.6, c_high=1.2, c_high_max=2.0,
                              step_high=0.1)
    # 2.3 needs min(1.5, c_high) >= 1.38: c_high goes 1.2 -> 1.3 -> 1.4, ratio 2.8 / 1.2
    assert hi == pytest.approx(1.4) and float(met["bapo/pos_neg_ratio"]) == pytest.approx(2.8 / 1.2)
    # the code's measure: raising c_low can only lower the ratio (documented inconsistency)
    r_low, _, _ = bapo_bounds(r, a, m, target=100, c_low=0.6, c_low_max=0.9, c_high=2.0, c_high_max=2.0)
    assert r_low == pytest.approx(0.9)
    v1 = bapo_bounds(r, a, m, target=0, c_low=0.6, c_low_max=0.6, c_high=2, c_high_max=2)[2]["bapo/pos_neg_ratio"]
    v2 = bapo_bounds(r, a, m, target=0, c_low=0.9, c_low_max=0.9, c_high=2, c_high_max=2)[2]["bapo/pos_neg_ratio"]
    assert float(v2) < float(v1)


def test_echo_clip_eps_is_tight_for_confident_tails():
    conf = torch.tensor([[0.99] * 20, [0.2] * 20])
    eps = echo_clip_eps(conf, torch.ones(2, 20))
    assert 0.05 < float(eps[0]) < float(eps[1]) < 0.2
    torch.testing.assert_close(eps[1], torch.tensor(0.05 + 0.15 * (1 / (1 + math.exp(-4 * 0.8)))))
    # per-sequence eps works as clip bounds
    logp = torch.zeros(2, 20, requires_grad=True)
    ppo_clip_loss(logp, torch.zeros(2, 20), torch.ones(2), torch.ones(2, 20), eps_low=eps[:, None],
                  eps_high=eps[:, None]).values.sum().backward()


def test_capo_kl_prediction_matches_true_kl_for_small_steps():
    torch.manual_seed(0)
    h, W = torch.randn(2, 3, 5), torch.randn(7, 5)
    d = 1e-3 * torch.randn(7, 5)
    p = torch.softmax(h @ W.T, -1)
    q = torch.softmax(h @ (W + d).T, -1)
    true_kl = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(capo_token_kl(h, p, d), true_kl, rtol=1e-2, atol=1e-9)
    keep, met = capo_mask(torch.tensor([[0.1, 0.0], [0.5, 0.6]]), torch.ones(2, 2), kl_max=0.2)
    torch.testing.assert_close(keep, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert float(met["capo/masked_frac"]) == 0.5


def test_ada_sampler_balanced_successive_elimination():
    s = AdaSampler(n_prompts=3, n=4, round_repeat=4, max_rounds=3)
    # prompt 0: 2 pos 2 neg in round 1 -> done; prompt 1: all negative; prompt 2: all positive
    s.update([0] * 4 + [1] * 4 + [2] * 4, [1, 1, 0, 0] + [0] * 4 + [1] * 4)
    assert s.active() == [1, 2]
    s.update([1] * 4 + [2] * 4, [1, 1, 0, 0] + [0, 0, 1, 1])
    assert s.active() == []
    picks, counts = s.select()
    assert counts == [(2, 2), (2, 6), (6, 2)]
    assert all(len(p) == 4 for p in picks)
    assert sorted(s.rewards[1][k] for k in picks[1]) == [0, 0, 1, 1]
    # the global statistics then feed the advantage
    a = global_stat_advantage(torch.tensor([1.0, 0.0]), torch.tensor([1, 1]), torch.tensor([2, 2]),
                              torch.tensor([6, 6]))
    assert a[0] > 0 > a[1]
    with pytest.raises(ValueError, match="rule='x'; valid choices: balanced, positive_focused"):
        AdaSampler(1, rule="x")


def test_staleness_buffer_bounds_version_gap():
    b = StalenessBuffer(eta=1, batch_size=2)
    assert b.capacity(version=0) == 4  # (eta + 0 + 1) * 2
    b.start(4)
    for v in (0, 0, 0, 0):
        b.put(v, f"s{v}")
    assert b.capacity(version=0) == 0
    assert len(b.get(version=1)) == 2  # gap 1 <= eta
    assert b.get(version=2) == [] and b.dropped == 2  # gap 2 > eta: dropped, counted


def test_bapo_paper_target_is_the_positive_share():
    r = torch.tensor([[1.5, 0.5]])
    a = torch.tensor([[1.0, -1.0]])
    # share = pos / (pos + neg) = c_high / (c_high + 0.6); 0.69 needs c_high >= 1.336: 1.2 -> 1.3 -> 1.4
    lo, hi, met = bapo_bounds(r, a, torch.ones(1, 2), target=0.69, c_low=0.6, c_low_max=0.6, c_high=1.2,
                              c_high_max=2.0, step_high=0.1, target_kind="share")
    assert hi == pytest.approx(1.4) and float(met["bapo/pos_share"]) == pytest.approx(1.4 / 2.0, rel=1e-6)
    with pytest.raises(ValueError, match="target_kind='x'; valid choices: ratio, share"):
        bapo_bounds(r, a, torch.ones(1, 2), target_kind="x")


def test_loglinear_proximal_policy():
    from poise.rl import prox_logp_loglinear

    behav, logp = torch.zeros(1, 3), torch.ones(1, 3)
    # generated by version 4 (gap 1: the proximal version itself), 3 (halfway), 2 (a third)
    versions = torch.tensor([[4, 3, 2]])
    out = prox_logp_loglinear(behav, logp, versions, version=5)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5, 2 / 3]]))
