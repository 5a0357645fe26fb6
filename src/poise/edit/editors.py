"""Editors: the closed forms of :mod:`poise.edit.linear` behind one interface, with their defaults.

An editor owns a copy of one layer's weight ``W`` (``[d_v, d_k]``, the ``v = W k`` convention of
:mod:`poise.edit.linear`) and whatever state its update rule carries from edit to edit (AlphaEdit's
earlier keys, RLSEdit's inverse ``C``). Every editor has the same calls::

    delta = editor.edit(K, V)   # apply a batch of edits (keys and values as columns); returns the applied change
    editor.shift(delta)         # the weight changed by something else (an unlearning step): carry on from it
    editor.weight               # the current weight (the editor's own tensor: clone it to keep a snapshot)
    editor.state_dict() / editor.load_state_dict(state)

The constructors hold the defaults, and only they do: ``inspect.signature(ROME)`` shows them. Their
first arguments are the tensors, always named ``W0`` (the weight before any edit), ``K0`` (preserved
keys as columns) and ``C0`` (their second moment ``K0 K0^T``); :data:`TENSOR_ARGS` lists these names.
``Sphere(editor, beta, alpha)`` wraps any editor. :func:`make_editor` builds one by registry name
(kind ``"editor"``) with its arguments checked against the constructor's signature.

Refusals. Every tensor (``W0``, ``K0``, ``C0``, the keys and values of an edit, a ``shift``) must be
finite and every hyperparameter a finite number in its range; a system that cannot be solved (ROME
with a zero key or a singular ``C``, MEMIT's ``lam C0 + K K^T`` singular, AlphaEdit with ``l2 = 0`` and
a partial null space, RLSEdit's anchor matrix singular) and an update that would overflow raise
``ValueError`` naming the argument, its value and what is valid. A refused ``edit`` or ``shift``
leaves the editor exactly as it was (weight and state bit for bit); a refused constructor builds
nothing. (AlphaEdit with an empty null space is not singular but makes every edit zero: it warns.)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from poise import _registry
from poise._registry import register
from poise.edit.linear import (
    _check,
    _finite,
    _null_basis,
    _number,
    _square,
    alphaedit,
    memit,
    rome,
    sphere_project,
)

__all__ = ["AlphaEdit", "Editor", "LinearEditor", "MEMIT", "NoEdit", "RLSEdit", "RLSEditor", "ROME", "Sphere",
           "TENSOR_ARGS", "editor_params", "make_editor"]

TENSOR_ARGS = ("W0", "K0", "C0")
"""The names of the tensor arguments of every editor constructor (not hyperparameters)."""

Project = Callable[[Tensor, Tensor], Tensor]
"""``project(W, delta) -> delta'``: maps an update, given the weight before it, to the update applied."""


@runtime_checkable
class Editor(Protocol):
    """What the edit-stream study (and any loop) needs from an editor."""

    @property
    def weight(self) -> Tensor: ...

    def edit(self, K: Tensor, V: Tensor) -> Tensor:
        """Apply the edits ``W k_i ~ v_i`` (``K [d_k, n]``, ``V [d_v, n]``); return the change applied to ``W``."""
        ...

    def shift(self, delta: Tensor) -> None:
        """The weight changed by ``delta`` outside the editor; the next edit starts from ``W + delta``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def _columns(K: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    return (K[:, None], V[:, None]) if K.dim() == 1 and V.dim() == 1 else (K, V)


def _nonneg(**values: float) -> None:
    """Each value a finite real ``>= 0``, else ``ValueError`` naming it (``TypeError`` for a non-number)."""
    for k, x in values.items():
        _number(k, x)


def _fits(W: Tensor, delta: Tensor) -> bool:
    """Whether ``W + delta`` cannot overflow: ``max|W| + max|delta|`` below half the dtype's largest value."""
    big = torch.finfo(W.dtype).max / 2
    return float(torch.linalg.vector_norm(W, math.inf)) + float(torch.linalg.vector_norm(delta, math.inf)) < big


def _overflow(what: str, dtype: torch.dtype) -> ValueError:
    return ValueError(f"{what} would overflow {dtype} (finite inputs, but a near-singular system or very large keys): "
                      "nothing was changed; regularise more or rescale the keys")


class LinearEditor:
    """Base of the built-in editors: holds ``W``, checks shapes, applies updates, keeps state.

    A subclass implements ``_edit(K, V, project)``: compute its update from ``self.W`` and its
    state, pass it through ``project(self.W, delta)`` (the identity unless a wrapper such as
    :class:`Sphere` asks otherwise) and add the result to ``self.W``; return the sum added.
    """

    wrapper: ClassVar[bool] = False
    _state: ClassVar[tuple[str, ...]] = ()  # attributes, besides W, that change from edit to edit

    def __init__(self, W0: Tensor):
        if W0.dim() != 2 or not W0.is_floating_point():
            raise ValueError(f"W0 must be a 2-D floating tensor [d_v, d_k], got {tuple(W0.shape)} {W0.dtype}")
        _finite(W0, "W0")
        self.W = W0.detach().clone()

    @property
    def weight(self) -> Tensor:
        """The current weight (this editor's own tensor, updated in place)."""
        return self.W

    def edit(self, K: Tensor, V: Tensor, *, project: Project | None = None) -> Tensor:
        """Apply the edits (``K [d_k, n]``, ``V [d_v, n]``, or one key ``[d_k]`` and value ``[d_v]``);
        return the change added to :attr:`weight`. ``project(W, delta)`` maps each update before
        it is added (what :class:`Sphere` passes). Bad shapes or dtypes, non-finite keys or values, a
        singular system or an overflowing update raise ``ValueError`` and leave the editor unchanged."""
        K, V = _columns(K, V)
        _check(self.W, K, V)
        return self._edit(K, V, project)

    def _edit(self, K: Tensor, V: Tensor, project: Project | None) -> Tensor:
        raise NotImplementedError

    def _apply(self, delta: Tensor, project: Project | None, W: Tensor | None = None) -> Tensor:
        """``W += project(W, delta)`` (``W``: this editor's weight unless given) after checking the result
        stays finite; returns the projected update."""
        W = self.W if W is None else W
        if project is not None:
            delta = project(W, delta)
            if delta.shape != W.shape:
                raise ValueError(f"project returned shape {tuple(delta.shape)}; the weight is {tuple(W.shape)}")
            _finite(delta, "the projected update")
        if not _fits(W, delta):
            raise _overflow(f"the {type(self).__name__} update", W.dtype)
        W += delta
        return delta

    def shift(self, delta: Tensor) -> None:
        """``W <- W + delta`` for a change made outside the editor (the editor's other state is kept).
        A non-finite ``delta`` (or one that would overflow ``W``) raises ``ValueError``, ``W`` unchanged."""
        if delta.shape != self.W.shape:
            raise ValueError(f"delta has shape {tuple(delta.shape)}; the weight is {tuple(self.W.shape)}")
        delta = delta.to(self.W.dtype)
        _finite(delta, "delta")
        if not _fits(self.W, delta):
            raise _overflow("W + delta", self.W.dtype)
        self.W += delta

    def state_dict(self) -> dict[str, Any]:
        """The weight and the state that edits change (tensors cloned)."""
        out = {"W": self.W.clone()}
        for k in self._state:
            x = getattr(self, k)
            out[k] = x.clone() if isinstance(x, Tensor) else x
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (from an editor built with the same arguments)."""
        want = {"W", *self._state}
        if set(state) != want:
            raise ValueError(f"{type(self).__name__} state has keys {sorted(state)}; expected {sorted(want)}")
        if state["W"].shape != self.W.shape:
            raise ValueError(f"state W has shape {tuple(state['W'].shape)}; this editor's is {tuple(self.W.shape)}")
        self.W.copy_(state["W"])  # the same tensor: references to ``weight`` stay live
        for k in self._state:
            x = state[k]
            setattr(self, k, x.detach().clone() if isinstance(x, Tensor) else x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d_v={self.W.shape[0]}, d_k={self.W.shape[1]})"


@register("editor", "none")
class NoEdit(LinearEditor):
    """The unedited baseline: every edit is a zero update (W moves only by shift)."""

    def __init__(self, W0: Tensor):
        super().__init__(W0)

    def _edit(self, K: Tensor, V: Tensor, project: Project | None) -> Tensor:
        return torch.zeros_like(self.W)


@register("editor", "rome")
class ROME(LinearEditor):
    r"""ROME: one rank-one edit per key, each written exactly (arXiv 2202.05262, eq. 2).

    For each column ``(k, v)`` in turn: ``W <- W + (v - W k)(C^{-1} k)^T / ((C^{-1} k)^T k)`` with
    ``C = C0 + lam I`` (:func:`~poise.edit.linear.rome`); ``C0`` the preserved keys' second moment
    (None: ``C`` is the identity, the minimum Frobenius-norm edit), ``lam`` keeps ``C`` invertible.
    A batch is all or nothing: a zero key, a singular ``C`` (``lam = 0`` with a singular ``C0``) or
    an overflow in any column raises ``ValueError`` before the weight changes.
    """

    def __init__(self, W0: Tensor, C0: Tensor | None = None, lam: float = 1e-3):
        super().__init__(W0)
        _nonneg(lam=lam)
        d_k = self.W.shape[1]
        if C0 is None:
            self.C = None
        else:
            _square(C0, self.W, "C0")
            self.C = C0 + lam * torch.eye(d_k, dtype=C0.dtype, device=C0.device)
            _finite(self.C, "C0 + lam I")

    def _edit(self, K: Tensor, V: Tensor, project: Project | None) -> Tensor:
        W = self.W.clone()  # each column edits this copy; the editor's weight changes only if every column succeeds
        total = torch.zeros_like(self.W)
        for i in range(K.shape[1]):
            total += self._apply(rome(W, K[:, i], V[:, i], self.C), project, W)
        self.W.copy_(W)
        return total


@register("editor", "memit")
class MEMIT(LinearEditor):
    r"""MEMIT: one least-squares update per batch, kept small on the preserved keys (arXiv 2210.07229, eq. 14).

    ``Delta = R K^T (lam C0 + K K^T)^{-1}``, ``R = V - W K`` (:func:`~poise.edit.linear.memit`);
    ``lam`` is the authors' ``mom2_update_weight``. ``lam C0 + K K^T`` must be positive definite
    (``lam > 0`` with ``C0`` positive definite always is): otherwise ``ValueError``, weight unchanged.
    """

    def __init__(self, W0: Tensor, C0: Tensor, lam: float = 1.0):
        super().__init__(W0)
        _nonneg(lam=lam)
        _square(C0, self.W, "C0")
        self.C0, self.lam = C0, lam

    def _edit(self, K: Tensor, V: Tensor, project: Project | None) -> Tensor:
        return self._apply(memit(self.W, K, V, self.C0, lam=self.lam), project)


@register("editor", "alphaedit")
class AlphaEdit(LinearEditor):
    r"""AlphaEdit: each update projected onto the preserved keys' null space (arXiv 2410.02355).

    ``Delta = R K^T P (M P + l2 I)^{-1}``, ``M = K K^T + K_p K_p^T`` over the keys of every earlier
    edit of this editor (``K_prev``, kept here), ``P`` the projector onto the eigenvectors of
    ``K0 K0^T`` below ``threshold`` (:func:`~poise.edit.linear.alphaedit`). The constructor refuses
    (``ValueError``) ``l2 = 0`` with a null space smaller than the key space (singular), and warns
    (``UserWarning``) when the null space is empty (every eigenvalue of ``K0 K0^T`` at or above
    ``threshold``): every edit is then zero.
    """

    _state = ("K_prev",)

    def __init__(self, W0: Tensor, K0: Tensor, threshold: float = 1e-2, l2: float = 1.0):
        super().__init__(W0)
        _nonneg(threshold=threshold, l2=l2)
        _check(self.W, K0, name="K0")
        _null_basis(K0, threshold, l2)  # l2 = 0 with a partial null space: refused now; an empty one: a warning
        self.K0, self.threshold, self.l2 = K0, threshold, l2
        self._K_prev: list[Tensor] = []

    @property
    def K_prev(self) -> Tensor | None:
        """The keys of every earlier edit as columns ``[d_k, n]`` (None before the first)."""
        return torch.cat(self._K_prev, 1) if self._K_prev else None

    @K_prev.setter
    def K_prev(self, K: Tensor | None) -> None:
        self._K_prev = [] if K is None else [K]

    def _edit(self, K: Tensor, V: Tensor, project: Project | None) -> Tensor:
        delta = alphaedit(self.W, K, V, self.K0, K_prev=self.K_prev, threshold=self.threshold, l2=self.l2)
        out = self._apply(delta, project)
        self._K_prev.append(K)  # only once the edit is made
        return out


def _anchor_inverse(K0: Tensor | None, mu: float, d_k: int) -> Tensor:
    """``(mu^2 K0 K0^T)^{-1}``, RLSEdit's start at ``lam = 0``, or a ``ValueError`` saying why it does not exist.

    Positive definite means here: every eigenvalue of ``K0 K0^T`` above ``d_k * eps`` times the largest
    (``eps`` the dtype's machine epsilon), the rank test of ``numpy.linalg.matrix_rank``."""
    if K0 is None or mu == 0:
        got = "None" if K0 is None else "given"
        raise ValueError(f"RLSEdit with lam=0 needs anchor keys K0 and mu > 0 (got K0={got}, mu={mu}): "
                         "A = mu^2 K0 K0^T must be invertible; pass K0 and mu > 0, or lam > 0")
    M = K0 @ K0.T
    evals = torch.linalg.eigvalsh(M)
    tol = d_k * torch.finfo(M.dtype).eps * float(evals[-1].clamp_min(0))
    rank = int((evals > tol).sum())
    if rank < d_k or not float(evals[-1]) > 0:
        raise ValueError(f"RLSEdit with lam=0 needs K0 K0^T positive definite, but it has rank {rank} of d_k={d_k} "
                         f"({K0.shape[1]} anchor keys; smallest eigenvalue {float(evals[0]):.3g}, largest "
                         f"{float(evals[-1]):.3g}): give at least d_k anchor keys that span the key space, or lam > 0")
    A = mu**2 * M
    _finite(A, f"mu^2 K0 K0^T (mu={mu!r})")
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise ValueError(f"RLSEdit with lam=0: mu^2 K0 K0^T (mu={mu!r}) is not positive definite in {A.dtype}: "
                         "give lam > 0, or better-conditioned anchor keys")
    return _finite_inverse(torch.cholesky_inverse(L), 0.0, mu)


def _ridge_inverse(K0: Tensor | None, lam: float, mu: float, W0: Tensor) -> Tensor:
    """``(lam^2 I + mu^2 K0 K0^T)^{-1}`` for ``lam > 0``, or a ``ValueError`` when it is not finite or is
    numerically singular (its smallest eigenvalue at or below ``d_k eps`` times its largest)."""
    d_k = W0.shape[1]
    A = lam**2 * torch.eye(d_k, dtype=W0.dtype, device=W0.device)
    if K0 is not None:
        A = A + mu**2 * (K0 @ K0.T)
    _finite(A, f"A = lam^2 I + mu^2 K0 K0^T (lam={lam!r}, mu={mu!r})")
    evals = torch.linalg.eigvalsh(A)
    if not float(evals[0]) > d_k * torch.finfo(A.dtype).eps * float(evals[-1]):
        raise ValueError(f"RLSEdit: A = lam^2 I + mu^2 K0 K0^T is numerically singular (lam={lam!r}, lam^2 = "
                         f"{lam * lam:.3g}; smallest eigenvalue {float(evals[0]):.3g}, largest "
                         f"{float(evals[-1]):.3g}): "
                         "give a larger lam (or a smaller mu), or anchor keys that span the key space")
    return _finite_inverse(torch.linalg.inv(A), lam, mu)


def _finite_inverse(C: Tensor, lam: float, mu: float) -> Tensor:
    if not bool(torch.isfinite(C).all()):
        raise ValueError(f"RLSEdit: C = A^-1 is not finite in {C.dtype} (lam={lam!r}, mu={mu!r}): give a larger lam "
                         "or rescale the anchor keys")
    return C


@register("editor", "rlsedit")
class RLSEdit(LinearEditor):
    r"""RLSEdit: sequential edits by recursive least squares, cost flat in the number of edits (arXiv 2601.15686).

    Minimises ``sum_s ||W K_s - V_s||^2 + lam^2 ||W - W0||^2 + mu^2 ||(W - W0) K0||^2`` over the
    edits so far (``lam`` keeps ``W`` near the pre-edit weights, ``mu`` keeps the anchor keys'
    outputs). With ``C = A^{-1}``, ``A = lam^2 I + mu^2 K0 K0^T + sum_s K_s K_s^T``, each edit is
    the Woodbury step ``F = C K``, ``S = I + K^T F``, ``C <- C - F S^{-1} F^T``,
    ``W <- W + (V - W K)(C K)^T``: ``O(d_k^2 u + u^3)`` for ``u`` keys (Euphoria040201/RLSEdit).
    A :meth:`shift` moves ``W`` and keeps ``C``; so does a ``project`` that changes the update
    (:class:`Sphere`): the next step's residual ``V - W K`` starts from the weight actually held.

    The defaults are the authors' form (every hparam file of Euphoria040201/RLSEdit: ``lambda_reg:
    0``, ``mu_reg: 1``): ``lam = 0``, so only the anchor keys hold ``W`` back and the first request
    equals MEMIT's with ``lam = mu^2`` (``mu^2`` plays MEMIT's ``mom2_update_weight`` when ``K0 K0^T``
    is the keys' mean second moment). ``lam = 0`` needs ``K0 K0^T`` positive definite (at least
    ``d_k`` anchor keys spanning the key space); otherwise ``ValueError`` says so: give more anchor
    keys or ``lam > 0``. A ``lam > 0`` so small that ``A`` is numerically singular (``lam^2`` at or
    below ``d_k eps`` times its largest eigenvalue) is refused the same way. An edit that cannot be
    made (``I + K^T C K`` not positive definite, an overflowing step) raises ``ValueError`` before
    ``W``, ``C`` or ``n_edits`` change.
    """

    _state = ("C", "n_edits")
    _return_delta: ClassVar[bool] = True

    def __init__(self, W0: Tensor, K0: Tensor | None = None, lam: float = 0.0, mu: float = 1.0):
        super().__init__(W0)
        _nonneg(lam=lam, mu=mu)
        for name, x in (("lam", lam), ("mu", mu)):
            if float(x) >= 1e154:  # x^2 would overflow float64
                raise ValueError(f"{name}={x!r}: {name}^2 overflows float64; give {name} < 1e154")
        d_k = W0.shape[1]
        if K0 is not None:
            _check(W0, K0, name="K0")
        if lam > 0:
            self.C = _ridge_inverse(K0, lam, mu, W0)
        else:
            self.C = _anchor_inverse(K0, mu, d_k)
        self.n_edits = 0

    def _edit(self, K: Tensor, V: Tensor, project: Project | None) -> Tensor:
        F = self.C @ K
        S = torch.eye(K.shape[1], dtype=K.dtype, device=K.device) + K.T @ F
        if not (bool(torch.isfinite(F).all()) and bool(torch.isfinite(S).all())):
            raise _overflow("the RLSEdit step (C K or K^T C K)", K.dtype)
        L, info = torch.linalg.cholesky_ex(S)
        if int(info) != 0:
            raise ValueError(f"RLSEdit: I + K^T C K is not positive definite (after {self.n_edits} edits; C has lost "
                             "definiteness to rounding or overflow): give a larger lam or rescale the keys")
        G = torch.cholesky_solve(F.T, L).T  # F S^{-1}, which is also the new C K
        # nothing changes unless the whole step stays finite: |W + R G^T| <= max|W| + max_i ||R_i|| max_j ||G_j||
        # (Cauchy-Schwarz, every partial sum too), and the same for C - G F^T
        R = V - self.W @ K
        if not (bool(torch.isfinite(G).all()) and bool(torch.isfinite(R).all())):
            raise _overflow("the RLSEdit step", K.dtype)
        big = torch.finfo(K.dtype).max  # C gets a quarter of it: C + C^T is formed when re-symmetrising

        def rowmax(X: Tensor) -> float:
            return float(torch.linalg.vector_norm(X, dim=1).max()) if X.numel() else 0.0

        inf = math.inf
        if (float(torch.linalg.vector_norm(self.W, inf)) + rowmax(R) * rowmax(G) >= 0.99 * big
                or float(torch.linalg.vector_norm(self.C, inf)) + rowmax(G) * rowmax(F) >= big / 4):
            raise _overflow("the RLSEdit step", K.dtype)
        if project is None:
            before = self.W.clone() if self._return_delta else None  # one copy of W: the change to return
            self.W.addmm_(R, G.T)  # in place: W is this editor's own copy
            delta = self.W if before is None else self.W - before
        else:
            delta = self._apply(R @ G.T, project)
        self.C.addmm_(G, F.T, alpha=-1.0)  # C <- C - F S^{-1} F^T, in place
        self.n_edits += K.shape[1]
        if self.n_edits % 1000 < K.shape[1]:  # re-symmetrise now and then against rounding drift
            self.C = (self.C + self.C.T) / 2
        return delta


class RLSEditor(RLSEdit):
    """The former name of :class:`RLSEdit`, kept for existing code: its ``edit`` returns the
    editor's weight ``W`` (updated in place) instead of the change, and so skips the copy of ``W``
    that computing the change costs."""

    _return_delta: ClassVar[bool] = False

    def edit(self, K: Tensor, V: Tensor, *, project: Project | None = None) -> Tensor:  # type: ignore[override]
        super().edit(K, V, project=project)
        return self.W


@register("editor", "sphere")
class Sphere:
    r"""SPHERE wrapper: each update of the wrapped editor projected off W's principal directions (ICLR 2026).

    ``delta <- delta (I - alpha U U^T)`` with ``U`` the top eigenvectors of the row-normalised
    ``W^T W / d_v`` covering a ``beta`` share of their energy, plus one
    (:func:`~poise.edit.linear.sphere_project`, PlusLabNLP/SPHERE ``project_B_into_soft_dirs``),
    ``W`` the weight just before that update (for ROME, before each rank-one step). A wrapper:
    ``Sphere(editor, beta=0.5, alpha=0.5)``. An editor whose ``edit`` takes no ``project`` keyword
    is wrapped from outside: its update is projected and the difference handed back by ``shift``.
    """

    wrapper: ClassVar[bool] = True

    def __init__(self, editor: Editor, beta: float = 0.5, alpha: float = 0.5):
        _number("beta", beta, hi=1.0)
        _nonneg(alpha=alpha)
        self.editor, self.beta, self.alpha = editor, beta, alpha

    def _project(self, W: Tensor, delta: Tensor) -> Tensor:
        return sphere_project(W, delta, beta=self.beta, alpha=self.alpha)

    @property
    def weight(self) -> Tensor:
        return self.editor.weight

    def edit(self, K: Tensor, V: Tensor, *, project: Project | None = None) -> Tensor:
        """The wrapped editor's edit with each update projected (then by ``project``, if given)."""
        proj = self._project if project is None else (lambda W, d: project(W, self._project(W, d)))
        if "project" in inspect.signature(self.editor.edit).parameters:
            return self.editor.edit(K, V, project=proj)
        before = self.editor.weight.clone()
        delta = self.editor.edit(K, V)
        out = proj(before, delta)
        self.editor.shift(out - delta)
        return out

    def shift(self, delta: Tensor) -> None:
        self.editor.shift(delta)

    def state_dict(self) -> dict[str, Any]:
        return self.editor.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.editor.load_state_dict(state)

    def __repr__(self) -> str:
        return f"Sphere({self.editor!r}, beta={self.beta}, alpha={self.alpha})"


def _hyper(cls: type) -> dict[str, inspect.Parameter]:
    ps = list(inspect.signature(cls).parameters.values())
    if getattr(cls, "wrapper", False):
        ps = ps[1:]  # the wrapped editor
    return {p.name: p for p in ps if p.name not in TENSOR_ARGS}


def editor_params(name: str) -> dict[str, Any]:
    """The hyperparameters of editor ``name`` and their defaults (tensors and a wrapper's editor left out),
    e.g. ``editor_params("memit") == {"lam": 1.0}``. Unknown names raise ``ValueError`` listing the valid ones."""
    return {k: p.default for k, p in _hyper(_lookup(name)).items()}


def _lookup(name: str) -> type:
    try:
        return _registry.get("editor", name)
    except _registry.UnknownNameError:
        raise ValueError(f"unknown editor {name!r}; valid choices: {', '.join(_registry.names('editor'))}") from None


def _check_params(name: str, cls: type, params: Mapping[str, Any]) -> None:
    valid = _hyper(cls)
    bad = sorted(set(params) - set(valid))
    if bad:
        raise ValueError(f"unknown argument {bad[0]!r} of editor {name!r}; valid: {', '.join(valid) or '(none)'}")


def make_editor(name: str, W0: Tensor, K0: Tensor | None = None, C0: Tensor | None = None, *,
                sphere: Mapping[str, float] | bool | None = None, **params: Any) -> Editor:
    """The editor registered as ``name`` over ``W0``, given the tensors its constructor takes and
    ``params`` (checked against its signature: an unknown key raises ``ValueError`` naming the valid
    ones). ``C0`` defaults to ``K0 K0^T`` when the editor takes ``C0`` and only ``K0`` is given.
    ``sphere``: True or ``{"beta": ..., "alpha": ...}`` wraps the editor in :class:`Sphere`.

    ``make_editor("memit", W0, K0, C0, lam=100.0, sphere={"beta": 0.5})``
    """
    cls = _lookup(name)
    if getattr(cls, "wrapper", False):
        raise ValueError(f"{name!r} wraps another editor: make_editor(<editor>, ..., {name}={{...}}); "
                         f"editors: {', '.join(n for n in _registry.names('editor') if n != name)}")
    _check_params(name, cls, params)
    sig = inspect.signature(cls).parameters
    given = {"W0": W0, "K0": K0, "C0": C0}
    if K0 is not None:
        _finite(K0, "K0")
    if "C0" in sig and C0 is None and K0 is not None:
        given["C0"] = K0 @ K0.T
    kw: dict[str, Any] = {}
    for t in TENSOR_ARGS:
        if t not in sig:
            continue
        if given[t] is None and sig[t].default is inspect.Parameter.empty:
            raise ValueError(f"editor {name!r} needs the tensor {t}")
        if given[t] is not None:
            kw[t] = given[t]
    editor = cls(**kw, **params)
    if sphere is None or sphere is False:
        return editor
    sp = {} if sphere is True else dict(sphere)
    _check_params("sphere", Sphere, sp)
    return Sphere(editor, **sp)
