import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from poise.continual import AGEM, OGD, OGPSA, agem_project, project_out
from poise.continual.projection import _flat_grad
from tests.continual.conftest import backward_on

vectors = st.lists(st.floats(-10, 10, allow_nan=False), min_size=3, max_size=3)


@settings(max_examples=300, deadline=None)
@given(vectors, vectors)
def test_agem_project_never_leaves_negative_inner_product(g, r):
    g, r = torch.tensor(g, dtype=torch.float64), torch.tensor(r, dtype=torch.float64)
    out = agem_project(g, r)
    assert torch.dot(out, r) >= -1e-9 * (1 + g.norm() * r.norm())
    if torch.dot(g, r) >= 0:
        assert torch.equal(out, g)  # no change when there is no conflict


def _flat(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_agem_strategy_projects_against_memory_gradient(tiny):
    model, t0, t1 = tiny
    agem = AGEM(per_task=40, sample_size=40)  # the whole memory: g_ref is deterministic
    agem.after_task(model, t0)
    backward_on(model, t1)
    g_ref = _flat_grad(nn.functional.cross_entropy(model(t0.x), t0.y), list(model.parameters()))
    before = torch.dot(_flat(model), g_ref)
    out = agem.transform_grads(model)
    after = torch.dot(_flat(model), g_ref)
    assert after >= -1e-5 * g_ref.norm() ** 2
    assert torch.isclose(out["dot"], before, rtol=1e-4)
    if before < 0:
        assert out["projected"] == 1.0 and abs(after) < 1e-4


def test_ogpsa_leaves_no_component_along_reference_subspace(tiny):
    model, t0, t1 = tiny
    for rank in (1, 3):
        og = OGPSA(ref_size=1000, per_task=40, refresh_every=5, rank=rank)
        og.after_task(model, t0)
        backward_on(model, t1)
        og.transform_grads(model)
        assert set(og.bases) == {n for n, _ in model.named_parameters()}
        for n, p in model.named_parameters():
            U = og.bases[n]
            assert U.shape[0] == rank
            torch.testing.assert_close(U @ U.T, torch.eye(rank), atol=1e-5, rtol=0)
            assert (U @ p.grad.reshape(-1)).abs().max() < 1e-5 * max(1.0, p.grad.norm().item())
    # rank 1: the basis is the normalised reference gradient, so the projected gradient is
    # orthogonal to the reference loss gradient tensor by tensor
    og = OGPSA(ref_size=1000, per_task=40, rank=1)
    og.after_task(model, t0)
    backward_on(model, t1)
    og.transform_grads(model)
    ref = torch.autograd.grad(nn.functional.cross_entropy(model(t0.x), t0.y), list(model.parameters()))
    for g_ref, p in zip(ref, model.parameters(), strict=True):
        assert abs(torch.dot(g_ref.reshape(-1), p.grad.reshape(-1))) < 1e-5 * g_ref.norm() * p.grad.norm() + 1e-9


def test_ogpsa_refreshes_on_schedule(tiny):
    model, t0, t1 = tiny
    og = OGPSA(per_task=20, refresh_every=3)
    og.after_task(model, t0)
    og.before_task(model, t1)
    fired = []
    for _ in range(7):
        backward_on(model, t1)
        fired.append(og.transform_grads(model)["refreshed"].item())
    assert fired == [1, 0, 0, 1, 0, 0, 1]


def test_ogpsa_without_reference_is_a_noop(tiny):
    model, _, t1 = tiny
    backward_on(model, t1)
    g = _flat(model).clone()
    assert OGPSA().transform_grads(model) == {}
    assert torch.equal(_flat(model), g)


def test_ogd_projects_out_stored_basis(tiny):
    model, t0, t1 = tiny
    ogd = OGD(samples_per_task=10)
    ogd.after_task(model, t0)
    ogd.after_task(model, t1)
    B = ogd.basis
    torch.testing.assert_close(B @ B.T, torch.eye(len(B)), atol=1e-4, rtol=0)
    backward_on(model, t1)
    ogd.transform_grads(model)
    assert (B @ _flat(model)).abs().max() < 1e-4


def test_project_out_is_idempotent():
    torch.manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64))
    U = q.T
    g = torch.randn(10, dtype=torch.float64)
    once = project_out(g, U)
    torch.testing.assert_close(project_out(once, U), once)
    torch.testing.assert_close(U @ once, torch.zeros(3, dtype=torch.float64))
