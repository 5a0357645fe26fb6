import inspect

import pytest
import torch

from poise import _registry
from poise.edit import (
    MEMIT,
    ROME,
    AlphaEdit,
    Editor,
    NoEdit,
    RLSEdit,
    RLSEditor,
    Sphere,
    alphaedit,
    editor_params,
    make_editor,
    memit,
    rome,
    sphere_project,
)
from poise.edit.editors import TENSOR_ARGS

D = torch.float64
E1 = torch.tensor([1.0, 0.0], dtype=D)


def _data(seed=0, d_v=6, d_k=8, n0=5):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_v, d_k, generator=g, dtype=D)
    K0 = torch.randn(d_k, n0, generator=g, dtype=D)
    reqs = [(torch.randn(d_k, 2, generator=g, dtype=D), torch.randn(d_v, 2, generator=g, dtype=D)) for _ in range(3)]
    return W0, K0, reqs


# --- by hand: W0 = 0 (2 x 2), one key e1, value v = (1, 2) ---------------------------------------------


def test_rome_by_hand_writes_the_pair_and_returns_the_change():
    ed = ROME(torch.zeros(2, 2, dtype=D))
    delta = ed.edit(E1, torch.tensor([1.0, 2.0], dtype=D))
    want = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=D)  # (v - 0 k) k^T / (k^T k)
    assert torch.equal(delta, want) and torch.equal(ed.weight, want)


def test_memit_by_hand():
    # Delta = V K^T (lam C0 + K K^T)^{-1} = v e1^T (lam I + e1 e1^T)^{-1} = v e1^T / (lam + 1)
    ed = MEMIT(torch.zeros(2, 2, dtype=D), C0=torch.eye(2, dtype=D), lam=3.0)
    ed.edit(E1[:, None], torch.tensor([[1.0], [2.0]], dtype=D))
    torch.testing.assert_close(ed.weight, torch.tensor([[0.25, 0.0], [0.5, 0.0]], dtype=D), atol=1e-15, rtol=0)


def test_rlsedit_lam0_by_hand():
    # lam = 0, mu = 1, K0 = I (2 x 2): A = I, C = I; K = e1, v = (1, 2): the same step as lam = 1 without K0
    ed = RLSEdit(torch.zeros(2, 2, dtype=D), torch.eye(2, dtype=D))
    assert (ed.C == torch.eye(2, dtype=D)).all()
    ed.edit(E1, torch.tensor([1.0, 2.0], dtype=D))
    torch.testing.assert_close(ed.weight, torch.tensor([[0.5, 0.0], [1.0, 0.0]], dtype=D), atol=1e-15, rtol=0)
    # mu = 2 and K0 = diag(1, 3): C = diag(1/4, 1/36); F = e1/4, S = 5/4, W = v e1^T / 5
    ed = RLSEdit(torch.zeros(2, 2, dtype=D), torch.diag(torch.tensor([1.0, 3.0], dtype=D)), lam=0.0, mu=2.0)
    torch.testing.assert_close(ed.C, torch.diag(torch.tensor([1 / 4, 1 / 36], dtype=D)), atol=1e-15, rtol=0)
    ed.edit(E1, torch.tensor([1.0, 2.0], dtype=D))
    torch.testing.assert_close(ed.weight, torch.tensor([[0.2, 0.0], [0.4, 0.0]], dtype=D), atol=1e-15, rtol=0)


def test_rlsedit_lam0_first_request_is_memit_with_lam_mu_squared_and_equals_the_minimiser():
    W0, K0, reqs = _data(n0=12)  # 12 anchor keys in 8 dims: K0 K0^T is positive definite
    ed = RLSEdit(W0, K0, lam=0.0, mu=3.0)
    first = ed.edit(*reqs[0])
    torch.testing.assert_close(first, memit(W0, *reqs[0], K0 @ K0.T, lam=9.0), atol=1e-10, rtol=0)
    for K, V in reqs[1:]:
        ed.edit(K, V)
    # the recursion equals the one-shot minimiser of sum_s ||W K_s - V_s||^2 + mu^2 ||(W - W0) K0||^2
    A = 9.0 * K0 @ K0.T + sum(K @ K.T for K, _ in reqs)
    B = 9.0 * W0 @ K0 @ K0.T + sum(V @ K.T for K, V in reqs)
    torch.testing.assert_close(ed.weight, B @ torch.linalg.inv(A), atol=1e-10, rtol=0)
    # and lam -> 0 approaches it
    near = RLSEdit(W0, K0, lam=1e-6, mu=3.0)
    for K, V in reqs:
        near.edit(K, V)
    torch.testing.assert_close(near.weight, ed.weight, atol=1e-8, rtol=0)


def test_rlsedit_lam0_needs_positive_definite_anchor_keys():
    W0, K0, _ = _data(n0=5)  # 5 anchor keys in 8 dims: rank 5
    with pytest.raises(ValueError, match=r"lam=0 needs K0 K0\^T positive definite, but it has rank 5 of d_k=8 "
                                         r"\(5 anchor keys.*or lam > 0"):
        RLSEdit(W0, K0)
    with pytest.raises(ValueError, match=r"lam=0 needs anchor keys K0 and mu > 0 \(got K0=None"):
        RLSEdit(W0)
    with pytest.raises(ValueError, match=r"mu > 0 \(got K0=given, mu=0.0\)"):
        RLSEdit(W0, torch.eye(8, dtype=D), mu=0.0)
    with pytest.raises(ValueError, match=r"lam=-1.0 must be >= 0"):
        RLSEdit(W0, K0, lam=-1.0)
    K1 = torch.cat([torch.eye(8, dtype=D)[:, :7], torch.eye(8, dtype=D)[:, :1] * 1e-9], 1)  # e8 missing
    with pytest.raises(ValueError, match="rank 7 of d_k=8"):
        RLSEdit(W0, K1)
    RLSEdit(W0, K0, lam=0.5)  # lam > 0: any K0


def test_rlsedit_by_hand_and_shift_keeps_C():
    # lam = 1, no K0: C = I; K = e1: F = e1, S = 2, G = e1 / 2, W = v e1^T / 2, C = I - e1 e1^T / 2
    ed = RLSEdit(torch.zeros(2, 2, dtype=D), lam=1.0)
    v = torch.tensor([1.0, 2.0], dtype=D)
    delta = ed.edit(E1, v)
    torch.testing.assert_close(delta, torch.tensor([[0.5, 0.0], [1.0, 0.0]], dtype=D), atol=1e-15, rtol=0)
    torch.testing.assert_close(ed.C, torch.diag(torch.tensor([0.5, 1.0], dtype=D)), atol=1e-15, rtol=0)
    ed.shift(torch.ones(2, 2, dtype=D))
    torch.testing.assert_close(ed.weight, torch.tensor([[1.5, 1.0], [2.0, 1.0]], dtype=D), atol=1e-15, rtol=0)
    # next edit from the shifted W, C kept: F = C e1 = e1/2, S = 3/2, G = e1/3; W += (v - W e1) e1^T / 3
    ed.edit(E1, v)
    torch.testing.assert_close(ed.weight, torch.tensor([[1.5 - 0.5 / 3, 1.0], [2.0, 1.0]], dtype=D),
                               atol=1e-15, rtol=0)


def test_sphere_by_hand_removes_the_top_direction():
    # rows of W: e1, e1, e2 -> A^T A / 3 = diag(2/3, 1/3); beta = 0.5 keeps 0 leading directions, +1: U = e1
    W0 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=D)

    class Fixed:  # an editor without `project`: Sphere wraps it from outside (shift)
        def __init__(self):
            self.weight = W0.clone()

        def edit(self, K, V):
            self.weight += torch.ones(3, 2, dtype=D)
            return torch.ones(3, 2, dtype=D)

        def shift(self, delta):
            self.weight += delta

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    ed = Sphere(Fixed(), beta=0.5, alpha=0.5)
    delta = ed.edit(torch.zeros(2, 1, dtype=D), torch.zeros(3, 1, dtype=D))
    want = torch.tensor([[0.5, 1.0]] * 3, dtype=D)
    torch.testing.assert_close(delta, want, atol=1e-15, rtol=0)
    torch.testing.assert_close(ed.weight, W0 + want, atol=1e-15, rtol=0)


# --- the classes against the pure functions ------------------------------------------------------------


def test_rome_class_is_the_function_with_C0_plus_lam_I_column_by_column():
    W0, K0, ((K, V), _, _) = _data()
    C0 = K0 @ K0.T
    ed = ROME(W0, C0, lam=0.5)
    delta = ed.edit(K, V)
    C = C0 + 0.5 * torch.eye(8, dtype=D)
    W1 = W0 + rome(W0, K[:, 0], V[:, 0], C)
    W2 = W1 + rome(W1, K[:, 1], V[:, 1], C)
    torch.testing.assert_close(ed.weight, W2, atol=1e-12, rtol=0)
    torch.testing.assert_close(delta, W2 - W0, atol=1e-12, rtol=0)
    assert not torch.allclose(W0 + rome(W0, K[:, 0], V[:, 0], C0), W1)  # lam matters here
    torch.testing.assert_close(ed.weight @ K[:, 1], V[:, 1], atol=1e-10, rtol=0)  # the last pair is exact


def test_memit_and_alphaedit_classes_carry_their_state():
    W0, K0, reqs = _data()
    C0 = K0 @ K0.T + torch.eye(8, dtype=D)  # 5 preserved keys in 8 dims: MEMIT needs the rest regularised
    m, a = MEMIT(W0, C0, lam=2.0), AlphaEdit(W0, K0, threshold=1e-8, l2=0.5)
    Wm, Wa, prev = W0.clone(), W0.clone(), []
    for K, V in reqs:
        Wm = Wm + memit(Wm, K, V, C0, lam=2.0)
        Wa = Wa + alphaedit(Wa, K, V, K0, K_prev=torch.cat(prev, 1) if prev else None, threshold=1e-8, l2=0.5)
        prev.append(K)
        m.edit(K, V)
        a.edit(K, V)
    torch.testing.assert_close(m.weight, Wm, atol=1e-12, rtol=0)
    torch.testing.assert_close(a.weight, Wa, atol=1e-12, rtol=0)
    assert a.K_prev.shape == (8, 6)
    assert float(((a.weight - W0) @ K0).abs().max()) < 1e-10  # preserved keys untouched across edits


def test_rlsedit_returns_the_change_and_the_old_name_returns_W():
    W0, K0, reqs = _data()
    new, old = RLSEdit(W0, K0, lam=0.7, mu=1.3), RLSEditor(W0, K0, 0.7, 1.3)
    for K, V in reqs:
        before = new.weight.clone()
        delta = new.edit(K, V)
        W = old.edit(K, V)
        assert W is old.W and torch.equal(W, new.weight)
        torch.testing.assert_close(delta, new.weight - before, atol=1e-14, rtol=0)
    from poise.edit.linear import RLSEditor as from_linear

    assert from_linear is RLSEditor and issubclass(RLSEditor, RLSEdit)


def test_sphere_wraps_every_update_with_the_weight_before_it():
    W0, K0, ((K, V), _, _) = _data(d_v=10)
    C0 = K0 @ K0.T + torch.eye(8, dtype=D)
    ed = Sphere(MEMIT(W0, C0, lam=1.0), beta=0.3, alpha=1.0)
    delta = ed.edit(K, V)
    want = sphere_project(W0, memit(W0, K, V, C0, lam=1.0), beta=0.3, alpha=1.0)
    torch.testing.assert_close(delta, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(ed.weight, W0 + want, atol=1e-12, rtol=0)
    r = Sphere(ROME(W0, C0), alpha=0.0)  # alpha = 0: the identity
    torch.testing.assert_close(r.edit(K, V), ROME(W0, C0).edit(K, V), atol=1e-12, rtol=0)


def test_no_edit_is_zero_and_moves_only_by_shift():
    W0, _, ((K, V), _, _) = _data()
    ed = NoEdit(W0)
    assert torch.equal(ed.edit(K, V), torch.zeros_like(W0)) and torch.equal(ed.weight, W0)
    ed.shift(torch.ones_like(W0))
    assert torch.equal(ed.weight, W0 + 1)


@pytest.mark.parametrize("name", [n for n in _registry.names("editor") if n != "sphere"] + ["sphere"])
def test_every_editor_state_dict_round_trip_and_protocol(name):
    W0, K0, reqs = _data(n0=12 if name == "rlsedit" else 5)  # rlsedit's default lam = 0 needs K0 K0^T full rank
    C0 = K0 @ K0.T + torch.eye(8, dtype=D)
    ed = make_editor(name if name != "sphere" else "alphaedit", W0, K0, C0, sphere=name == "sphere")
    assert isinstance(ed, Editor)
    ed.edit(*reqs[0])
    state = ed.state_dict()
    first = ed.edit(*reqs[1]).clone()
    after = ed.weight.clone()
    ed.edit(*reqs[2])
    ed.load_state_dict(state)
    assert torch.equal(ed.edit(*reqs[1]), first) and torch.equal(ed.weight, after)
    with pytest.raises(ValueError, match="state has keys"):
        ed.load_state_dict({**state, "extra": 1})


# --- defaults, listing and the factory ---------------------------------------------------------------


def test_defaults_live_in_the_signatures():
    assert editor_params("rome") == {"lam": 1e-3}
    assert editor_params("memit") == {"lam": 1.0}
    assert editor_params("alphaedit") == {"threshold": 1e-2, "l2": 1.0}
    assert editor_params("rlsedit") == {"lam": 0.0, "mu": 1.0}  # the authors' form (lambda_reg 0, mu_reg 1)
    assert editor_params("sphere") == {"beta": 0.5, "alpha": 0.5}
    assert editor_params("none") == {}
    for n in _registry.names("editor"):
        cls = _registry.get("editor", n)
        ps = list(inspect.signature(cls).parameters)
        lead = ["editor"] if cls.wrapper else [p for p in ps if p in TENSOR_ARGS]
        assert ps[: len(lead)] == lead and lead, n  # tensors (or the wrapped editor) first
        summary = inspect.getdoc(cls).split("\n")[0]
        assert summary.endswith(".") and ("arXiv" in summary or "ICLR" in summary or n == "none"), n


def test_make_editor_checks_names_and_arguments():
    W0, K0, _ = _data()
    with pytest.raises(ValueError, match=r"unknown editor 'memitt'; valid choices: alphaedit, memit, none, rlsedit"):
        make_editor("memitt", W0, K0)
    with pytest.raises(ValueError, match=r"unknown argument 'mu' of editor 'memit'; valid: lam"):
        make_editor("memit", W0, K0, mu=1.0)
    with pytest.raises(ValueError, match=r"unknown argument 'lam' of editor 'sphere'; valid: beta, alpha"):
        make_editor("memit", W0, K0, sphere={"lam": 1.0})
    with pytest.raises(ValueError, match="'sphere' wraps another editor"):
        make_editor("sphere", W0, K0)
    with pytest.raises(ValueError, match="editor 'alphaedit' needs the tensor K0"):
        make_editor("alphaedit", W0)
    with pytest.raises(ValueError, match="lam=-1.0 must be >= 0"):
        make_editor("memit", W0, K0, lam=-1.0)
    m = make_editor("memit", W0, K0, lam=4.0)  # C0 = K0 K0^T from K0
    assert isinstance(m, MEMIT) and m.lam == 4.0 and torch.equal(m.C0, K0 @ K0.T)
    with pytest.raises(ValueError, match="lam=0 needs K0 K0\\^T positive definite"):
        make_editor("rlsedit", W0, K0)  # the default lam = 0 and 5 anchor keys in 8 dims
    s = make_editor("rlsedit", W0, K0, sphere={"alpha": 1.0}, lam=0.5)
    assert isinstance(s, Sphere) and isinstance(s.editor, RLSEdit) and (s.beta, s.alpha) == (0.5, 1.0)


# --- refusals leave the editor bit-identical (issue 19) --------------------------------------------------

NAN, INF = float("nan"), float("inf")


def _snapshot(ed):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in ed.state_dict().items()}


def _same(ed, snap):
    st = ed.state_dict()
    assert set(st) == set(snap)
    for k, v in st.items():
        assert torch.equal(v, snap[k]) if isinstance(v, torch.Tensor) else v == snap[k], k


def _editor(name, sphere=False):
    W0, K0, reqs = _data(n0=12 if name == "rlsedit" else 5)
    C0 = K0 @ K0.T + torch.eye(8, dtype=D)
    ed = make_editor(name, W0, K0, C0, sphere=sphere)
    ed.edit(*reqs[0])  # some state to keep (AlphaEdit's K_prev, RLSEdit's C and n_edits)
    return ed, reqs


@pytest.mark.parametrize("sphere", [False, True])
@pytest.mark.parametrize("name", [n for n in _registry.names("editor") if n != "sphere"])
def test_a_non_finite_key_value_or_shift_is_refused_and_changes_nothing(name, sphere):
    ed, reqs = _editor(name, sphere)
    K, V = (x.clone() for x in reqs[1])
    snap = _snapshot(ed)
    K[4, 1] = NAN  # before: ROME and AlphaEdit wrote NaN into W (and AlphaEdit kept the key)
    with pytest.raises(ValueError, match=r"K has 1 non-finite entry \(the first at index \(4, 1\): nan\)"):
        ed.edit(K, V)
    _same(ed, snap)
    with pytest.raises(ValueError, match="V has 12 non-finite entries"):
        ed.edit(reqs[1][0], reqs[1][1] * INF)  # V is 6 x 2, no entry 0: every one inf
    _same(ed, snap)
    bad = torch.zeros(6, 8, dtype=D)
    bad[0, 0] = NAN
    with pytest.raises(ValueError, match="delta has 1 non-finite entry"):
        ed.shift(bad)
    _same(ed, snap)
    ed.edit(*reqs[1])  # and it still works


@pytest.mark.parametrize("name", [n for n in _registry.names("editor") if editor_params(n)])
def test_every_hyperparameter_must_be_finite_and_in_range(name):
    W0, K0, _ = _data(n0=12)
    C0 = K0 @ K0.T + torch.eye(8, dtype=D)
    for param in editor_params(name):
        for bad in (NAN, INF, -1.0):
            kw = {param: bad}
            with pytest.raises(ValueError, match=rf"{param}={bad!r} must be .*finite"):
                if name == "sphere":
                    make_editor("memit", W0, K0, C0, sphere=kw)
                else:
                    make_editor(name, W0, K0, C0, **kw)
        with pytest.raises(TypeError, match=rf"{param}='1' must be a real number"):
            if name == "sphere":
                make_editor("memit", W0, K0, C0, sphere={param: "1"})
            else:
                make_editor(name, W0, K0, C0, **{param: "1"})


def test_non_finite_construction_tensors_are_refused():
    W0, K0, _ = _data(n0=12)
    with pytest.raises(ValueError, match="W0 has 1 non-finite entry"):
        MEMIT(W0.index_put((torch.tensor([1]), torch.tensor([2])), torch.tensor(INF, dtype=D)), torch.eye(8, dtype=D))
    with pytest.raises(ValueError, match="K0 has 96 non-finite entries"):
        make_editor("memit", W0, K0 * NAN)  # before C0 = K0 K0^T is formed from it
    with pytest.raises(ValueError, match="C0 has 64 non-finite entries"):
        ROME(W0, torch.eye(8, dtype=D) * NAN)
    with pytest.raises(ValueError, match="K0 has 96 non-finite entries"):
        RLSEdit(W0, K0 * NAN)  # before: torch.linalg.eigh's "failed to converge"
    with pytest.raises(ValueError, match=r"lam=1e\+200: lam\^2 overflows float64"):
        RLSEdit(W0, K0, lam=1e200)  # before: OverflowError from lam**2


def test_rome_batch_is_all_or_nothing():
    # column 0 is a fine edit, column 1 a zero key: before, column 0 was written and then the error came
    ed = ROME(torch.zeros(2, 2, dtype=D))
    snap = _snapshot(ed)
    K = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=D)
    with pytest.raises(ValueError, match="k is the zero vector"):
        ed.edit(K, torch.ones(2, 2, dtype=D))
    _same(ed, snap)
    with pytest.raises(ValueError, match=r"C is singular \(numerical rank 1 of d_k=2\)"):
        ROME(torch.zeros(2, 2, dtype=D), torch.diag(torch.tensor([1.0, 0.0], dtype=D)), lam=0.0).edit(
            torch.tensor([0.0, 1.0], dtype=D), torch.ones(2, dtype=D))


def test_singular_memit_and_alphaedit_are_refused_with_the_weight_unchanged():
    W0, K0, reqs = _data()
    m = MEMIT(W0, K0 @ K0.T, lam=0.0)  # lam = 0: A = K K^T, 2 keys in 8 dimensions (before: a raw Cholesky error)
    snap = _snapshot(m)
    with pytest.raises(ValueError, match=r"lam=0.0; numerical rank 2 of d_k=8; 2 keys\): give lam > 0"):
        m.edit(*reqs[0])
    _same(m, snap)
    with pytest.raises(ValueError, match=r"l2=0.0 makes M P \+ l2 I singular \(P projects onto 3 of d_k=8"):
        AlphaEdit(W0, K0, threshold=1e-8, l2=0.0)  # refused at construction: no editor to leave half-made
    with pytest.warns(UserWarning, match="null space of K0 K0\\^T empty"):
        AlphaEdit(W0, torch.eye(8, dtype=D), threshold=0.5)  # every eigenvalue is 1: every edit would be zero


def test_rlsedit_refusals_keep_W_C_and_n_edits():
    W0, K0, _ = _data(n0=5)
    with pytest.raises(ValueError, match=r"numerically singular \(lam=1e-200, lam\^2 = 0;"):
        RLSEdit(W0, K0, lam=1e-200)  # lam^2 underflows: A = K0 K0^T of rank 5 (before: NaN edits later)
    for dt, big in ((torch.float32, 1e20), (D, 1e160)):
        ed = RLSEdit(torch.zeros(2, 2, dtype=dt), lam=1.0)
        ed.edit(E1.to(dt), torch.tensor([1.0, 2.0], dtype=dt))
        snap = _snapshot(ed)
        # K^T C K overflows: before, S = inf gave G = F / inf = 0, a silent non-edit that still counted
        with pytest.raises(ValueError, match=r"RLSEdit step \(C K or K\^T C K\) would overflow"):
            ed.edit(torch.tensor([big, 0.0], dtype=dt), torch.tensor([1.0, 2.0], dtype=dt))
        _same(ed, snap)
        assert ed.n_edits == 1
        # lam = 1e-3: C = 1e6 I along e2, so K = 1e-3 e2 gives F = 1e3 e2, S = 2, G = 500 e2 and the change
        # (V - W K) G^T = 500 * max / 10 = 50 max: finite inputs, an overflowing step
        ed = RLSEdit(torch.zeros(2, 2, dtype=dt), lam=1e-3)
        ed.edit(E1.to(dt), torch.tensor([1.0, 2.0], dtype=dt))
        snap = _snapshot(ed)
        with pytest.raises(ValueError, match="RLSEdit step would overflow"):
            ed.edit(torch.tensor([0.0, 1e-3], dtype=dt), torch.tensor([torch.finfo(dt).max / 10, 0.0], dtype=dt))
        _same(ed, snap)
        ed.edit(torch.tensor([0.0, 1e-3], dtype=dt), torch.tensor([1.0, 0.0], dtype=dt))  # a sane one still works
