"""Closed-form editors for one linear map.

Convention, everywhere: a layer maps keys to values as ``v = W k``; ``W`` is ``[d_v, d_k]``
(``nn.Linear.weight``); a set of keys is a matrix with one key per **column**, ``K`` of shape
``[d_k, n]``, and values ``V`` ``[d_v, n]``. Every editor returns the update ``Delta`` (same
shape as ``W``) and never changes its inputs; :func:`apply_delta` writes one into an
``nn.Linear``. Bad shapes, dtypes and singular systems raise ``ValueError`` naming the problem.

Nothing non-finite passes silently: every tensor argument (``W``, keys, values, ``C``/``C0``) must
be finite and every hyperparameter a finite number in its range, else ``ValueError`` naming the
argument, its bad value (or the first bad entry) and what is valid. A system that cannot be solved
(ROME with a zero key or a singular ``C``; MEMIT's ``lam C0 + K K^T`` singular; AlphaEdit with
``l2 = 0``) raises ``ValueError`` saying which argument to change, never a raw
``torch.linalg`` error; so does an update that overflows the dtype. AlphaEdit with an empty null
space (every edit zero) warns.
The same update rules as stateful objects with one interface (``edit``/``shift``) and their
defaults are in :mod:`poise.edit.editors`; ``RLSEditor`` lives there and is re-exported here.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor, nn

__all__ = [
    "RLSEditor",  # noqa: F822 (re-exported from poise.edit.editors by __getattr__ below)
    "alphaedit",
    "apply_delta",
    "collect_keys_values",
    "memit",
    "nullspace_projector",
    "rome",
    "sphere_project",
]


def _finite(t: Tensor, name: str) -> None:
    """``ValueError`` naming ``name``, how many of its entries are NaN/inf and the first of them."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n = int(bad.sum())
        at = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(f"{name} has {n} non-finite entr{'y' if n == 1 else 'ies'} (the first at index {at}: "
                         f"{t[at].item()}): keys, values, weights and covariances must be finite")


def _number(name: str, x: object, *, lo: float = 0.0, lo_open: bool = False, hi: float | None = None) -> float:
    """``x`` as a float if it is a finite real ``>= lo`` (``> lo`` if ``lo_open``) and ``<= hi``; else
    ``ValueError`` (``TypeError`` for a non-number) naming ``name``, the value and the valid range."""
    if isinstance(x, Tensor) and x.numel() == 1 and not x.is_complex():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}={x!r} must be a real number")
    v = float(x)
    if not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)):
        rng = f"{'>' if lo_open else '>='} {lo:g}" if hi is None else f"in [{lo:g}, {hi:g}]"
        raise ValueError(f"{name}={x!r} must be {rng} and finite")
    return v


def _check(W: Tensor, K: Tensor, V: Tensor | None = None, name: str = "K", vname: str = "V") -> None:
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [d_v, d_k], got shape {tuple(W.shape)}")
    if K.dim() != 2 or K.shape[0] != W.shape[1]:
        raise ValueError(f"{name} must be [d_k={W.shape[1]}, n] (keys as columns), got {tuple(K.shape)}")
    if V is not None and (V.dim() != 2 or V.shape != (W.shape[0], K.shape[1])):
        raise ValueError(f"{vname} must be [d_v={W.shape[0]}, n={K.shape[1]}], got {tuple(V.shape)}")
    for t, n in ((K, name), (V, vname)):
        if t is not None and (t.dtype != W.dtype or not t.is_floating_point()):
            raise ValueError(f"{n} has dtype {t.dtype}; W has {W.dtype}: use the same floating dtype")
    for t, n in ((W, "W"), (K, name), (V, vname)):
        if t is not None:
            _finite(t, n)


def _square(C: Tensor, W: Tensor, name: str) -> None:
    d = W.shape[1]
    if C.shape != (d, d):
        raise ValueError(f"{name} must be [d_k, d_k] = {(d, d)}, got {tuple(C.shape)}")
    if C.dtype != W.dtype:
        raise ValueError(f"{name} has dtype {C.dtype}; W has {W.dtype}: use the same floating dtype")
    _finite(C, name)


def _finite_update(delta: Tensor, what: str) -> Tensor:
    """``delta`` if finite, else ``ValueError``: finite inputs gave an overflow (a near-singular system)."""
    if not bool(torch.isfinite(delta).all()):
        raise ValueError(f"the {what} update overflows {delta.dtype} (the inputs are finite, but the system is too "
                         "close to singular or the keys too large): regularise more or rescale the keys")
    return delta


def _rank(M: Tensor) -> int:
    """The numerical rank of a symmetric ``M``: eigenvalues above ``d eps`` times the largest magnitude."""
    ev = torch.linalg.eigvalsh(M)
    return int((ev > M.shape[0] * torch.finfo(M.dtype).eps * float(ev.abs().max())).sum())


def rome(W: Tensor, k: Tensor, v: Tensor, C: Tensor | None = None) -> Tensor:
    r"""ROME's rank-one edit (Meng et al., arXiv 2202.05262, eq. 2):
    ``Delta = (v - W k) (C^{-1} k)^T / ((C^{-1} k)^T k)``, the minimum ``C``-norm change with
    ``(W + Delta) k = v`` exactly. ``k`` ``[d_k]``, ``v`` ``[d_v]``, ``C`` ``[d_k, d_k]`` the key
    covariance (identity if None). Reference: kmeng01/rome ``rome_main.py``.

    ``ValueError`` for: non-finite ``W``, ``k``, ``v`` or ``C``; a zero key (no map sends 0 to
    ``v != 0``); a singular ``C``; a vanishing ``(C^{-1} k)^T k`` (``C`` not positive definite
    along ``k``: ``|(C^{-1} k)^T k| <= d_k eps ||C^{-1} k|| ||k||``)."""
    if k.dim() != 1 or v.dim() != 1:
        raise ValueError(f"rome takes one key [d_k] and one value [d_v], got {tuple(k.shape)}, {tuple(v.shape)}")
    _check(W, k[:, None], v[:, None], name="k", vname="v")
    if not bool(k.any()):
        raise ValueError("k is the zero vector: no rank-one update writes (W + Delta) k = v for it; give a nonzero key")
    if C is None:
        u = k
    else:
        _square(C, W, "C")
        u, info = torch.linalg.solve_ex(C, k)
        if int(info) != 0 or not bool(torch.isfinite(u).all()):
            raise ValueError(f"C is singular (numerical rank {_rank((C + C.T) / 2)} of d_k={C.shape[0]}): give a "
                             "positive definite C (add lam I)")
    denom = u @ k
    if not math.isfinite(float(denom)):
        raise ValueError(f"(C^-1 k)^T k overflows {k.dtype} (|k| = {float(k.norm()):.3g}): rescale the keys")
    if not abs(float(denom)) > k.shape[0] * torch.finfo(k.dtype).eps * float(u.norm()) * float(k.norm()):
        raise ValueError(f"(C^-1 k)^T k = {float(denom):.3g}: C^-1 k is orthogonal to k, so the rank-one system is "
                         "singular; give a positive definite C (add lam I)")
    return _finite_update(torch.outer(v - W @ k, u) / denom, "ROME")


def memit(W: Tensor, K: Tensor, V: Tensor, C0: Tensor, lam: float = 1.0) -> Tensor:
    r"""MEMIT's batched edit for one layer (Meng et al., arXiv 2210.07229, eq. 14):
    ``Delta = R K^T (lam C0 + K K^T)^{-1}`` with ``R = V - W K``: least squares on the new pairs
    while keeping ``||Delta K0||`` small, ``C0 = K0 K0^T`` the preserved keys' second moment
    (``lam`` = the authors' ``mom2_update_weight``). Reference: kmeng01/memit ``memit_main.py``.

    ``ValueError`` for: non-finite tensors; ``lam`` not finite and ``>= 0``; ``lam C0 + K K^T`` not
    positive definite (e.g. ``lam = 0`` with fewer than ``d_k`` independent keys), naming ``lam``
    and the rank."""
    _check(W, K, V)
    _square(C0, W, "C0")
    lam = _number("lam", lam)
    A = lam * C0 + K @ K.T
    if not bool(torch.isfinite(A).all()):
        raise ValueError(f"lam * C0 + K K^T overflows {A.dtype} (lam={lam!r}): use a smaller lam or rescale the keys")
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise ValueError(f"lam * C0 + K K^T is singular or not positive definite (lam={lam!r}; numerical rank "
                         f"{_rank((A + A.T) / 2)} of d_k={A.shape[0]}; {K.shape[1]} keys): give lam > 0 with C0 "
                         "positive definite (add a ridge to C0), or keys that span the key space")
    return _finite_update(torch.cholesky_solve(((V - W @ K) @ K.T).T, L).T, "MEMIT")


def nullspace_projector(K0: Tensor, threshold: float = 1e-2) -> Tensor:
    r"""``P = U U^T`` with ``U`` the eigenvectors of ``K0 K0^T`` whose eigenvalues are below
    ``threshold`` (AlphaEdit's projector onto the null space of the preserved keys). ``K0`` must be
    finite and ``threshold`` finite and ``>= 0`` (``ValueError`` otherwise). ``P`` may be zero (an
    empty null space), which :func:`alphaedit` refuses."""
    if K0.dim() != 2 or not K0.is_floating_point():
        raise ValueError(f"K0 must be a 2-D floating tensor [d_k, n0], got {tuple(K0.shape)} {K0.dtype}")
    _finite(K0, "K0")
    threshold = _number("threshold", threshold)
    evals, evecs = torch.linalg.eigh(K0 @ K0.T)
    U = evecs[:, evals < threshold]
    return U @ U.T


def _null_basis(K0: Tensor, threshold: float, l2: float) -> Tensor:
    """The eigenvectors of ``K0 K0^T`` below ``threshold`` (columns); a ``UserWarning`` when there are none
    (every edit is then zero), a ``ValueError`` for ``l2 = 0`` with a null space smaller than the key space."""
    d = K0.shape[0]
    evals, evecs = torch.linalg.eigh(K0 @ K0.T)
    null = evals < threshold
    r = int(null.sum())
    if r == 0:
        warnings.warn(f"AlphaEdit: threshold={threshold!r} leaves the null space of K0 K0^T empty (its smallest "
                      f"eigenvalue is {float(evals[0]):.3g}; {K0.shape[1]} preserved keys in d_k={d}), so every edit "
                      "is zero: give a threshold above that eigenvalue, or fewer preserved keys", stacklevel=3)
    if l2 == 0 and r < d:
        raise ValueError(f"l2=0.0 makes M P + l2 I singular (P projects onto {r} of d_k={d} directions): give l2 > 0")
    return evecs[:, null]


def alphaedit(W: Tensor, K: Tensor, V: Tensor, K0: Tensor, *, K_prev: Tensor | None = None,
              threshold: float = 1e-2, l2: float = 1.0) -> Tensor:
    r"""AlphaEdit (Fang et al., ICLR 2025, arXiv 2410.02355): the edit projected onto the null
    space of the preserved keys, ``Delta = R K^T P (M P + l2 I)^{-1}`` with ``R = V - W K``,
    ``M = K K^T + K_p K_p^T`` (earlier edits' keys ``K_prev``) and ``P`` from
    :func:`nullspace_projector`. In the authors' transposed convention (``[d_k, d_v]``,
    ``AlphaEdit_main.py``): ``(P M + l2 I)^{-1} P K R^T``. Then ``Delta K0 = 0`` exactly
    whenever ``P K0 = 0`` (the keys do not span the key space).

    ``ValueError`` for: non-finite tensors; ``threshold`` or ``l2`` not finite and ``>= 0``; ``l2 = 0``
    while ``P`` is not the identity (``M P`` then has rank below ``d_k``: singular). An empty null
    space (every eigenvalue of ``K0 K0^T`` at or above ``threshold``) is not singular (``A = l2 I``)
    but makes every edit zero, as in the authors' code: it gives a ``UserWarning`` naming the
    smallest eigenvalue (raise ``threshold`` above it, or keep fewer preserved keys)."""
    _check(W, K, V)
    _check(W, K0, name="K0")
    threshold = _number("threshold", threshold)
    l2 = _number("l2", l2)
    d = W.shape[1]
    U = _null_basis(K0, threshold, l2)
    P = U @ U.T
    M = K @ K.T
    if K_prev is not None:
        _check(W, K_prev, name="K_prev")
        M = M + K_prev @ K_prev.T
    A = M @ P + l2 * torch.eye(d, dtype=W.dtype, device=W.device)
    if not bool(torch.isfinite(A).all()):
        raise ValueError(f"M P + l2 I overflows {A.dtype} (l2={l2!r}): use a smaller l2 or rescale the keys")
    out, info = torch.linalg.solve_ex(A.T, ((V - W @ K) @ K.T @ P).T)
    if int(info) != 0:
        raise ValueError(f"M P + l2 I is singular (l2={l2!r}): give a larger l2")
    return _finite_update(out.T, "AlphaEdit")


def sphere_project(W: Tensor, delta: Tensor, beta: float = 0.5, alpha: float = 0.5) -> Tensor:
    r"""SPHERE's projection (Liu et al., ICLR 2026; PlusLabNLP/SPHERE ``project_B_into_soft_dirs``):
    with ``A`` the row-normalised ``W`` and ``C = A^T A / n``, take the top ``r`` eigenvectors
    ``U`` of ``C``, ``r`` = 1 + the number of leading directions whose cumulative energy share
    stays ``<= beta``; return ``delta (I - alpha U U^T)``. ``alpha = 1`` removes the update's
    component along those principal hyperspherical directions; ``alpha = 0`` is the identity.
    ``W`` and ``delta`` must be finite, ``beta`` in ``[0, 1]`` and ``alpha`` finite and ``>= 0``
    (``ValueError`` otherwise)."""
    if delta.shape != W.shape:
        raise ValueError(f"delta has shape {tuple(delta.shape)}; W has {tuple(W.shape)}")
    _finite(W, "W")
    _finite(delta, "delta")
    beta = _number("beta", beta, hi=1.0)
    alpha = _number("alpha", alpha)
    A = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    evals, evecs = torch.linalg.eigh(A.T @ A / A.shape[0])
    evals, evecs = evals.flip(0), evecs.flip(1)
    share = torch.cumsum(evals, 0) / evals.sum().clamp_min(1e-30)
    r = int((share <= beta).sum()) + 1
    U = evecs[:, :r]
    return _finite_update(delta - alpha * (delta @ U) @ U.T, "SPHERE")


@torch.no_grad()
def apply_delta(layer: nn.Linear, delta: Tensor) -> None:
    """``layer.weight += delta`` (shape-checked; a non-finite ``delta``, or a sum that is not finite in
    the weight's dtype, raises ``ValueError``; the layer is untouched on error)."""
    if delta.shape != layer.weight.shape:
        raise ValueError(f"delta has shape {tuple(delta.shape)}; the layer's weight is {tuple(layer.weight.shape)}")
    _finite(delta, "delta")
    new = layer.weight + delta.to(layer.weight.dtype)
    if not bool(torch.isfinite(new).all()):
        raise ValueError(f"weight + delta is not finite in {layer.weight.dtype} (an overflow, or the weight is already "
                         "non-finite): nothing was written")
    layer.weight.copy_(new)


@torch.no_grad()
def collect_keys_values(model: nn.Module, layer: nn.Linear, *inputs: object, **kw: object) -> tuple[Tensor, Tensor]:
    """Run ``model(*inputs, **kw)`` and return the keys (``layer``'s inputs) and values (its
    outputs) as columns, ``K [d_k, n]`` and ``V [d_v, n]``, one column per position (batch and
    sequence dimensions flattened). Works for any module containing ``layer``, e.g. the MLP
    down-projection of a Hugging Face model."""
    got: dict[str, Tensor] = {}

    def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
        got["k"], got["v"] = args[0].detach(), out.detach()

    handle = layer.register_forward_hook(hook)
    try:
        model(*inputs, **kw)
    finally:
        handle.remove()
    if "k" not in got:
        raise ValueError("the layer was not called by the model's forward")
    k, v = got["k"], got["v"]
    if layer.bias is not None:
        v = v - layer.bias
    return k.reshape(-1, k.shape[-1]).T, v.reshape(-1, v.shape[-1]).T


def __getattr__(name: str) -> object:
    # RLSEditor moved to poise.edit.editors (which imports this module): imported on first use.
    if name == "RLSEditor":
        from poise.edit.editors import RLSEditor

        return RLSEditor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
