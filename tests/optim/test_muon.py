"""Muon: Newton-Schulz by hand, routing, and parity with KellerJordan/Muon's formulas (bit for bit),
torch.optim.Muon and pytorch-optimizer's Muon (bit for bit, convention="torch")."""

import math

import pytest
import torch

from poise.optim.muon import NS_COEFFICIENTS, Muon, newton_schulz

SHAPES = [(24, 16), (16,), (8, 24), (16, 16), (8, 4, 3, 3), (5,)]


# ---- the references' formulas, written out (KellerJordan/Muon muon.py at 00ba60d) --------------------------------

def kj_newton_schulz(G, steps):
    a, b, c = NS_COEFFICIENTS
    X = G.bfloat16()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


def kj_step(params, state, lr, adam_lr, wd, mu=0.95, betas=(0.9, 0.95), eps=1e-10):
    """SingleDeviceMuonWithAuxAdam.step: Muon for matrices, its adam_update for the rest."""
    for p in params:
        st = state.setdefault(p, {})
        if p.dim() >= 2:
            buf = st.setdefault("buf", torch.zeros_like(p))
            g = p.grad
            buf.lerp_(g, 1 - mu)
            u = g.lerp_(buf, mu)
            if u.ndim == 4:
                u = u.view(len(u), -1)
            u = kj_newton_schulz(u, 5)
            u *= max(1, u.size(-2) / u.size(-1)) ** 0.5  # (the reference reads grad.size: equal for 2-D)
            p.mul_(1 - lr * wd)
            p.add_(u.reshape(p.shape), alpha=-lr)
        else:
            m1 = st.setdefault("m", torch.zeros_like(p))
            m2 = st.setdefault("v", torch.zeros_like(p))
            st["t"] = st.get("t", 0) + 1
            m1.lerp_(p.grad, 1 - betas[0])
            m2.lerp_(p.grad.square(), 1 - betas[1])
            upd = (m1 / (1 - betas[0] ** st["t"])) / ((m2 / (1 - betas[1] ** st["t"])).sqrt() + eps)
            p.mul_(1 - adam_lr * wd)
            p.add_(upd, alpha=-adam_lr)


def grads_stream(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * (1 + 0.1 * t) for s in shapes] for t in range(steps)]


def fresh(shapes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


# ---- Newton-Schulz by hand -----------------------------------------------------------------------------------------

def test_newton_schulz_on_a_multiple_of_the_identity_is_the_scalar_quintic():
    # G = 3 I (4 x 4): ||G||_F = 6, so X_0 = I/2 and every step maps the diagonal x -> a x + b x^3 + c x^5
    a, b, c = NS_COEFFICIENTS
    x = 3.0 / (6.0 + 1e-7)
    for _ in range(5):
        x = a * x + b * x**3 + c * x**5
    out = newton_schulz(3 * torch.eye(4, dtype=torch.float64), dtype=torch.float64)
    torch.testing.assert_close(out, x * torch.eye(4, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert 0.7 < x < 1.2  # near 1: "orthogonal" up to the quintic's band


def test_newton_schulz_flattens_the_spectrum_and_keeps_the_singular_vectors():
    torch.manual_seed(0)
    G = torch.randn(32, 12, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    O = newton_schulz(G, dtype=torch.float64)
    s = torch.linalg.svdvals(O)
    assert s.min() > 0.6 and s.max() < 1.25, s  # from S.max()/S.min() ~ 3 down to ~1
    # same singular vectors: U^T O V is diagonal
    D = U.T @ O @ Vh.T
    assert (D - torch.diag(torch.diagonal(D))).abs().max() < 1e-10
    # the two conventions differ only in where eps enters the normalisation (+1e-7 vs max(., 1e-7))
    torch.testing.assert_close(newton_schulz(G, dtype=torch.float64, convention="torch"), O, rtol=1e-5, atol=1e-8)


# ---- parity -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_keller_convention_replays_kellerjordan_bit_for_bit(wd):
    shapes = SHAPES
    init = fresh(shapes)
    mine = [torch.nn.Parameter(x.clone()) for x in init]
    ref = [x.clone() for x in init]
    opt = Muon(mine, lr=0.02, adam_lr=3e-4, weight_decay=wd)
    state: dict = {}
    for gs in grads_stream(shapes, 12):
        for p, q, g in zip(mine, ref, gs, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        kj_step(ref, state, 0.02, 3e-4, wd)
        for p, q in zip(mine, ref, strict=True):
            if p.dim() >= 2:  # Muon matrices: the same operations in the same order
                assert torch.equal(p.detach(), q), tuple(p.shape)
            else:  # AdamW: torch's fused kernel vs the reference's lerp form, float32 rounding
                torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7)
    # the Nesterov blend overwrites p.grad, as the reference's grad.lerp_
    assert torch.equal(mine[0].grad, ref[0].grad)


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_torch_convention_equals_torch_optim_muon_bit_for_bit(adjust, nesterov):
    shapes = [(24, 16), (8, 24), (16, 16)]
    init = fresh(shapes)
    mine = [torch.nn.Parameter(x.clone()) for x in init]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    a = Muon(mine, lr=1e-2, weight_decay=0.1, nesterov=nesterov, adjust_lr=adjust, convention="torch")
    b = torch.optim.Muon(ref, lr=1e-2, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust)
    for gs in grads_stream(shapes, 12):
        for p, q, g in zip(mine, ref, gs, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for p, q in zip(mine, ref, strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize("convention", ["keller", "torch"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_fused_equals_chain(convention, wd):
    init = fresh(SHAPES)
    pa = [torch.nn.Parameter(x.clone()) for x in init]
    pb = [torch.nn.Parameter(x.clone()) for x in init]
    oa = Muon(pa, lr=0.02, weight_decay=wd, convention=convention, fused=True)
    ob = Muon(pb, lr=0.02, weight_decay=wd, convention=convention, fused=False)
    worst = 0.0
    for gs in grads_stream(SHAPES, 12):
        for p, q, g in zip(pa, pb, gs, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        errs = [float((p.data - q.data).abs().max() / q.data.abs().max()) for p, q in zip(pa, pb, strict=True)]
        worst = max(worst, *errs)
    assert worst <= 1e-6
    assert set(oa.state_dict()["state"][0]) == set(ob.state_dict()["state"][0])


def test_pytorch_optimizer_muon_equals_the_torch_convention():
    # pytorch-optimizer 4.1's Muon runs torch's form of the iteration (addmm, max(||X||, eps)) and folds
    # the shape scale into the lr: bit for bit convention="torch" on matrices; its AdamW is the lerp form
    po = pytest.importorskip("pytorch_optimizer")
    shapes = [(24, 16), (8, 24), (16, 16), (16,)]
    init = fresh(shapes)
    mine = [torch.nn.Parameter(x.clone()) for x in init]
    keller = [torch.nn.Parameter(x.clone()) for x in init]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    a = Muon(mine, lr=0.02, adam_lr=3e-4, convention="torch")
    k = Muon(keller, lr=0.02, adam_lr=3e-4)
    b = po.Muon([{"params": ref[:3], "use_muon": True}, {"params": ref[3:], "use_muon": False}], lr=0.02,
                adamw_lr=3e-4, foreach=False)
    apart = 0.0
    for gs in grads_stream(shapes, 12):
        for p, q, r, g in zip(mine, keller, ref, gs, strict=True):
            p.grad, q.grad, r.grad = g.clone(), g.clone(), g.clone()
        a.step()
        k.step()
        b.step()
        for p, q, r, x in zip(mine, keller, ref, init, strict=True):
            if p.dim() >= 2:
                assert torch.equal(p, r)
                # the two conventions: same polynomial, different bfloat16 rounding (measured 4-6% of a step)
                apart = max(apart, float(((q - r).abs().max() / (r - x).abs().max()).detach()))
            else:
                torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
    assert 1e-3 < apart < 0.1, apart


# ---- routing and refusals -------------------------------------------------------------------------------------------

def test_routing_is_automatic_and_overridable():
    torch.manual_seed(0)
    emb, w, b = (torch.nn.Parameter(torch.randn(10, 4)), torch.nn.Parameter(torch.randn(4, 4)),
                 torch.nn.Parameter(torch.randn(4)))
    opt = Muon([w, b], lr=0.02, adam_lr=3e-4)
    assert [(g["use_muon"], g["lr"], len(g["params"])) for g in opt.param_groups] == [(True, 0.02, 1),
                                                                                       (False, 3e-4, 1)]
    opt.add_param_group({"params": [emb], "use_muon": False})  # an embedding goes to AdamW when asked
    assert opt.param_groups[-1]["lr"] == 3e-4 and opt.param_groups[-1]["use_muon"] is False
    for p in (emb, w, b):
        p.grad = torch.ones_like(p)
    opt.step()
    assert set(opt.state[emb]) == {"step", "clock", "adam.exp_avg", "adam.exp_avg_sq"}
    assert set(opt.state[w]) == {"step", "clock", "muon.momentum_buffer"}
    with pytest.raises(ValueError, match=r"param_groups\[3\]\.params\[0\] has shape \(4,\): a use_muon=True group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4))], "use_muon": True})
    assert len(opt.param_groups) == 3
    # adam_lr=None: one lr for both kinds (e.g. with adjust_lr="match_rms_adamw")
    assert {g["lr"] for g in Muon([w, b], lr=0.01).param_groups} == {0.01}


@pytest.mark.parametrize("bad,match", [
    (dict(momentum=1.0), r"momentum=1\.0 is out of range; valid: \[0\.0, 1\.0\)"),
    (dict(ns_steps=0), "ns_steps=0 must be an integer >= 1"),
    (dict(convention="jordan"), "convention='jordan'; valid choices: keller, torch"),
    (dict(adjust_lr="rms"), "adjust_lr='rms'; valid choices: original, match_rms_adamw"),
    (dict(ns_coefficients=(1.0, 2.0)), r"ns_coefficients=\(1\.0, 2\.0\) must be three numbers"),
    (dict(adam_lr=-1.0), r"adam_lr=-1\.0 is out of range"),
    (dict(ns_dtype=torch.int8), "ns_dtype=torch.int8; valid choices"),
])
def test_bad_arguments_name_the_value(bad, match):
    with pytest.raises(ValueError, match=match):
        Muon([torch.nn.Parameter(torch.zeros(3, 3))], **bad)


def test_learns_a_least_squares_problem():
    torch.manual_seed(0)
    X = torch.randn(256, 16) @ torch.diag(torch.logspace(0, -2, 16))
    W_true = torch.randn(16, 8)
    Y = X @ W_true

    def run(make):
        w = torch.nn.Parameter(torch.zeros(16, 8))
        opt = make([w])
        for _ in range(100):
            opt.zero_grad()
            ((X @ w - Y) ** 2).mean().backward()
            opt.step()
        return float(((X @ w - Y) ** 2).mean())

    start = float((Y**2).mean())
    muon = run(lambda ps: Muon(ps, lr=0.05))
    assert math.isfinite(muon) and muon < 0.05 * start, (start, muon)  # measured 0.036 from 1.90


def test_route_without_the_flag_goes_by_ndim():
    # functional use (no Muon class to split the groups): a group without use_muon routes per tensor
    from poise.optim.muon import muon_by_group, scale_by_muon
    from poise.transforms import apply_updates, chain, scale_by_adam, scale_by_learning_rate

    t = muon_by_group(chain(scale_by_muon(), scale_by_learning_rate(), name="muon"),
                      chain(scale_by_adam("torch"), scale_by_learning_rate(), name="adamw"))
    w, b = torch.zeros(4, 3), torch.zeros(3)
    states = apply_updates(t, [w, b], [torch.ones(4, 3), torch.ones(3)], None, {"lr": 0.1})
    assert set(states[0]) == {"step", "clock", "muon.momentum_buffer"}
    assert set(states[1]) == {"step", "clock", "adam.exp_avg", "adam.exp_avg_sq"}
    # Adam's first step moves each entry by lr (m/bc1 = 1, sqrt(v/bc2) = 1); Muon's, on the rank-1 gradient
    # ones(4, 3) = 2 sqrt(3) u v^T, is -lr s sigma u v^T: every entry equal, sigma in [0.7, 1.2] after the
    # quintic, s = sqrt(4/3), u v^T entries 1/(2 sqrt 3)
    torch.testing.assert_close(b, torch.full((3,), -0.1))
    entry = -0.1 * math.sqrt(4 / 3) / (2 * math.sqrt(3))
    assert torch.allclose(w, w[0, 0].expand_as(w), rtol=0.02) and 1.25 * entry < float(w[0, 0]) < 0.65 * entry


@pytest.mark.parametrize("convention", ["keller", "torch"])
def test_a_batch_of_matrices_is_orthogonalised_bit_for_bit_as_one_by_one(convention):
    g = torch.Generator().manual_seed(0)
    for shape in [(24, 16), (16, 40), (12, 12)]:
        Gs = [torch.randn(shape, generator=g) for _ in range(3)]
        batch = newton_schulz(torch.stack(Gs), convention=convention)
        for j, G in enumerate(Gs):
            assert torch.equal(batch[j], newton_schulz(G, convention=convention)), (shape, j)


def test_same_shaped_matrices_step_as_they_would_alone():
    # three (16, 8) matrices go through Newton-Schulz as one batch; each must move as if it were alone
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(16, 8, generator=g) for _ in range(3)] + [torch.randn(8, 16, generator=g)]
    grads = [[torch.randn(16, 8, generator=g) for _ in range(3)] + [torch.randn(8, 16, generator=g)]
             for _ in range(4)]
    together = [torch.nn.Parameter(t.clone()) for t in init]
    alone = [[torch.nn.Parameter(t.clone())] for t in init]
    opt = Muon(together, lr=0.02)
    opts = [Muon(ps, lr=0.02) for ps in alone]
    for gs in grads:
        for p, gr in zip(together, gs, strict=True):
            p.grad = gr.clone()
        opt.step()
        for o, ps, gr in zip(opts, alone, gs, strict=True):
            ps[0].grad = gr.clone()
            o.step()
    for p, ps in zip(together, alone, strict=True):
        assert torch.equal(p.detach(), ps[0].detach())
