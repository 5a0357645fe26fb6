import math

import pytest
import torch
from torch import nn

from poise.optim.eggroll import (
    EGGROLL,
    counter_seed,
    dense_noise,
    lowrank_factors,
    lowrank_forward,
    lowrank_grad,
    zscore_fitness,
)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def test_lowrank_grad_equals_the_authors_einsum_with_injected_factors():
    # identical factors into both: authors' _simple_lora_update is einsum('nir,njr->ij', z A, B) / N and their
    # gradient is -(that * sqrt(N)); poise's lowrank_grad(z, A, B, scale=sqrt(N)) must be the same number
    g = torch.Generator().manual_seed(0)
    N, m, n, r = 6, 4, 3, 2
    A, B, z = torch.randn(N, m, r, generator=g), torch.randn(N, n, r, generator=g), torch.randn(N, generator=g)
    authors = -(torch.einsum("nir,njr->ij", z[:, None, None] * A, B) / N) * math.sqrt(N)
    assert torch.allclose(lowrank_grad(z, A, B, math.sqrt(N)), authors, atol=1e-6)
    dense = -sum(z[i] * A[i] @ B[i].T for i in range(N)) / N  # materialised E_i, the formula itself
    assert torch.allclose(lowrank_grad(z, A, B, 1.0), dense, atol=1e-6)


def test_estimate_matches_reference_formula_on_a_model():
    model = _mlp()
    es = EGGROLL(model, sigma=0.1, rank=2, population=8, scale=math.sqrt(8))
    noise = es.noise()
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0, 5.0, 5.0, -1.0, 0.5])
    z = (rewards - rewards.mean()) / torch.sqrt(rewards.var(unbiased=False) + 1e-5)
    es.estimate(rewards)
    for name, mod in es.layers:
        A, B, e = noise[name]
        E = torch.stack([A[i] @ B[i].T for i in range(8)])  # each member's full perturbation, materialised here only
        want_w = -math.sqrt(8) * (z[:, None, None] * E).mean(0)
        want_b = -math.sqrt(8) * (z[:, None] * e).mean(0)
        assert torch.allclose(mod.weight.grad, want_w, atol=1e-6)
        assert torch.allclose(mod.bias.grad, want_b, atol=1e-6)
    assert es.step_count == 1


def test_factors_follow_the_authors_draw():
    # Z ~ N(0,1)^{(in+out) x r} from one generator; B = Z[:in], A = sigma/sqrt(r) Z[in:]
    a, b = lowrank_factors(3, 5, 4, seed=7, step=2, member=6, key="l.weight", sigma=0.5)
    gen = torch.Generator().manual_seed(counter_seed(7, 2, 3, "l.weight"))
    Z = torch.randn(8, 4, generator=gen)
    assert torch.equal(b, Z[:5]) and torch.allclose(a, Z[5:] * 0.5 / 2.0)


def test_antithetic_pairs_are_mirror_images():
    model = _mlp()
    es = EGGROLL(model, sigma=0.2, rank=3, population=6)
    for A, B, e in es.noise().values():
        for k in range(3):
            assert torch.equal(A[2 * k + 1], -A[2 * k]) and torch.equal(B[2 * k + 1], B[2 * k])
            assert torch.equal(e[2 * k + 1], -e[2 * k])
    a1, _ = lowrank_factors(3, 5, 1, seed=0, step=0, member=3, key="k", sigma=1.0)
    a0, _ = lowrank_factors(3, 5, 1, seed=0, step=0, member=2, key="k", sigma=1.0)
    assert torch.equal(a1, -a0)
    # equal rewards within each pair: the +E and -E terms cancel exactly
    es.estimate(torch.tensor([1.0, 1.0, 4.0, 4.0, 0.0, 0.0]))
    assert all(float(p.grad.abs().max()) < 1e-6 for p in model.parameters())
    # swapping the rewards inside every pair negates the estimate
    es2 = EGGROLL(_mlp(), sigma=0.2, rank=3, population=6)
    es3 = EGGROLL(_mlp(), sigma=0.2, rank=3, population=6)
    es2.estimate(torch.tensor([1.0, 2.0, 0.0, 5.0, 3.0, 1.0]))
    es3.estimate(torch.tensor([2.0, 1.0, 5.0, 0.0, 1.0, 3.0]))
    for p2, p3 in zip(es2.model.parameters(), es3.model.parameters(), strict=True):
        assert torch.allclose(p2.grad, -p3.grad, atol=1e-6) and p2.grad.abs().max() > 1e-3


def test_lowrank_forward_equals_dense_forward_with_W_plus_E():
    model = _mlp()
    es = EGGROLL(model, sigma=0.3, rank=2, population=4)
    x = torch.randn(2, 7, 5)  # (batch, tokens, features): Linear on the last dimension
    out = es.population_forward(x)
    assert out.shape == (4, 2, 7, 3)
    noise = es.noise()
    for i in range(4):
        dense = _mlp()
        with torch.no_grad():
            for (name, mod), (_, src) in zip(es.layers, [(n, m) for n, m in dense.named_modules()
                                                          if isinstance(m, nn.Linear)], strict=True):
                A, B, e = noise[name]
                src.weight.copy_(mod.weight + A[i] @ B[i].T)
                src.bias.copy_(mod.bias + e[i])
            assert torch.allclose(out[i], dense(x), atol=1e-5)
    # the pure function, one layer
    lin = nn.Linear(5, 3)
    A, B, e = torch.randn(4, 3, 2), torch.randn(4, 5, 2), torch.randn(4, 3)
    xs = torch.randn(4, 6, 5)
    with torch.no_grad():
        y = lowrank_forward(xs, lin.weight, lin.bias, A, B, e)
        for i in range(4):
            assert torch.allclose(y[i], xs[i] @ (lin.weight + A[i] @ B[i].T).T + lin.bias + e[i], atol=1e-5)


def test_noise_is_counter_based():
    n4 = EGGROLL(_mlp(), sigma=0.1, rank=2, population=4, seed=3).noise()
    n8 = EGGROLL(_mlp(), sigma=0.1, rank=2, population=8, seed=3).noise()
    for k in n4:  # a member's noise does not depend on how many members there are
        assert torch.equal(n4[k][0], n8[k][0][:4]) and torch.equal(n4[k][1], n8[k][1][:4])
    es = EGGROLL(_mlp(), sigma=0.1, rank=2, population=4, seed=3)
    first = es.noise()["0"][0].clone()
    es.estimate(torch.arange(4.0))
    assert not torch.equal(es.noise()["0"][0], first)  # a new step draws new noise
    assert not torch.equal(es.noise()["0"][1][0, :3], es.noise()["2"][1][0, :3])  # layers differ
    es.load_state_dict({"seed": 3, "step": 0})
    assert torch.equal(es.noise()["0"][0], first)
    assert counter_seed(0, 1, 2, "a") != counter_seed(0, 2, 1, "a")
    assert torch.equal(dense_noise((3,), seed=0, step=0, member=5, key="b", sigma=1.0),
                       -dense_noise((3,), seed=0, step=0, member=4, key="b", sigma=1.0))


def test_estimate_points_along_the_true_gradient():
    # reward = -MSE; with many members and small sigma the ES estimate (a loss gradient) aligns with autograd's
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    true = torch.cat([model.weight.grad.reshape(-1), model.bias.grad])
    es = EGGROLL(model, sigma=1e-3, rank=1, population=4000)
    out = es.population_forward(x)
    es.estimate(-((out - y) ** 2).mean(dim=(1, 2)))
    est = torch.cat([model.weight.grad.reshape(-1), model.bias.grad])
    assert torch.nn.functional.cosine_similarity(est, true, dim=0) > 0.9


def test_step_trains_with_any_torch_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    es = EGGROLL(model, sigma=0.05, rank=2, population=16)
    before = float(((model(x) - y) ** 2).mean().detach())
    for _ in range(80):
        m = es.step(opt, x, lambda out: -((out - y) ** 2).mean(dim=(1, 2)))
    after = float(((model(x) - y) ** 2).mean().detach())
    assert after < 0.3 * before and set(m) == {"reward_mean", "reward_std", "reward_max", "grad_norm"}
    # plain SGD consumes p.grad as written: theta <- theta - lr g
    w = model[0].weight.detach().clone()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    es.step(sgd, x, lambda out: -((out - y) ** 2).mean(dim=(1, 2)))
    assert torch.allclose(model[0].weight.detach(), w - 0.1 * model[0].weight.grad)


def test_zscore_fitness_matches_the_authors_shaping():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # mean 3, population var 3.5: z = (r - 3) / sqrt(3.5 + 1e-5)
    assert torch.allclose(zscore_fitness(r), (r - 3) / math.sqrt(3.50001))
    # groups of 2: means 1.5 and 4.5, global variance
    assert torch.allclose(zscore_fitness(r, 2), torch.tensor([-0.5, 0.5, -1.5, 1.5]) / math.sqrt(3.50001))


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"rank": 0}, r"rank=0 is out of range; valid: an integer >= 1"),
    ({"population": 1}, r"population=1 is out of range; valid: an integer >= 2"),
    ({"population": 5}, r"population=5 must be even with antithetic=True"),
    ({"sigma": 0.0}, r"sigma=0.0 is out of range"),
])
def test_bad_input_names_the_value(kwargs, msg):
    args = {"sigma": 0.1, "rank": 1, "population": 4} | kwargs
    with pytest.raises(ValueError, match=msg):
        EGGROLL(_mlp(), **args)


def test_bad_rewards_and_models_are_refused_without_writing():
    model = _mlp()
    es = EGGROLL(model, sigma=0.1, population=4, antithetic=False)
    EGGROLL(_mlp(), sigma=0.1, population=5, antithetic=False)  # odd is fine without pairs
    with pytest.raises(ValueError, match=r"rewards has shape \(3,\); valid: \(4,\)"):
        es.estimate(torch.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        es.estimate(torch.tensor([0.0, float("nan"), 1.0, 2.0]))
    assert all(p.grad is None for p in model.parameters()) and es.step_count == 0
    with pytest.raises(ValueError, match="has no nn.Linear"):
        EGGROLL(nn.Sequential(nn.ReLU()), sigma=0.1, population=4)
    with es.perturbed(), pytest.raises(ValueError, match="leading dimension 3, not a multiple of population=4"):
        model(torch.randn(3, 5))
