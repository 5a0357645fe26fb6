import math

import pytest
import torch

from poise.merge import (
    apply_task_vector,
    average,
    bures_distance_sq,
    conflict_gate,
    gcwm_merge,
    gcwm_merge_tensor,
    geometry_conflict,
    interference_merge,
    projected_covariances,
    state_conflict,
    task_arithmetic,
    task_vector,
    wasserstein_barycenter,
)

D = torch.float64


def diag(*x):
    return torch.diag(torch.tensor(x, dtype=D))


def test_bures_distance_of_commuting_matrices_by_hand():
    # diagonal A, B: d^2 = sum (sqrt a_i - sqrt b_i)^2 = (2 - 1)^2 + (3 - 1)^2 = 1 + 4 = 5
    assert float(bures_distance_sq(diag(4, 9), diag(1, 1))) == pytest.approx(5.0, abs=1e-12)
    # non-commuting: A = I, B = rotation of diag(4, 0): (A^1/2 B A^1/2)^1/2 = B^1/2, tr = 2;
    # d^2 = 2 + 4 - 2*2 = 2
    c, s = math.cos(0.3), math.sin(0.3)
    R = torch.tensor([[c, -s], [s, c]], dtype=D)
    B = R @ diag(4, 0) @ R.T
    assert float(bures_distance_sq(torch.eye(2, dtype=D), B)) == pytest.approx(2.0, abs=1e-10)


def test_conflict_is_zero_for_identical_and_one_for_orthogonal_geometry():
    assert geometry_conflict([diag(2, 1), diag(2, 1)], reg=0.0) == pytest.approx(0.0, abs=1e-12)
    # orthogonal rank-one: d^2 = a + b (cross term 0), normalised by a + b -> 1
    assert geometry_conflict([diag(3, 0), diag(0, 5)], reg=0.0) == pytest.approx(1.0, abs=1e-12)
    # same direction, different scale: (sqrt4 - sqrt1)^2 / (4 + 1) = 1/5
    assert geometry_conflict([diag(4, 0), diag(1, 0)], reg=0.0) == pytest.approx(0.2, abs=1e-12)
    # three matrices: mean over the 3 pairs of (0, 1, 1) = 2/3
    assert geometry_conflict([diag(1, 0), diag(1, 0), diag(0, 1)], reg=0.0) == pytest.approx(2 / 3, abs=1e-12)


def test_barycenter_of_identical_geometries_is_that_geometry_and_commuting_case_by_hand():
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=D)
    torch.testing.assert_close(wasserstein_barycenter([A, A, A], [0.2, 0.3, 0.5]), A, atol=1e-12, rtol=0)
    # commuting: barycenter = (sum w sqrt C)^2 = (0.5*[1, 2] + 0.5*[3, 0])^2 = [2, 1]^2 = diag(4, 1)
    B = wasserstein_barycenter([diag(1, 4), diag(9, 1e-30)], iters=200, tol=1e-14)
    torch.testing.assert_close(B, diag(4, 1), atol=1e-8, rtol=0)


def test_barycenter_is_the_fixed_point_for_non_commuting_matrices():
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=D)
    C = torch.tensor([[1.0, -0.3], [-0.3, 3.0]], dtype=D)
    B = wasserstein_barycenter([A, C], iters=500, tol=1e-15)
    # fixed-point equation: B = sum_t w_t (B^1/2 C_t B^1/2)^1/2 conjugated back, i.e.
    # sum_t w_t T_t = I with T_t the optimal map B -> C_t
    from poise.merge import psd_sqrt
    rB, irB = psd_sqrt(B), psd_sqrt(B, inverse=True, eps=1e-15)
    maps = [irB @ psd_sqrt(rB @ X @ rB) @ irB for X in (A, C)]
    torch.testing.assert_close(0.5 * maps[0] + 0.5 * maps[1], torch.eye(2, dtype=D), atol=1e-10, rtol=0)


def test_gate_by_hand():
    # at c = c0 the sigmoid is 1/2: 0.15 + 0.8 / 2 = 0.55
    assert conflict_gate(0.12) == pytest.approx(0.55)
    # compatible (c = 0): 0.15 + 0.8 * sigmoid(-1.44) = 0.15 + 0.8 * 0.19155 = 0.30324
    assert conflict_gate(0.0) == pytest.approx(0.15 + 0.8 / (1 + math.exp(1.44)))
    # conflicting (c = 1): 0.15 + 0.8 * sigmoid(10.56) -> 0.95 within 3e-5
    assert conflict_gate(1.0) == pytest.approx(0.95, abs=3e-5)
    with pytest.raises(ValueError, match="gate_min"):
        conflict_gate(0.5, gate_min=0.9, gate_max=0.1)


def test_interference_merge_by_hand():
    # rows tau1 = [1, 0], tau2 = [1, 1]: the loss is 0 iff m.tau1 = 1 and m.tau2 = 2 -> m = [1, 1]
    t1, t2 = torch.tensor([[1.0, 0.0]], dtype=D), torch.tensor([[1.0, 1.0]], dtype=D)
    torch.testing.assert_close(interference_merge([t1, t2], solver="closed_form"), torch.tensor([[1.0, 1.0]], dtype=D))
    # orthogonal row spaces: m = tau1 + tau2 (task arithmetic)
    a, b = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=D), torch.tensor([[0.0, 3.0], [0.0, -1.0]], dtype=D)
    torch.testing.assert_close(interference_merge([a, b], solver="closed_form"), a + b)
    # identical updates merge to the update itself, not twice it
    torch.testing.assert_close(interference_merge([a, a], solver="closed_form"), a)
    # the reference loop starts at the sum: for orthogonal rows that is already the minimiser
    torch.testing.assert_close(interference_merge([a, b]), a + b)


def test_adam_solver_descends_towards_the_closed_form():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, generator=g, dtype=D), torch.randn(3, 4, generator=g, dtype=D)
    exact = interference_merge([a, b], solver="closed_form")
    start_gap = float((a + b - exact).norm())
    adam = interference_merge([a, b], solver="adam", steps=3000, lr=1e-2)
    assert float((adam - exact).norm()) < 0.05 * start_gap
    with pytest.raises(ValueError, match="valid choices: closed_form, adam"):
        interference_merge([a], solver="sgd")


def test_gcwm_gate_follows_conflict_and_merges_identical_updates_to_themselves():
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=D))[0]
    tau = torch.randn(5, 2, generator=g, dtype=D) @ U[:, :2].T          # rows in span(u1, u2)
    other = torch.randn(5, 2, generator=g, dtype=D) @ U[:, 2:4].T       # rows in span(u3, u4): orthogonal
    same, st = gcwm_merge_tensor([tau, tau], solver="closed_form")
    assert st["conflict"] == pytest.approx(0.0, abs=1e-6) and st["alpha"] < 0.31
    torch.testing.assert_close(same, tau, atol=1e-8, rtol=0)
    merged, st = gcwm_merge_tensor([tau, other], solver="closed_form")
    assert st["conflict"] > 0.99 and st["alpha"] > 0.949
    # orthogonal input directions: both branches reduce to the sum
    torch.testing.assert_close(merged, tau + other, atol=1e-6, rtol=0)


def test_gcwm_geometry_branch_differs_from_plain_only_through_the_metric():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 5, generator=g, dtype=D), torch.randn(4, 5, generator=g, dtype=D)
    kw = dict(rank=5, energy=None, solver="closed_form")
    full, st = gcwm_merge_tensor([a, b], gate_min=1.0, gate_max=1.0, **kw)  # geometry only
    plain, _ = gcwm_merge_tensor([a, b], gate_min=0.0, gate_max=0.0, **kw)  # plain only
    torch.testing.assert_close(plain, interference_merge([a, b], solver="closed_form"))
    assert float((full - plain).norm()) > 1e-3  # the whitening changes the merge
    mid, st = gcwm_merge_tensor([a, b], **kw)
    torch.testing.assert_close(mid, st["alpha"] * full + (1 - st["alpha"]) * plain, atol=1e-10, rtol=0)


def test_projected_covariance_keeps_energy_rank():
    # singular values 3, 1 -> energies 0.9, 1.0: energy 0.9 keeps one direction
    t = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=D)
    Q, (B,) = projected_covariances([t], rank=16, energy=0.9, reg=0.0)
    assert Q.shape == (2, 1)
    torch.testing.assert_close(B, torch.tensor([[9.0]], dtype=D))


def test_state_dict_level_merge_and_conflict_on_a_module():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    b = {k: v.clone() for k, v in base.state_dict().items()}
    d1 = {k: 0.1 * torch.randn_like(v) for k, v in b.items()}
    d2 = {k: 0.1 * torch.randn_like(v) for k, v in b.items()}
    ft = apply_task_vector(b, d1)
    torch.testing.assert_close(task_vector(ft, b), d1)
    merged, stats = gcwm_merge([d1, d2])
    assert set(merged) == set(b) and set(stats["layers"]) == {"0.weight", "2.weight"}
    base.load_state_dict(apply_task_vector(b, merged))
    sc = state_conflict(d1, d2)
    assert 0 <= sc["mean"] <= 1 and set(sc["layers"]) == {"0.weight", "2.weight"}
    assert state_conflict(d1, d1)["mean"] == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(task_arithmetic([d1, d2], 0.5)["0.weight"], average([d1, d2])["0.weight"])
    with pytest.raises(ValueError, match="weights has 3 entries for 2 deltas"):
        gcwm_merge([d1, d2], weights=[1, 1, 1])
    with pytest.raises(ValueError, match="missing from finetuned"):
        task_vector({}, b)
    with pytest.raises(ValueError, match="valid choices: barycenter, mean"):
        gcwm_merge([d1, d2], metric="median")


def test_adam_solver_equals_torch_adam_on_the_reference_loss():
    # the solver's hand-written Adam on the analytic gradient = torch.optim.Adam on the reference's loss
    g = torch.Generator().manual_seed(3)
    taus = torch.randn(2, 3, 4, generator=g, dtype=D)
    m = torch.nn.Parameter(taus.sum(0).clone())
    opt = torch.optim.Adam([m], lr=1e-2)
    norms = taus.pow(2).sum((1, 2))
    for _ in range(40):
        inner = (m.unsqueeze(0) - taus) @ taus.transpose(1, 2)
        loss = (0.5 * inner.pow(2).sum((1, 2)) / norms).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ours = interference_merge([taus[0], taus[1]], solver="adam", steps=40, lr=1e-2)
    torch.testing.assert_close(ours, m.detach(), atol=1e-10, rtol=0)
