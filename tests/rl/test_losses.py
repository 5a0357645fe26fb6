import math

import pytest
import torch

from poise.rl import (
    aggregate,
    cispo_loss,
    decoupled_ppo_loss,
    get_loss,
    gspo_loss,
    kl_penalty,
    minirl_loss,
    names,
    pacs_loss,
    pg_loss,
    ppo_clip_loss,
    sapo_loss,
)

B, T = 4, 6


def _inputs(seed=0, same=False):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g) * 2).requires_grad_(True)
    old = logp.detach().clone() if same else logp.detach() + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return logp, old, adv, mask


def _grad(values, logp, mask):
    logp.grad = None
    aggregate(values, mask, "token_sum").backward()
    return logp.grad.clone()


ON_POLICY = {
    "ppo_clip": lambda lp, old, a, m: ppo_clip_loss(lp, old, a, m, eps_low=0.2, eps_high=0.28, dual_clip=3.0),
    "cispo": lambda lp, old, a, m: cispo_loss(lp, old, a, m),
    "sapo": lambda lp, old, a, m: sapo_loss(lp, old, a, m),
    "decoupled_ppo": lambda lp, old, a, m: decoupled_ppo_loss(lp, old, old, a, m),
    "minirl": lambda lp, old, a, m: minirl_loss(lp, old, old, a, m),
}


@pytest.mark.parametrize("name", sorted(ON_POLICY))
def test_every_clipped_surrogate_has_the_policy_gradient_at_ratio_one(name):
    logp, old, adv, mask = _inputs(same=True)
    want = _grad(pg_loss(logp, adv, mask).values, logp, mask)  # -A on valid tokens
    got = _grad(ON_POLICY[name](logp, old, adv, mask).values, logp, mask)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(want, -adv[:, None] * mask)


def test_gspo_at_ratio_one_is_sequence_mean_policy_gradient():
    logp, old, adv, mask = _inputs(same=True)
    out = gspo_loss(logp, old, adv, mask)
    logp.grad = None
    aggregate(out.values, mask, "seq_mean_token_mean").backward()
    want = -adv[:, None] * mask / mask.sum(-1, keepdim=True) / B
    torch.testing.assert_close(logp.grad, want)


def test_ppo_clipped_regions_have_zero_gradient_and_dual_clip_by_hand():
    # token 0: A>0, r = e^0.5 = 1.65 > 1.28 -> clipped high, value -A*1.28, zero grad
    # token 1: A<0, r = e^-0.5 = 0.61 < 0.8 -> clipped low, value -A*0.8, zero grad
    # token 2: A<0, r = e^2 = 7.39 > c=3 -> dual clip, value -A*3 = 3, zero grad
    # token 3: A>0, r = 1.1 inside -> value -A*r, grad -A*r
    logp = torch.tensor([[0.5, -0.5, 2.0, math.log(1.1)]], requires_grad=True)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    mask = torch.ones(1, 4)
    out = ppo_clip_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    torch.testing.assert_close(out.values, torch.tensor([[-1.28, 0.8, 3.0, -1.1]]))
    out.values.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0, -1.1]]))
    assert float(out.metrics["clip_frac/high"]) == 0.25 and float(out.metrics["clip_frac/low"]) == 0.25
    assert float(out.metrics["clip_frac/dual"]) == 0.25
    with pytest.raises(ValueError, match="dual_clip=0.5 must be > 1"):
        ppo_clip_loss(logp, old, adv, mask, dual_clip=0.5)


def test_masked_tokens_get_exactly_zero_gradient():
    logp, old, adv, mask = _inputs()
    for name in ("ppo_clip", "cispo", "sapo", "gspo"):
        g = _grad(get_loss(name)(logp, old, adv, mask).values, logp, mask)
        assert (g[mask == 0] == 0).all(), name
    g = _grad(minirl_loss(logp, old, old + 0.1, adv, mask).values, logp, mask)
    assert (g[mask == 0] == 0).all()


def test_cispo_bound_conventions():
    logp = torch.tensor([[math.log(3.0), math.log(0.5)]], requires_grad=True)
    old, adv, mask = torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2)
    two = cispo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    torch.testing.assert_close(two.values, -torch.tensor([[1.2, 0.8]]) * logp.detach())
    cap = cispo_loss(logp, old, adv, mask, eps_high=2.0, bounds="upper_abs")  # TRL: min(r, 2)
    torch.testing.assert_close(cap.values, -torch.tensor([[2.0, 0.5]]) * logp.detach())
    with pytest.raises(ValueError, match="bounds='x'; valid choices: two_sided, upper_abs"):
        cispo_loss(logp, old, adv, mask, bounds="x")


def test_minirl_masks_only_the_ppo_regions_and_weights_by_rho_r():
    # A>0 with r = 1.5 > 1.28: masked; A>0 with r = 0.5: kept with weight rho*r
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    old = torch.zeros(1, 2)
    behav = torch.tensor([[0.0, -math.log(2.0)]])  # rho = [1, 2]
    out = minirl_loss(logp, old, behav, torch.tensor([1.0]), torch.ones(1, 2))
    out.values.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -2.0 * 0.5]]))


def test_kl_estimators_by_hand_and_gradcheck():
    d = torch.tensor([[0.3, -0.2]])
    ref = torch.zeros(1, 2)
    m = torch.ones(1, 2)
    torch.testing.assert_close(kl_penalty(d, ref, m, kind="k1").values, d)
    torch.testing.assert_close(kl_penalty(d, ref, m, kind="k2").values, d * d / 2)
    torch.testing.assert_close(kl_penalty(d, ref, m, kind="k3").values, torch.exp(-d) + d - 1)
    for kind in ("k1", "k2", "k3"):
        x = torch.randn(2, 3, requires_grad=True)
        assert torch.autograd.gradcheck(lambda v, k=kind: kl_penalty(v, torch.zeros(2, 3), torch.ones(2, 3),
                                                                   kind=k).values, (x,))


@pytest.mark.parametrize("fn", [
    lambda lp, old, a, m: sapo_loss(lp, old, a, m).values,
    # GSPO's per-token form is exact only after sequence-mean aggregation (its value on each
    # token is the sequence ratio): check the aggregated loss; eps large, so never clipped
    lambda lp, old, a, m: aggregate(gspo_loss(lp, old, a, m, eps_low=10.0, eps_high=10.0).values, m,
                                    "seq_mean_token_mean"),
    lambda lp, old, a, m: pacs_loss(lp, old, (a > 0).double(), torch.tensor([0, 0, 1, 1]), m).values,
])
def test_gradcheck_smooth_losses(fn):
    logp, old, adv, mask = _inputs()
    x = logp.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: fn(v, old, adv, mask), (x,))


def test_pacs_gradient_is_a_policy_gradient_with_an_implicit_critic():
    # d loss / d psi_hat = sigmoid(psi_hat) - r: at psi = 0 the per-sequence weight is 0.5 - r
    logp, old, _, mask = _inputs(same=True)
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    out = pacs_loss(logp, old, r, torch.tensor([0, 0, 1, 1]), mask, balanced=False)
    assert torch.allclose(out.metrics["bce"], torch.tensor(math.log(2.0)))


def test_registry_names_and_unknown_loss():
    assert {"pg", "ppo_clip", "gspo", "cispo", "decoupled_ppo", "minirl", "sapo", "kl", "pacs"} <= set(names())
    with pytest.raises(KeyError, match="unknown loss 'grpo_plus'; valid choices: cispo"):
        get_loss("grpo_plus")
