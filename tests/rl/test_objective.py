"""policy_objective: where the IS correction goes, token selection and weights, BAPO, errors.
Hand-computable numbers; the arithmetic is in the comments."""

import math

import pytest
import torch

from poise.rl import (
    PolicyBatch,
    bapo_bounds,
    call_loss,
    is_placement,
    policy_losses,
    policy_objective,
    steer_weights,
)

LN2 = math.log(2)


def _lp(*p):
    return torch.log(torch.tensor([list(p)]))


def test_is_placement_is_read_from_the_signature():
    assert {n: is_placement(n) for n in policy_losses()} == {
        "pg": "weights", "ppo_clip": "values", "gspo": "values", "cispo": "values", "sapo": "values",
        "minirl": "own", "decoupled_ppo": "own", "vespo": "own", "seq_sapo": "values", "seq_delta": "values",
        "gmpo": "values", "clip_cov": "values", "kl_cov": "values"}


def test_pg_weights_pi_theta_over_mu():
    # pi_theta = [0.5, 0.25], mu = [0.25, 0.5]: pi_theta/mu = [2, 0.5]; TIS at 1.5: w = [1.5, 0.5].
    # pi_old = mu here, so a (wrong) pi_old/mu weight would be 1.
    logp = _lp(0.5, 0.25).requires_grad_(True)
    behav = _lp(0.25, 0.5)
    b = PolicyBatch(logp, behav.clone(), behav, torch.tensor([2.0]), torch.ones(1, 2))
    obj = policy_objective(b, "pg", is_level="token", is_mode="truncate", is_max=1.5)
    # l = -w A log p = [-1.5 * 2 * (-ln 2), -0.5 * 2 * (-2 ln 2)] = [3 ln 2, 2 ln 2]
    torch.testing.assert_close(obj.values, torch.tensor([[3 * LN2, 2 * LN2]]))
    obj.values.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-3.0, -1.0]]))  # -w A
    assert float(obj.metrics["is/truncated_frac"]) == 0.5
    assert torch.equal(obj.mask, b.mask)


def test_clipped_losses_weight_pi_old_over_mu():
    # pi_theta = pi_old = [0.5, 0.5] (ratio 1: ppo_clip's value is -A), mu = [0.25, 0.5]:
    # rho = pi_old/mu = [2, 1], truncated at 1.5: w = [1.5, 1]; A = 2: l = -A w = [-3, -2]
    old = _lp(0.5, 0.5)
    b = PolicyBatch(old.clone().requires_grad_(True), old, _lp(0.25, 0.5), torch.tensor([2.0]), torch.ones(1, 2))
    obj = policy_objective(b, "ppo_clip", is_level="token", is_max=1.5)
    torch.testing.assert_close(obj.values, torch.tensor([[-3.0, -2.0]]))
    # sequence level: rho = exp(ln 2 + 0) = 2 for both tokens, truncated at 1.5: l = [-3, -3]
    obj = policy_objective(b, "ppo_clip", is_level="sequence", is_max=1.5)
    torch.testing.assert_close(obj.values, torch.tensor([[-3.0, -3.0]]))
    # masking (MIS) at 1.5 drops the first token: w = [0, 1]
    obj = policy_objective(b, "ppo_clip", is_level="token", is_mode="mask", is_max=1.5)
    torch.testing.assert_close(obj.values, torch.tensor([[0.0, -2.0]]))
    assert float(obj.metrics["is/masked_frac"]) == 0.5
    # no correction: l = -A = [-2, -2]
    torch.testing.assert_close(policy_objective(b, "ppo_clip").values, torch.tensor([[-2.0, -2.0]]))


@pytest.mark.parametrize("loss", ["minirl", "decoupled_ppo"])
def test_losses_with_behav_logp_carry_their_own_weights(loss):
    old = _lp(0.5, 0.5)
    b = PolicyBatch(old.clone().requires_grad_(True), old, _lp(0.25, 0.5), torch.tensor([2.0]), torch.ones(1, 2))
    obj = policy_objective(b, loss, is_level="token", is_max=1.5)
    assert torch.equal(obj.values, call_loss(loss, b).values)
    assert not any(k.startswith("is/") for k in obj.metrics)


def test_entropy_top_selects_tokens_for_the_aggregation_mask():
    # 4 valid tokens, ratio 0.5: ceil(0.5 * 4) = 2 highest entropies (0.9 and 0.5) are kept
    b = PolicyBatch(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([1.0, -1.0]),
                    torch.ones(2, 2))
    ent = torch.tensor([[0.1, 0.9], [0.5, 0.3]])
    obj = policy_objective(b, "ppo_clip", token_select="entropy_top", entropy_ratio=0.5, entropy=ent)
    assert torch.equal(obj.mask, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    # ratio 1: values -A = [[-1, -1], [1, 1]]; token_mean over the 2 selected: (-1 + 1) / 2 = 0
    assert float(obj.aggregate("token_mean")) == 0.0
    torch.testing.assert_close(obj.values, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))


def test_steer_multiplies_the_values_by_its_weights():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 4, generator=g) * 2
    b = PolicyBatch(logp, logp + 0.1, logp, torch.tensor([1.0, -2.0, 0.5]), torch.ones(3, 4))
    ent = torch.rand(3, 4, generator=g)
    obj = policy_objective(b, "cispo", token_weights="steer", entropy=ent)
    sw = steer_weights(b.adv, ent, b.old_logp, logp, b.mask)
    assert not torch.equal(sw, torch.ones_like(sw))
    torch.testing.assert_close(obj.values, call_loss("cispo", b).values * sw)
    torch.testing.assert_close(obj.metrics["steer/weight_mean"], sw.mean())


def test_bapo_replaces_the_clip_bounds():
    # A = [1, -1], r = [1.3, 1]: e = [min(1.3, 1.2) * 1, max(1, 0.6) * -1] = [1.2, -1]: pos/neg = 1.2 >= 1,
    # so BAPO keeps c_low = 0.6, c_high = 1.2: eps_high = 0.2 replaces the caller's 0.5.
    # l_1 = max(-1.3, -clip(1.3, 0.6, 1.2)) = -1.2; l_2 = max(1, 1) = 1
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.3, 1.0]]))
    b = PolicyBatch(logp, old, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2))
    obj = policy_objective(b, "ppo_clip", adaptive_clip="bapo", eps_high=0.5)
    torch.testing.assert_close(obj.values, torch.tensor([[-1.2, 1.0]]))
    assert float(obj.metrics["bapo/c_high"]) == pytest.approx(1.2)
    assert bapo_bounds(torch.exp(logp), b.adv, b.mask)[:2] == (0.6, 1.2)
    torch.testing.assert_close(policy_objective(b, "ppo_clip", eps_high=0.5).values, torch.tensor([[-1.3, 1.0]]))


def test_aggregate_uses_the_objective_mask_and_counts():
    b = PolicyBatch(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([2.0]),
                    torch.tensor([[1.0, 1.0, 0.0]]))
    obj = policy_objective(b, "ppo_clip")  # values -2 on the 2 valid tokens
    assert float(obj.aggregate("token_mean")) == -2.0
    assert float(obj.aggregate("token_mean", num_tokens=4)) == -1.0  # -4 / 4 (a global count)
    assert float(obj.aggregate("token_sum")) == -4.0


@pytest.mark.parametrize("kw, err, message", [
    ({"is_level": "batch"}, ValueError, "is_level='batch'; valid choices: none, token, sequence, geometric"),
    ({"is_mode": "clip"}, ValueError, "is_mode='clip'; valid choices: truncate, mask"),
    ({"token_select": "top"}, ValueError, "token_select='top'; valid choices: none, entropy_top"),
    ({"token_weights": "gtpo"}, ValueError, "token_weights='gtpo'; valid choices: none, steer"),
    ({"adaptive_clip": "echo"}, ValueError, "adaptive_clip='echo'; valid choices: none, bapo"),
    ({"token_select": "entropy_top"}, ValueError, "need the per-token entropy"),
    ({"eps": 0.1}, TypeError, "unknown keyword argument"),
])
def test_bad_options_name_the_valid_ones(kw, err, message):
    b = PolicyBatch(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2))
    with pytest.raises(err, match=message):
        policy_objective(b, "ppo_clip", **kw)


def test_bad_loss_combinations():
    b = PolicyBatch(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2))
    with pytest.raises(ValueError, match="loss='kl' is not a policy loss; valid choices: pg, ppo_clip"):
        policy_objective(b, "kl")
    with pytest.raises(ValueError, match="adaptive_clip='bapo' sets eps_low and eps_high; loss 'pg'"):
        policy_objective(b, "pg", adaptive_clip="bapo")
    with pytest.raises(ValueError, match="either weights= or is_level='token'"):
        policy_objective(b, "pg", is_level="token", weights=torch.ones(1, 2))


def test_masked_is_can_take_rejected_tokens_out_of_the_denominator():
    # 5 tokens of one sequence, pg with adv 1; log rho = [0, 0, 2, 2, 2]: MIS at hi=2 rejects the last 3 (e^2 > 2).
    # pg's value is -A w logp, so its gradient per token is -w / denominator: "all" divides the two kept tokens'
    # -1 by 5 (-0.2 each), "kept" by 2 (-0.5 each); rejected tokens get 0 either way.
    behav = torch.tensor([[0.0, 0.0, -2.0, -2.0, -2.0]])
    grads = {}
    for den in ("all", "kept"):
        logp = torch.zeros(1, 5, requires_grad=True)
        batch = PolicyBatch(logp, logp.detach(), behav, torch.ones(1), torch.ones(1, 5))
        out = policy_objective(batch, "pg", is_level="token", is_mode="mask", is_max=2.0, is_denominator=den)
        out.aggregate("token_mean").backward()
        grads[den] = logp.grad[0].tolist()
    assert grads["all"] == pytest.approx([-0.2, -0.2, 0, 0, 0])
    assert grads["kept"] == pytest.approx([-0.5, -0.5, 0, 0, 0])
    assert out.mask.tolist() == [[1, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="is_denominator"):
        policy_objective(batch, "pg", is_level="token", is_denominator="some")
