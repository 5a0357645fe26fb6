import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from poise.optim.sso import SSO, sso_step, sso_surrogate


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g)


def _rl_loss(actions, adv):
    # a policy-gradient objective over logits: -mean(A * log pi(a | s))
    return lambda logits: -(adv * F.log_softmax(logits, -1).gather(1, actions[:, None]).squeeze(1)).mean()


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("task", ["classification", "rl"])
def test_one_inner_step_is_exactly_a_plain_step(opt_name, task):
    x, y = _data()
    adv = torch.randn(32, generator=torch.Generator().manual_seed(2))
    h = (lambda logits: F.cross_entropy(logits, y)) if task == "classification" else _rl_loss(y, adv)
    a, b = _model(), _model()
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            "adam": lambda p: torch.optim.Adam(p, lr=0.01)}[opt_name]
    oa, ob = make(a.parameters()), make(b.parameters())
    for _ in range(3):
        oa.zero_grad()
        h(a(x)).backward()
        oa.step()
        sso_step(b, x, h, ob, eta=0.7, inner_steps=1)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_surrogate_by_hand():
    # f - z = [1, 2], grad h = [0.5, -1], eta = 2: <g, d> = 0.5 - 2 = -1.5; ||d||^2 / (2 eta) = 5 / 4 -> -0.25
    # d/df = g + (f - z) / eta = [0.5 + 0.5, -1 + 1] = [1, 0]
    z, g = torch.tensor([3.0, -1.0]), torch.tensor([0.5, -1.0])
    f = (z + torch.tensor([1.0, 2.0])).requires_grad_(True)
    s = sso_surrogate(f, z, g, 2.0)
    s.backward()
    assert torch.isclose(s, torch.tensor(-0.25)) and torch.equal(f.grad, torch.tensor([1.0, 0.0]))
    # the same, as a regression onto z - eta g (up to the constant eta ||g||^2 / 2 = 1.25)
    target = z - 2.0 * g
    assert torch.isclose(s, ((f - target) ** 2).sum() / 4 - 1.25)


def test_many_inner_steps_regress_the_targets_onto_z_minus_eta_grad():
    # f(theta) = X theta with more features than rows: any target is reachable, so m SGD steps on the
    # surrogate land f on z_t - eta grad h(z_t) (SSO = projected SGD in target space)
    torch.manual_seed(0)
    lin = nn.Linear(40, 3, bias=False)
    x, y = torch.randn(8, 40), torch.randint(0, 3, (8,))
    z = lin(x).detach()
    zz = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(zz, y), zz)
    m = sso_step(lin, x, lambda lo: F.cross_entropy(lo, y), torch.optim.SGD(lin.parameters(), lr=0.05), eta=3.0,
                 inner_steps=400)
    assert torch.allclose(lin(x), z - 3.0 * g, atol=1e-4)
    assert m["surrogate_last"] < m["surrogate_first"]


def test_class_counts_and_more_inner_steps_lower_the_loss_per_gradient():
    x, y = _data()
    h = lambda logits: F.cross_entropy(logits, y)  # noqa: E731
    losses = {}
    for m in (1, 5):
        model = _model()
        # h is a batch mean, so grad h carries 1/32: eta = 32 is a per-example target step of 1
        sso = SSO(model, torch.optim.SGD(model.parameters(), lr=0.1), eta=32.0, inner_steps=m, loss_of_logits=h)
        for _ in range(10):
            sso.step(x)
        losses[m] = float(h(model(x)).detach())
        assert sso.target_grad_evals == 10 and sso.inner_backwards == 10 * m
    assert losses[5] < losses[1]  # same 10 expensive gradients, lower loss
    state = sso.state_dict()
    again = SSO(copy.deepcopy(model), torch.optim.SGD(model.parameters(), lr=0.1), eta=2.0, inner_steps=1)
    again.load_state_dict(state)
    assert again.inner_steps == 5 and again.target_grad_evals == 10


def test_bad_input_names_the_value():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    with pytest.raises(ValueError, match=r"inner_steps=0 is out of range; valid: an integer >= 1"):
        sso_step(model, x, lambda lo: lo.sum(), opt, eta=1.0, inner_steps=0)
    with pytest.raises(ValueError, match=r"eta=0.0 is out of range; valid: \(0, inf\)"):
        SSO(model, opt, eta=0.0, inner_steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"must return a scalar; got shape \(32,\)"):
        sso_step(model, x, lambda lo: lo.sum(1), opt, eta=1.0, inner_steps=2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
