"""The editor classes against the edit-stream study's former per-name dispatch (``_Editor``): the same
random float64 requests, with an outside ``shift`` between them, give bit-identical weights.

The study now builds its editors with :func:`poise.edit.make_editor`; ``_Editor`` is kept below,
frozen, as the reference (tests/edit/test_editors.py checks the classes on their own)."""

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor

from poise.edit import make_editor
from poise.edit.linear import RLSEditor, alphaedit, memit, rome, sphere_project


class _Editor:
    """The edit-stream study's per-name dispatch as it was before the Editor classes (frozen here
    as the reference they must equal)."""

    def __init__(self, v: Any, W0: Tensor, K0: Tensor, C0: Tensor):
        self.v, self.p = v, dict(v.params)
        self.W, self.K0, self.C0 = W0.clone(), K0, C0
        self.K_prev: list[Tensor] = []
        if v.editor == "rlsedit":
            self.rls = RLSEditor(W0, K0, lam=self.p.get("lam", 1.0), mu=self.p.get("mu", 10.0))
        if v.editor == "rome":
            self.C = C0 + self.p.get("lam", 1e-3) * torch.eye(C0.shape[0], dtype=C0.dtype)

    def _sphere(self, delta: Tensor) -> Tensor:
        if not self.v.sphere:
            return delta
        return sphere_project(self.W, delta, beta=self.p.get("beta", 0.5), alpha=self.p.get("alpha", 0.5))

    def edit(self, K: Tensor, V: Tensor) -> None:
        e = self.v.editor
        if e == "none":
            return
        if e == "rlsedit":
            self.W = self.rls.edit(K, V).clone()
            return
        if e == "rome":
            for i in range(K.shape[1]):
                self.W += self._sphere(rome(self.W, K[:, i], V[:, i], self.C))
            return
        if e == "memit":
            delta = memit(self.W, K, V, self.C0, lam=self.p.get("lam", 100.0))
        else:
            prev = torch.cat(self.K_prev, 1) if self.K_prev else None
            delta = alphaedit(self.W, K, V, self.K0, K_prev=prev, threshold=self.p.get("threshold", 1e-2),
                              l2=self.p.get("l2", 1.0))
            self.K_prev.append(K)
        self.W += self._sphere(delta)

    def shift(self, delta: Tensor) -> None:
        """An outside change of the weight (unlearning) that the editor carries on from."""
        self.W += delta
        if self.v.editor == "rlsedit":
            self.rls.W += delta

D = torch.float64
# d_v, d_k, preserved keys, keys per request; the last is the shape of the study's edited layer
SHAPES = [(6, 8, 5, 3), (16, 32, 40, 4), (12, 10, 9, 1), (64, 256, 300, 10)]
SPHERE_KEYS = ("beta", "alpha")
# the study's hidden defaults where they differ from the classes' (recipes must now give them)
STUDY_DEFAULTS = {"memit": {"lam": 100.0}, "rlsedit": {"lam": 1.0, "mu": 10.0}}
CASES = [
    ("none", False, {}),
    ("rome", False, {}),
    ("rome", False, {"lam": 0.3}),
    ("rome", True, {"beta": 0.3, "alpha": 0.9}),
    ("memit", False, STUDY_DEFAULTS["memit"]),
    ("memit", False, {"lam": 2.5}),
    ("memit", True, {"lam": 100.0, "beta": 0.5, "alpha": 0.5}),
    ("memit", True, {"lam": 100.0}),
    ("alphaedit", False, {}),
    ("alphaedit", False, {"threshold": 0.05, "l2": 0.25}),
    ("alphaedit", True, {"threshold": 0.01, "l2": 1.0, "beta": 0.7, "alpha": 1.0}),
    ("rlsedit", False, STUDY_DEFAULTS["rlsedit"]),
    ("rlsedit", False, {"lam": 0.5, "mu": 2.0}),
    # rlsedit with sphere is left out: _Editor ignored `sphere` for rlsedit (a silent drop, now applied)
]


def _data(d_v, d_k, n0, n, seed):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_v, d_k, generator=g, dtype=D)
    K0 = torch.randn(d_k, n0, generator=g, dtype=D) / max(1, n0) ** 0.5
    reqs = [(torch.randn(d_k, n, generator=g, dtype=D), torch.randn(d_v, n, generator=g, dtype=D)) for _ in range(4)]
    shift = 0.01 * torch.randn(d_v, d_k, generator=g, dtype=D)
    return W0, K0, reqs, shift


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("editor", "sphere", "params"), CASES,
                         ids=[f"{e}{'+sphere' if s else ''}-{i}" for i, (e, s, _) in enumerate(CASES)])
def test_editor_classes_equal_the_old_study_dispatch(shape, editor, sphere, params):
    W0, K0, reqs, shift = _data(*shape, seed=sum(shape))
    C0 = K0 @ K0.T
    old = _Editor(SimpleNamespace(editor=editor, sphere=sphere, params=dict(params)), W0, K0, C0)
    own = {k: x for k, x in params.items() if k not in SPHERE_KEYS}
    sp = {k: x for k, x in params.items() if k in SPHERE_KEYS} if sphere else None
    if sphere and not sp:
        sp = True
    new = make_editor(editor, W0, K0, C0, sphere=sp, **own)
    for i, (K, V) in enumerate(reqs):
        before = new.weight.clone()
        old.edit(K, V)
        delta = new.edit(K, V)
        assert torch.equal(old.W, new.weight), f"request {i}: max diff {(old.W - new.weight).abs().max():.1e}"
        torch.testing.assert_close(delta, new.weight - before, atol=1e-12, rtol=0)
        if i == 1:  # an unlearning step between requests
            old.shift(shift)
            new.shift(shift)
            assert torch.equal(old.W, new.weight)
    assert not torch.equal(new.weight, W0) or editor == "none"
