import pytest
import torch

from poise.edit import RLSEditor, alphaedit, apply_delta, memit, nullspace_projector, rome, sphere_project

D = torch.float64


def _data(seed=0, d_v=6, d_k=8, n=3, n0=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_v, d_k, generator=g, dtype=D), torch.randn(d_k, n, generator=g, dtype=D),
            torch.randn(d_v, n, generator=g, dtype=D), torch.randn(d_k, n0, generator=g, dtype=D))


def test_rome_writes_the_new_pair_exactly():
    W, K, V, K0 = _data()
    C = K0 @ K0.T + torch.eye(8, dtype=D)
    d = rome(W, K[:, 0], V[:, 0], C)
    err = float(((W + d) @ K[:, 0] - V[:, 0]).abs().max())
    print(f"ROME: max |(W + dW) k - v| = {err:.1e}")
    assert err < 1e-12
    assert torch.linalg.matrix_rank(d) == 1
    # minimum C-norm: the Lagrange condition dW C = r k^T / (k^T C^-1 k), r = v - W k
    r, k = V[:, 0] - W @ K[:, 0], K[:, 0]
    torch.testing.assert_close(d @ C, torch.outer(r, k) / (k @ torch.linalg.solve(C, k)), atol=1e-12, rtol=0)


def test_memit_solves_the_normal_equations():
    W, K, V, K0 = _data()
    C0 = K0 @ K0.T
    d = memit(W, K, V, C0, lam=2.0)
    # gradient of ||d K0||^2 * 2 + ||(W+d)K - V||^2 is zero at the solution
    grad = 2.0 * d @ C0 + ((W + d) @ K - V) @ K.T
    assert grad.abs().max() < 1e-10


def test_alphaedit_leaves_preserved_keys_unchanged():
    W, K, V, K0 = _data(n0=5)  # 5 preserved keys in 8 dims: they do not span the key space
    P = nullspace_projector(K0, 1e-8)
    assert (P @ K0).abs().max() < 1e-10
    d = alphaedit(W, K, V, K0, threshold=1e-8)
    err = float((d @ K0).abs().max())
    print(f"AlphaEdit: max |dW K0| = {err:.1e}")
    assert err < 1e-10
    assert (W + d) @ K is not None and (((W + d) @ K - V).norm() < (W @ K - V).norm())


def test_rlsedit_recursion_equals_the_one_shot_minimiser_and_lambda_limit():
    W0, _, _, K0 = _data()
    lam, mu = 0.7, 1.3
    ed = RLSEditor(W0, K0, lam, mu)
    g = torch.Generator().manual_seed(3)
    Ks, Vs = [], []
    for _ in range(6):
        K = torch.randn(8, 2, generator=g, dtype=D)
        V = torch.randn(6, 2, generator=g, dtype=D)
        ed.edit(K, V)
        Ks.append(K)
        Vs.append(V)
    A = lam**2 * torch.eye(8, dtype=D) + mu**2 * K0 @ K0.T + sum(K @ K.T for K in Ks)
    B = lam**2 * W0 + mu**2 * W0 @ K0 @ K0.T + sum(V @ K.T for K, V in zip(Ks, Vs, strict=True))
    err = float((ed.W - B @ torch.linalg.inv(A)).abs().max())
    print(f"RLSEdit: max |recursion - one-shot minimiser| = {err:.1e}")
    assert err < 1e-10
    big = RLSEditor(W0, K0, lam=1e6, mu=1.0)
    big.edit(Ks[0], Vs[0])
    torch.testing.assert_close(big.W, W0, atol=1e-8, rtol=0)  # lambda -> infinity keeps W0


def test_sphere_projection_removes_the_chosen_directions():
    W, _, _, _ = _data(d_v=10)
    delta = torch.randn(10, 8, dtype=D)
    out = sphere_project(W, delta, beta=0.5, alpha=1.0)
    A = W / W.norm(dim=1, keepdim=True)
    evals, evecs = torch.linalg.eigh(A.T @ A / 10)
    evals, evecs = evals.flip(0), evecs.flip(1)
    r = int((torch.cumsum(evals, 0) / evals.sum() <= 0.5).sum()) + 1
    err = float((out @ evecs[:, :r]).abs().max())
    print(f"SPHERE: max |projected delta . principal directions| = {err:.1e} ({r} directions)")
    assert err < 1e-10
    torch.testing.assert_close(sphere_project(W, delta, alpha=0.0), delta)


def test_bad_inputs_are_clear_and_leave_the_layer_unchanged():
    W, K, V, K0 = _data()
    with pytest.raises(ValueError, match=r"K must be \[d_k=8, n\]"):
        memit(W, K.T, V, K0 @ K0.T)
    with pytest.raises(ValueError, match="dtype torch.float32; W has torch.float64"):
        memit(W, K.float(), V, K0 @ K0.T)
    with pytest.raises(ValueError, match="singular or not positive definite"):
        memit(W, K[:, :1] @ torch.ones(1, 3, dtype=D), V, torch.zeros(8, 8, dtype=D), lam=0.0)
    layer = torch.nn.Linear(8, 6, bias=False).double()
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="delta has shape"):
        apply_delta(layer, torch.zeros(8, 6, dtype=D))
    assert torch.equal(layer.weight, before)
    apply_delta(layer, rome(layer.weight.detach(), K[:, 0], V[:, 0]))
    torch.testing.assert_close(layer(K[:, 0]), V[:, 0], atol=1e-12, rtol=0)


def test_collect_keys_values_and_rome_on_a_hugging_face_mlp():
    transformers = pytest.importorskip("transformers")
    from poise.edit import collect_keys_values

    cfg = transformers.LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                   pad_token_id=None, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double()
    layer = model.model.layers[0].mlp.down_proj
    ids = torch.randint(0, 20, (2, 5))
    K, V = collect_keys_values(model, layer, ids)
    assert K.shape == (32, 10) and V.shape == (16, 10)
    torch.testing.assert_close(layer.weight @ K, V)
    target = V[:, 3] + 1.0
    apply_delta(layer, rome(layer.weight.detach(), K[:, 3], target))
    K2, V2 = collect_keys_values(model, layer, ids)
    torch.testing.assert_close(V2[:, 3], target, atol=1e-10, rtol=0)


# --- finiteness and singular systems (issue 19): ValueError naming the argument, its value, what is valid ---

NAN, INF = float("nan"), float("inf")


def test_non_finite_tensors_are_refused_by_every_function():
    W, K, V, K0 = _data()
    C = K0 @ K0.T + torch.eye(8, dtype=D)
    k_nan = K[:, 0].clone()
    k_nan[3] = NAN
    V_inf = V.clone()
    V_inf[1, 2] = INF
    cases = [
        (lambda: rome(W, k_nan, V[:, 0]), r"k has 1 non-finite entry \(the first at index \(3, 0\): nan\)"),  # was NaN
        (lambda: rome(W, K[:, 0], V[:, 0], C * INF), "C has 64 non-finite entries"),
        (lambda: memit(W, K, V_inf, C), r"V has 1 non-finite entry \(the first at index \(1, 2\): inf\)"),
        (lambda: memit(W * NAN, K, V, C), "W has 48 non-finite entries"),
        (lambda: alphaedit(W, K, V, K0 * NAN, threshold=1e-8), "K0 has 40 non-finite entries"),
        (lambda: alphaedit(W, K, V, K0, K_prev=k_nan[:, None], threshold=1e-8), "K_prev has 1 non-finite entry"),
        (lambda: nullspace_projector(K0 * INF), "K0 has 40 non-finite entries"),
        (lambda: sphere_project(W, W * NAN), "delta has 48 non-finite entries"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()


@pytest.mark.parametrize("call,msg", [
    (lambda W, K, V, K0: alphaedit(W, K, V, K0, threshold=NAN), r"threshold=nan must be >= 0 and finite"),
    (lambda W, K, V, K0: alphaedit(W, K, V, K0, threshold=-1.0), r"threshold=-1.0 must be >= 0 and finite"),
    (lambda W, K, V, K0: alphaedit(W, K, V, K0, threshold=1e-8, l2=INF), r"l2=inf must be >= 0 and finite"),
    (lambda W, K, V, K0: memit(W, K, V, K0 @ K0.T, lam=NAN), r"lam=nan must be >= 0 and finite"),
    (lambda W, K, V, K0: nullspace_projector(K0, NAN), r"threshold=nan must be >= 0"),
    (lambda W, K, V, K0: sphere_project(W, W, beta=1.5), r"beta=1.5 must be in \[0, 1\] and finite"),
    (lambda W, K, V, K0: sphere_project(W, W, alpha=INF), r"alpha=inf must be >= 0 and finite"),
])
def test_non_finite_or_out_of_range_hyperparameters_are_refused(call, msg):
    # before: alphaedit(threshold=nan) kept no eigenvector (evals < nan is False) and returned a zero update
    with pytest.raises(ValueError, match=msg):
        call(*_data())


def test_three_singular_systems_raise_value_errors_not_linalg_errors():
    W, K, V, K0 = _data()
    # 1. ROME, a zero key: (W + Delta) 0 = v has no solution
    with pytest.raises(ValueError, match="k is the zero vector"):
        rome(W, torch.zeros(8, dtype=D), V[:, 0])
    # ROME, a singular C (before: torch.linalg.solve's _LinAlgError)
    with pytest.raises(ValueError, match=r"C is singular \(numerical rank 7 of d_k=8\): give a positive definite C"):
        rome(W, K[:, 0], V[:, 0], torch.diag(torch.tensor([1.0] * 7 + [0.0], dtype=D)))
    # ROME, C^-1 k orthogonal to k: C = diag(1, -1, 1, ...), k = e1 + e2: C^-1 k = e1 - e2, (C^-1 k)^T k = 0
    C = torch.diag(torch.tensor([1.0, -1.0] + [1.0] * 6, dtype=D))
    k = torch.zeros(8, dtype=D)
    k[:2] = 1.0
    with pytest.raises(ValueError, match=r"\(C\^-1 k\)\^T k = 0: C\^-1 k is orthogonal to k"):
        rome(W, k, V[:, 0], C)
    # 2. MEMIT, lam = 0 and 3 keys in 8 dimensions: lam C0 + K K^T has rank 3
    with pytest.raises(ValueError, match=r"\(lam=0.0; numerical rank 3 of d_k=8; 3 keys\): give lam > 0"):
        memit(W, K, V, K0 @ K0.T, lam=0.0)
    # 3. AlphaEdit, l2 = 0 with a 3-dimensional null space (5 preserved keys in 8 dims): M P has rank <= 3
    with pytest.raises(ValueError, match=r"l2=0.0 makes M P \+ l2 I singular \(P projects onto 3 of d_k=8"):
        alphaedit(W, K, V, K0, threshold=1e-8, l2=0.0)
    # l2 = 0 is fine when the null space is everything (no preserved keys): then A = M, and M = K K^T + ...
    assert torch.isfinite(alphaedit(W, K, V, K0[:, :0], K_prev=torch.eye(8, dtype=D), l2=0.0)).all()


def test_alphaedit_with_an_empty_null_space_warns_and_writes_nothing():
    W, K, V, _ = _data()
    K0 = torch.randn(8, 20, generator=torch.Generator().manual_seed(1), dtype=D)  # 20 keys span the 8-d key space
    with pytest.warns(UserWarning, match=r"threshold=1e-08 leaves the null space of K0 K0\^T empty"):
        d = alphaedit(W, K, V, K0, threshold=1e-8)
    assert torch.equal(d, torch.zeros_like(W))


def test_overflowing_updates_are_refused():
    W, K, V, K0 = _data()
    huge = K[:, 0] * 1e200  # finite, but k^T k overflows
    with pytest.raises(ValueError, match=r"\(C\^-1 k\)\^T k overflows torch.float64"):
        rome(W, huge, V[:, 0])  # before: Delta = r k^T / inf = 0, a silent non-edit
    with pytest.raises(ValueError, match="lam \\* C0 \\+ K K\\^T overflows"):
        memit(W, K * 1e200, V, K0 @ K0.T)


def test_apply_delta_refuses_non_finite_changes_and_leaves_the_layer_bit_identical():
    layer = torch.nn.Linear(8, 6, bias=False).double()
    with torch.no_grad():
        layer.weight[0, 0] = torch.finfo(D).max / 2
    before = layer.weight.detach().clone()
    bad = torch.zeros(6, 8, dtype=D)
    bad[2, 3] = NAN
    with pytest.raises(ValueError, match=r"delta has 1 non-finite entry \(the first at index \(2, 3\): nan\)"):
        apply_delta(layer, bad)
    with pytest.raises(ValueError, match="weight \\+ delta is not finite in torch.float64"):
        apply_delta(layer, torch.full((6, 8), torch.finfo(D).max, dtype=D))  # finite, but max/2 + max overflows
    assert torch.equal(layer.weight, before)
