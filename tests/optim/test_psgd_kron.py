"""PSGD-Kron: the factor algebra by hand and against dense Kronecker products, the preconditioner fit
(whitening), the update schedule, bad input, and parity with pytorch_optimizer.Kron (4.1.0)."""

import math
import re

import pytest
import torch

from poise.optim import PSGDKron
from poise.optim.psgd_kron import (
    TINY,
    _Schedule,
    balance_factors,
    kron_factors,
    norm_lower_bound,
    precondition,
    update_factors,
    update_schedule,
)

SHAPES = [(12, 8), (8,), (4, 3, 5), (4, 3, 3, 3), (), (1, 5), (20, 6)]  # matrix, vector, conv1d, conv2d, scalar


def dense(Q):
    """kron(Q_1, ..., Q_d) as a dense matrix (a vector factor is its diagonal)."""
    out = torch.ones(1, 1, dtype=Q[0].dtype)
    for q in Q:
        out = torch.kron(out, q if q.dim() == 2 else torch.diag(q))
    return out


def rand_triu(n, g, dtype=torch.float64):
    return torch.triu(torch.randn(n, n, generator=g, dtype=dtype)) + 2 * torch.eye(n, dtype=dtype)


# ---- factors ------------------------------------------------------------------------------------------------------

def test_kron_factors_choose_triangular_or_diagonal_per_dim():
    kinds = lambda qs: ["tri" if q.dim() == 2 else "diag" for q in qs]  # noqa: E731
    assert kinds(kron_factors((6, 4))) == ["tri", "tri"]
    assert kinds(kron_factors((8,))) == ["diag"]  # 1 dim < min_ndim 2
    assert kinds(kron_factors((1, 5))) == ["diag", "tri"]  # a dim of size 1
    assert kinds(kron_factors((6, 4), max_size=5)) == ["diag", "tri"]  # 6 > max_size
    assert kinds(kron_factors((4, 6), memory_save_mode="one_diag")) == ["tri", "diag"]  # the largest
    assert kinds(kron_factors((6, 6), memory_save_mode="one_diag")) == ["tri", "diag"]  # a tie: the last
    assert kinds(kron_factors((6, 6), memory_save_mode="smart_one_diag")) == ["tri", "tri"]  # no strict largest
    assert kinds(kron_factors((4, 6, 3), memory_save_mode="smart_one_diag")) == ["tri", "diag", "tri"]
    assert kinds(kron_factors((4, 6), memory_save_mode="all_diag")) == ["diag", "diag"]
    # init scale 8 over 3 dims: each factor 8^(1/3) = 2 times the identity
    qs = kron_factors((2, 3, 4), init_scale=8.0)
    torch.testing.assert_close(dense(qs), 8.0 * torch.eye(24))
    assert kron_factors(())[0].shape == ()
    with pytest.raises(ValueError, match="memory_save_mode='some_diag'; valid choices: None, 'one_diag'"):
        kron_factors((2, 2), memory_save_mode="some_diag")


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4), (3, 1, 2, 2), (6,)])
def test_precondition_is_the_dense_kronecker_product(shape):
    g = torch.Generator().manual_seed(0)
    Q = [rand_triu(n, g) if len(shape) > 1 and n > 1 else torch.rand(n, generator=g, dtype=torch.float64) + 0.5
         for n in shape]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    K = dense(Q)
    torch.testing.assert_close(precondition(Q, x).flatten(), K.T @ K @ x.flatten(), rtol=1e-12, atol=1e-12)


def test_scalar_fit_by_hand():
    # q = 1, h = 2, v = 1: A = q h = 2, B = v / q = 1; T1 = 4, T2 = 1
    # q <- q - 0.1 (T1 - T2) q / (|T1 + T2| + tiny) = 1 - 0.1 * 3 / 5 = 0.94
    q = torch.tensor(1.0, dtype=torch.float64)
    update_factors([q], torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64), 0.1)
    assert q.item() == pytest.approx(1 - 0.1 * 3 / (5 + TINY), abs=1e-15)
    # and P h = q^2 h
    assert precondition([q], torch.tensor(2.0, dtype=torch.float64)).item() == pytest.approx(0.94**2 * 2)


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4), (4, 1, 3)])
def test_fit_step_matches_the_dense_formula(shape):
    g = torch.Generator().manual_seed(1)
    Q = [rand_triu(n, g) if n > 1 else torch.rand(n, generator=g, dtype=torch.float64) + 0.5 for n in shape]
    Q0 = [q.clone() for q in Q]
    h = torch.randn(shape, generator=g, dtype=torch.float64)
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    update_factors(Q, v, h, lr=0.1)
    # dense: A = K h, B = K^{-T} v; per factor i the Gram matrices over the other dims
    K = dense(Q0)
    A = (K @ h.flatten()).reshape(shape)
    B = torch.linalg.solve(K.T, v.flatten()).reshape(shape)
    for i, (q0, q) in enumerate(zip(Q0, Q, strict=True)):
        Ai, Bi = A.movedim(i, 0).reshape(shape[i], -1), B.movedim(i, 0).reshape(shape[i], -1)
        t1, t2 = Ai @ Ai.T, Bi @ Bi.T
        if q0.dim() == 2:
            step = torch.triu(t1 - t2) / (norm_lower_bound(t1 + t2) + TINY) @ q0
        else:
            step = torch.diag(t1 - t2) * q0 / (torch.diag(t1 + t2).abs().max() + TINY)
        torch.testing.assert_close(q, q0 - 0.1 * step, rtol=1e-12, atol=1e-12)
        if q.dim() == 2:
            assert torch.equal(q, torch.triu(q))  # stays in the group of upper-triangular matrices


def test_norm_lower_bound_is_a_lower_bound_and_tight_on_rank_one():
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        x = torch.randn(7, 5, generator=g, dtype=torch.float64)
        a = x @ x.T
        true = torch.linalg.matrix_norm(a, 2)
        lb = norm_lower_bound(a)
        assert lb <= true * (1 + 1e-12) and lb >= true / math.sqrt(7)
    u = torch.randn(6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(norm_lower_bound(torch.outer(u, u)), u.dot(u), rtol=1e-12, atol=0)
    assert norm_lower_bound(torch.zeros(3, 3)) == 0


def test_balance_keeps_the_product_and_evens_the_factors():
    Q = [torch.tensor([[4.0, 1.0], [0.0, 2.0]], dtype=torch.float64), torch.tensor([0.25, 0.5], dtype=torch.float64)]
    K = dense(Q)
    balance_factors(Q)
    # max-abs 4 and 0.5: geometric mean sqrt(2); factors scaled by sqrt(2)/4 and sqrt(2)/0.5
    torch.testing.assert_close(dense(Q), K)
    assert [q.abs().max().item() for q in Q] == pytest.approx([math.sqrt(2)] * 2)


def test_fit_whitens_a_diagonal_scale():
    # h ~ N(0, diag(s^2)): the fit's fixed point is P = E[h h^T]^{-1/2}, i.e. q_i^2 = 1 / s_i
    s = torch.tensor([0.25, 1.0, 4.0, 16.0], dtype=torch.float64)
    q = torch.ones(4, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    for _ in range(4000):
        h = s * torch.randn(4, generator=g, dtype=torch.float64)
        update_factors([q], torch.randn(4, generator=g, dtype=torch.float64), h, lr=0.05)
    torch.testing.assert_close(q * q, 1 / s, rtol=0.25, atol=0)


# ---- the update schedule ------------------------------------------------------------------------------------------

def test_schedule_counter_by_hand():
    sch = _Schedule()
    key = (0.25, 1.0, 0.03, 0.001, 500)  # a constant 1/4: the counter reaches 4 at steps 4, 8, 12
    assert [sch.get(key, t)[0] for t in range(1, 13)] == [False, False, False, True] * 3
    assert sch.get(key, 12)[1] == 3
    default = (None, 1.0, 0.03, 0.001, 500)
    assert all(sch.get(default, t)[0] for t in range(1, 502))  # flat start: every step
    # at t = 500 + ln 2 / 0.001 = 1193 the probability is 1/2, just under it after: 1/p a little above 2, so
    # the counter must reach 3 (the rate is 1 / ceil(1/p), not p): 20 steps from there fit 6 or 7 times
    assert update_schedule(1193).item() == pytest.approx(0.5, abs=1e-3)
    assert sum(sch.get(default, t)[0] for t in range(1194, 1214)) in (6, 7)
    assert update_schedule(10**6).item() == pytest.approx(0.03)  # the floor


# ---- the optimizer ------------------------------------------------------------------------------------------------

def params(shapes=SHAPES, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def run(make, steps, shapes=SHAPES, seed=123):
    ps = params(shapes)
    opt = make(ps)
    torch.manual_seed(seed)  # the probes v: torch's global generator, drawn alike by both
    gg = torch.Generator().manual_seed(7)
    for t in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gg) * (1 + 0.1 * t) + 0.1 * p.detach()
        opt.step()
    return ps, opt


def test_first_step_by_hand_on_a_scalar():
    # g = 2, mu = 0.9: m = 0.2, h = m / (1 - 0.9) = 2; fit with v = 1 -> q = 0.94 (above); u = q^2 h = 1.7672,
    # clipped to rms 1.1: u = 1.1 / (1.7672 + 1e-6) * 1.7672; p <- 1 - 0.1 u
    p = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    opt = PSGDKron([p], lr=0.1, noise=torch.ones_like, precond_dtype=torch.float64)
    p.grad = torch.tensor(2.0, dtype=torch.float64)
    opt.step()
    q = 1 - 0.1 * 3 / (5 + TINY)
    u = q * q * 2
    u *= min(1.0, 1.1 / (u + 1e-6))
    assert p.item() == pytest.approx(1 - 0.1 * u, abs=1e-12)
    assert opt.state[p]["psgd_kron.Q0"].item() == pytest.approx(q, abs=1e-12)


SETTINGS = {
    "defaults": ({}, {}),
    "weight_decay": ({"weight_decay": 0.1}, {"weight_decay": 0.1}),
    "constant_prob": ({"precond_update_prob": 0.5}, {"pre_conditioner_update_probability": 0.5}),
    "schedule": ({"prob_flat_start": 2, "prob_decay": 0.1, "prob_min": 0.1}, "schedule"),
    "fit_on_gradient": ({"momentum_into_precond_update": False}, {"momentum_into_precondition_update": False}),
    "one_diag": ({"memory_save_mode": "one_diag"}, {"memory_save_mode": "one_diag"}),
    "smart_one_diag": ({"memory_save_mode": "smart_one_diag"}, {"memory_save_mode": "smart_one_diag"}),
    "all_diag": ({"memory_save_mode": "all_diag"}, {"memory_save_mode": "all_diag"}),
    "max_size": ({"max_size_triangular": 6}, {"max_size_triangular": 6}),
}


CASES = [("defaults", 0)] + [(k, 1) for k in SETTINGS]  # balance: never, or at every fit


@pytest.mark.parametrize("setting,balance", CASES, ids=[f"{k}-{'balance' if b else 'no_balance'}" for k, b in CASES])
def test_parity_with_pytorch_optimizer_kron(setting, balance):
    po = pytest.importorskip("pytorch_optimizer")
    from pytorch_optimizer.optimizer.psgd import precondition_update_prob_schedule

    ours_kw, theirs_kw = SETTINGS[setting]
    if theirs_kw == "schedule":
        theirs_kw = {"pre_conditioner_update_probability": precondition_update_prob_schedule(
            max_prob=1.0, min_prob=0.1, decay=0.1, flat_start=2)}
    steps = 30
    # the peer balances with probability balance_prob (numpy's global generator): 0 or 1 make it deterministic
    theirs, _ = run(lambda ps: po.Kron(ps, lr=1e-2, balance_prob=float(balance), **theirs_kw), steps)
    ours, opt = run(lambda ps: PSGDKron(ps, lr=1e-2, balance_every=balance, noise=torch.randn_like, **ours_kw),
                    steps)
    err = max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))
    moved = min((a.detach() - b).abs().max().item() for a, b in zip(ours, params(), strict=True) if a.numel())
    assert moved > 1e-2
    # measured: <= 4.8e-7 over 30 steps (float32; the peer contracts with einsum, poise with matmuls)
    assert err <= 1e-6, f"{setting}: max |poise - pytorch_optimizer| = {err:.2e}"


def test_default_probes_are_seeded_by_seed_and_step():
    a, _ = run(lambda ps: PSGDKron(ps, lr=1e-2, seed=5), 6)
    torch.manual_seed(999)  # the global generator does not matter
    b, _ = run(lambda ps: PSGDKron(ps, lr=1e-2, seed=5), 6, seed=0)
    c, _ = run(lambda ps: PSGDKron(ps, lr=1e-2, seed=6), 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_refreshes_follow_the_schedule():
    ps = params([(4, 3), (3,)])
    opt = PSGDKron(ps, lr=1e-2, precond_update_prob=0.5, diagnostics=True)
    seen = []
    for _ in range(4):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        seen.append(opt.last_diagnostics["refreshes"].item())
    assert seen == [0.0, 2.0, 0.0, 2.0]  # counter 1/p = 2: steps 2 and 4 fit both tensors' Q


def test_state_is_factors_and_momentum():
    ps = params([(12, 8), (4, 3, 5), (8,)])
    opt = PSGDKron(ps, lr=1e-2)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    st = opt.state[ps[1]]
    assert [st[f"psgd_kron.Q{i}"].shape for i in range(3)] == [(4, 4), (3, 3), (5, 5)]
    assert st["psgd_kron.momentum_buffer"].shape == (4, 3, 5)
    assert opt.state[ps[2]]["psgd_kron.Q0"].shape == (8,)


BAD = [
    (dict(lr=-1.0), "lr=-1.0"),
    (dict(momentum=1.0), "momentum=1.0"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"),
    (dict(precond_update_prob=0.0), r"precond_update_prob=0.0 is out of range; valid: \(0.0, 1.0\]"),
    (dict(precond_update_prob=1.5), "precond_update_prob=1.5"),
    (dict(max_size_triangular=0), "max_size_triangular=0 must be an integer >= 1"),
    (dict(max_size_triangular=-3), "max_size_triangular=-3"),
    (dict(min_ndim_triangular=0), "min_ndim_triangular=0"),
    (dict(memory_save_mode="half"), "memory_save_mode='half'; valid choices"),
    (dict(precond_lr=0.0), "precond_lr=0.0"),
    (dict(precond_init_scale=-1.0), "precond_init_scale=-1.0"),
    (dict(prob_min=0.0), "prob_min=0.0"),
    (dict(prob_min=0.9, prob_max=0.5), r"prob_min=0.9 is out of range; valid: \(0.0, 0.5\]"),
    (dict(prob_decay=-1.0), "prob_decay=-1.0"),
    (dict(balance_every=-1), "balance_every=-1"),
    (dict(clip_rms=0.0), "clip_rms=0.0"),
    (dict(seed=1.5), "seed=1.5"),
    (dict(precond_dtype=torch.bfloat16), "precond_dtype=torch.bfloat16"),
]


@pytest.mark.parametrize("kw,msg", BAD, ids=[next(iter(k)) + str(i) for i, (k, _) in enumerate(BAD)])
def test_bad_input_names_the_value(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PSGDKron(params([(3, 2)]), **kw)


def test_bfloat16_parameters_keep_dtype_with_float32_factors():
    ps = params([(6, 4), (4,)], dtype=torch.bfloat16)
    opt = PSGDKron(ps, lr=1e-2)
    for _ in range(3):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    assert all(p.dtype == torch.bfloat16 for p in ps)
    assert opt.state[ps[0]]["psgd_kron.Q0"].dtype == torch.float32
    assert opt.state[ps[0]]["psgd_kron.momentum_buffer"].dtype == torch.bfloat16


@pytest.mark.parametrize("scale", [1e20, 1e-20, 1e13, 1e-13, float("inf"), float("nan")])
def test_precond_init_scale_outside_1e_minus12_to_1e12_is_refused(scale):
    """P = Q^T Q starts at s I: at s = 1e20 or 1e-20 the float32 factor fit overflows and every parameter turns
    NaN within a few steps, silently. The constructor refuses it, naming the value and the range."""
    msg = f"precond_init_scale={scale!r} is out of range; valid: [1e-12, 1e12]"
    with pytest.raises(ValueError, match=re.escape(msg)):
        PSGDKron(params([(3, 2)]), precond_init_scale=scale)


def test_precond_init_scale_of_a_param_group_is_refused_at_its_first_step():
    (p,) = params([(3, 2)])
    before = p.detach().clone()
    opt = PSGDKron([{"params": [p], "precond_init_scale": 1e20}], lr=0.1)
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=re.escape("precond_init_scale=1e+20 is out of range; valid: [1e-12, 1e12]")):
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("scale", [1e-12, 1e12])
def test_precond_init_scale_at_the_bounds_stays_finite(scale):
    ps = params([(4, 3), (5,), (2, 3, 4)])
    opt = PSGDKron(ps, lr=1e-2, precond_init_scale=scale)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in ps)
