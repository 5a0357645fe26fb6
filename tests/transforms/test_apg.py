import pytest
import torch
from torch import nn

from poise.optim import TransformOptimizer
from poise.transforms import apply_updates, chain, scale_by_learning_rate
from poise.transforms._apg import MomentumBuffer, apg_guidance, apg_project, scale_by_apg


def _algorithm1(cond, uncond, w, eta, r, beta, prev):
    """The paper's Algorithm 1 (arXiv 2410.02416) spelled out per sample with explicit sums."""
    out, running = [], []
    for i in range(cond.shape[0]):
        c, d = cond[i].double().reshape(-1), (cond[i].double() - uncond[i].double()).reshape(-1)
        if beta is not None:
            d = d + beta * (0.0 if prev is None else prev[i].reshape(-1))
            running.append(d.reshape(cond.shape[1:]))
        if r > 0:
            d = d * min(1.0, r / float(torch.sqrt((d * d).sum())))
        par = float((d * c).sum()) / float((c * c).sum()) * c
        out.append((c + (w - 1) * ((d - par) + eta * par)).reshape(cond.shape[1:]))
    return torch.stack(out).to(cond.dtype), (torch.stack(running) if running else None)


def test_guidance_by_hand():
    # cond = [3, 4], uncond = [3, 2]: d = [0, 2]; <d,c> = 8, <c,c> = 25 -> d_par = 0.32 [3, 4] = [0.96, 1.28],
    # d_perp = [-0.96, 0.72]. eta = 0, w = 3: [3, 4] + 2 [-0.96, 0.72] = [1.08, 5.44]
    c, u = torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 2.0]])
    assert torch.allclose(apg_guidance(c, u, 3.0), torch.tensor([[1.08, 5.44]]))
    # r = 1: ||d|| = 2 -> d = [0, 1], d_perp = [-0.48, 0.36] -> [3 - 0.96, 4 + 0.72]
    assert torch.allclose(apg_guidance(c, u, 3.0, r=1.0), torch.tensor([[2.04, 4.72]]))
    # eta = 1, r = 0, no momentum: plain CFG u + w (c - u) = [3, 2] + 3 [0, 2] = [3, 8]
    assert torch.allclose(apg_guidance(c, u, 3.0, eta=1.0), torch.tensor([[3.0, 8.0]]))
    # momentum beta = -0.5: step 1 running = [0, 2]; step 2 with d = [2, 0]: running = [2, 0] - 0.5 [0, 2] = [2, -1]
    buf = MomentumBuffer(-0.5)
    apg_guidance(c, u, 3.0, momentum_buffer=buf)
    apg_guidance(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 4.0]]), 3.0, momentum_buffer=buf)
    assert torch.equal(buf.running, torch.tensor([[2.0, -1.0]], dtype=torch.float64))


def test_guidance_matches_algorithm1_over_a_trajectory():
    g = torch.Generator().manual_seed(0)
    buf, prev = MomentumBuffer(-0.75), None
    for _ in range(4):
        c, u = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
        got = apg_guidance(c, u, 7.5, eta=0.3, r=2.5, momentum_buffer=buf)
        want, prev = _algorithm1(c, u, 7.5, 0.3, 2.5, -0.75, prev)
        assert torch.allclose(got, want, atol=1e-6)
        assert torch.allclose(buf.running, prev.double(), atol=1e-12)


def test_guidance_eta0_leaves_no_parallel_component():
    torch.manual_seed(0)
    c, u = torch.randn(5, 8), torch.randn(5, 8)
    out = apg_guidance(c, u, 10.0, eta=0.0)
    assert ((out - c) * c).sum(1).abs().max() < 1e-4  # guidance moved each sample orthogonally to D_c


class TinyDenoiser(nn.Module):
    """x -> prediction, conditioned on a class (index n_classes = the null class for CFG)."""

    def __init__(self, dim: int = 6, n_classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(n_classes + 1, 16)
        self.net = nn.Sequential(nn.Linear(dim + 16, 32), nn.Tanh(), nn.Linear(32, dim))
        self.null = n_classes

    def forward(self, x, y):
        return self.net(torch.cat([x, self.emb(y)], -1))


def _sample(model, y, guide, steps=10, scale=8.0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(y), 6, generator=g)
    with torch.no_grad():
        for _ in range(steps):
            cond, uncond = model(x, y), model(x, torch.full_like(y, model.null))
            x = x + 0.3 * (guide(cond, uncond, scale) - x)  # a few Euler-like steps toward the guided prediction
    return x


def test_guidance_on_a_tiny_conditional_model():
    torch.manual_seed(0)
    model = TinyDenoiser()
    y = torch.tensor([0, 1, 2, 0])
    cfg = _sample(model, y, lambda c, u, w: u + w * (c - u))
    same = _sample(model, y, lambda c, u, w: apg_guidance(c, u, w, eta=1.0))
    assert torch.allclose(cfg, same, atol=1e-5)  # eta = 1, r = 0, no momentum is CFG
    buf = MomentumBuffer(-0.5)
    apg = _sample(model, y, lambda c, u, w: apg_guidance(c, u, w, eta=0.0, r=1.0, momentum_buffer=buf))
    # high-scale CFG inflates the sample norm ("oversaturation"); APG keeps it smaller
    assert apg.norm(dim=1).mean() < cfg.norm(dim=1).mean()


def test_guidance_zero_norm_reference_raises():
    c = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match=r"cond prediction \(sample\) direction 1 has zero norm"):
        apg_guidance(c, torch.ones(2, 2), 3.0)
    with pytest.raises(ValueError, match=r"r=-1.0 is out of range"):
        apg_guidance(torch.ones(1, 2), torch.zeros(1, 2), 3.0, r=-1.0)
    with pytest.raises(ValueError, match=r"beta=1.5 is out of range; valid: \(-1, 1\)"):
        apg_guidance(torch.ones(1, 2), torch.zeros(1, 2), 3.0, momentum_buffer=MomentumBuffer(1.5))


def test_project_splits_exactly():
    d, v = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 2.0])
    par, out = apg_project(d, v, eta=0.5)
    assert torch.equal(par, torch.tensor([0.0, 0.0, 3.0]))
    assert torch.equal(out, torch.tensor([1.0, 2.0, 1.5]))


def test_transform_by_hand_under_sgd():
    # p = [3, 4], g = [0, 2], eta = 0: u = g_perp = [-0.96, 0.72]; lr = 0.5 -> p = [3.48, 3.64]
    p = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = TransformOptimizer([p], {"lr": 0.5}, chain(scale_by_apg(), scale_by_learning_rate()))
    p.grad = torch.tensor([0.0, 2.0])
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([3.48, 3.64]))
    assert torch.allclose(opt.state[p]["apg.parallel_frac"], torch.tensor(0.8))  # ||g_par|| / ||g|| = 1.6 / 2
    assert "apg.buf" not in opt.state[p]  # beta = 0: no momentum state


def test_transform_momentum_and_rescale_by_hand():
    # reference [1, 0] (fixed), beta = -0.5, r = 1, eta = 0.5
    # step 1: m = [2, 2]; ||m|| = 2.83 -> m r/||m|| = [0.7071, 0.7071]; par = [0.7071, 0], out = [0.3536, 0.7071]
    # step 2 (g = [0, 2]): m = [0, 2] - 0.5 [2, 2] = [-1, 1]; /1.4142 -> [-0.7071, 0.7071] -> [-0.3536, 0.7071]
    ref = torch.tensor([1.0, 0.0])
    t = chain(scale_by_apg(lambda p: ref))
    hyper = {"apg_beta": -0.5, "apg_r": 1.0, "apg_eta": 0.5}
    p = torch.zeros(2)
    states = apply_updates(t, [p], [torch.tensor([2.0, 2.0])], None, hyper)
    assert torch.allclose(p, torch.tensor([0.5, 1.0]) / 2 ** 0.5)
    apply_updates(t, [p], [torch.tensor([0.0, 2.0])], states, hyper)
    assert torch.allclose(p, torch.tensor([0.5, 1.0]) / 2 ** 0.5 + torch.tensor([-0.5, 1.0]) / 2 ** 0.5)
    assert torch.equal(states[0]["apg.buf"], torch.tensor([-1.0, 1.0]))


def test_transform_keeps_weight_norm_under_small_sgd_steps():
    # eta = 0 with the parameter as reference: each step is orthogonal to theta, so ||theta|| grows only
    # to second order (sqrt(||theta||^2 + ||step||^2)) while plain SGD on a norm-growing gradient inflates it
    torch.manual_seed(0)
    w0 = torch.randn(8, 8)
    norms = {}
    chains = {"apg": chain(scale_by_apg(), scale_by_learning_rate()), "sgd": chain(scale_by_learning_rate())}
    for name, t in chains.items():
        w = nn.Parameter(w0.clone())
        opt = TransformOptimizer([w], {"lr": 0.01}, t)
        for _ in range(20):
            w.grad = -w.detach() + 0.1 * torch.randn(8, 8)  # mostly "grow the weights"
            opt.step()
        norms[name] = float(w.detach().norm())
    assert norms["apg"] < w0.norm() * 1.01 < norms["sgd"]


def test_transform_identity_when_eta1_r0_beta0_and_none_reference_passes_through():
    g = torch.tensor([1.0, -2.0, 3.0])
    p = torch.tensor([1.0, 1.0, 1.0])
    apply_updates(chain(scale_by_apg()), [p], [g.clone()], None, {"apg_eta": 1.0})
    assert torch.allclose(p, torch.tensor([2.0, -1.0, 4.0]))
    q = torch.zeros(3)
    apply_updates(chain(scale_by_apg(lambda _: None)), [q], [g.clone()], None, {})
    assert torch.equal(q, g)


def test_transform_refuses_zero_reference_without_changing_state():
    w, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.zeros(2))
    opt = TransformOptimizer([w, b], {"lr": 0.1, "apg_beta": -0.5}, chain(scale_by_apg(), scale_by_learning_rate()))
    w.grad, b.grad = torch.ones(2, 2), torch.ones(2)
    with pytest.raises(ValueError, match=r"reference direction of tensor 1 \(shape \(2,\)\) has zero norm"):
        opt.step()
    assert "apg.buf" not in opt.state[w] and torch.equal(w.detach(), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"apg eta=nan is out of range"):
        apply_updates(chain(scale_by_apg()), [torch.ones(2)], [torch.ones(2)], None, {"apg_eta": float("nan")})
