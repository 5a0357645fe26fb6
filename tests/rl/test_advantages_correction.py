import math

import pytest
import torch

from poise.rl import (
    decompose_ratio,
    dr_grpo_advantage,
    dynamic_sampling_keep,
    entropy_topk_mask,
    global_stat_advantage,
    group_advantage,
    is_weights,
    overlong_penalty,
    rloo_advantage,
    steer_weights,
)

GID = torch.tensor([0, 0, 0, 1, 1, 1, 2])
R = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5], dtype=torch.float64)


def test_grpo_by_hand_constant_groups_and_singletons():
    a = group_advantage(R, GID)
    # group 0: mean 1/3, unbiased std sqrt(1/3); group 1 constant -> 0; singleton -> 0
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(a[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / (s + 1e-6))
    assert torch.equal(a[3:], torch.zeros(4)) and torch.isfinite(a).all()


def test_dr_grpo_rloo_and_batch():
    torch.testing.assert_close(dr_grpo_advantage(R, GID)[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]))
    loo = rloo_advantage(R, GID)
    # r_i - mean of the others: [1 - 0, 0 - 0.5, 0 - 0.5]; = n/(n-1) (r - mean)
    torch.testing.assert_close(loo[:3], torch.tensor([1.0, -0.5, -0.5]))
    assert loo[6] == 0
    b = group_advantage(R, GID, scale="batch")
    torch.testing.assert_close(b[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / (R.std() + 1e-6))
    with pytest.raises(ValueError, match="scale='z'; valid choices: group, batch, none"):
        group_advantage(R, GID, scale="z")


def test_reinforce_ada_global_stats_reconstruct_bernoulli():
    # a prompt sampled 8 times with 2 positives: mean 0.25, unbiased std of {1,1,0,0,0,0,0,0}
    r = torch.tensor([1.0, 0.0])
    p, q = torch.tensor([2, 2]), torch.tensor([6, 6])
    ref = torch.tensor([1.0, 1, 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(global_stat_advantage(r, torch.tensor([0, 0]), p, q),
                               (r - 0.25) / (ref.std() + 1e-6))
    # a prompt that failed all 8 times: mean 0, std 0, advantage 0 (not NaN)
    zero = global_stat_advantage(torch.zeros(2), torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([8, 8]))
    assert torch.equal(zero, torch.zeros(2))


def test_sequence_is_equals_product_and_tis_with_high_bound_is_plain_is():
    g = torch.Generator().manual_seed(0)
    log_rho = 0.1 * torch.randn(3, 5, generator=g)
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0
    seq = is_weights(log_rho, mask, level="sequence", hi=None)
    want = torch.exp((log_rho * mask).sum(-1))[:, None] * mask
    torch.testing.assert_close(seq.weights, want)
    tis = is_weights(log_rho, mask, level="token", hi=1e9)
    torch.testing.assert_close(tis.weights, torch.exp(log_rho) * mask)
    assert float(tis.metrics["truncated_frac"]) == 0
    geo = is_weights(log_rho, mask, level="geometric", hi=None)
    torch.testing.assert_close(geo.weights[:, 0], torch.exp((log_rho * mask).sum(-1) / mask.sum(-1)))


def test_truncation_and_masking_by_hand():
    log_rho = torch.log(torch.tensor([[0.3, 1.0, 4.0]]))
    m = torch.ones(1, 3)
    t = is_weights(log_rho, m, hi=2.0)
    torch.testing.assert_close(t.weights, torch.tensor([[0.3, 1.0, 2.0]]))
    assert float(t.metrics["truncated_frac"]) == pytest.approx(1 / 3)
    assert float(t.metrics["rho/max"]) == pytest.approx(4.0)  # before truncation
    mk = is_weights(log_rho, m, mode="mask", lo=0.5, hi=2.0)
    torch.testing.assert_close(mk.weights, torch.tensor([[0.0, 1.0, 0.0]]))
    assert float(mk.metrics["masked_frac"]) == pytest.approx(2 / 3)
    assert not mk.weights.requires_grad


def test_decompose_ratio_multiplies_back():
    g = torch.Generator().manual_seed(1)
    logp, old, behav = (torch.randn(2, 3, generator=g) for _ in range(3))
    log_r, log_rho, metrics = decompose_ratio(logp, old, behav, torch.ones(2, 3))
    torch.testing.assert_close(log_r + log_rho, logp - behav)
    assert "mismatch_kl_k3" in metrics


def test_entropy_topk_mask_and_steer_weights():
    h = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.2, 0.3, 5.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])  # the 5.0 is padding
    top = entropy_topk_mask(h, m, ratio=0.2)  # ceil(0.2 * 6) = 2 tokens: 0.9 and 0.7
    torch.testing.assert_close(top, torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    w = steer_weights(torch.tensor([1.0, -1.0]), h, torch.full((2, 4), -1.0), torch.full((2, 4), -1.0), m)
    assert ((w >= 0.8) & (w <= 1.0)).all() and (w[m == 0] == 1).all()


def test_dynamic_sampling_and_overlong():
    keep, metrics = dynamic_sampling_keep(R, GID)
    assert keep.tolist() == [True, True, True, False, False, False, False]
    assert float(metrics["zero_adv_group_frac"]) == pytest.approx(2 / 3)
    torch.testing.assert_close(overlong_penalty(torch.tensor([10, 16, 20]), max_len=20, buffer=4),
                               torch.tensor([0.0, 0.0, -1.0], dtype=torch.float32))
