"""Closed-form editors for one linear map.

Convention, everywhere: a layer maps keys to values as ``v = W k``; ``W`` is ``[d_v, d_k]``
(``nn.Linear.weight``); a set of keys is a matrix with one key per **column**, ``K`` of shape
``[d_k, n]``, and values ``V`` ``[d_v, n]``. Every editor returns the update ``Delta`` (same
shape as ``W``) and never changes its inputs; :func:`apply_delta` writes one into an
``nn.Linear``. Bad shapes, dtypes and singular systems raise ``ValueError`` naming the problem.
The same update rules as stateful objects with one interface (``edit``/``shift``) and their
defaults are in :mod:`poise.edit.editors`; ``RLSEditor`` lives there and is re-exported here.
"""

from __future__ import annotations

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


def _check(W: Tensor, K: Tensor, V: Tensor | None = None, name: str = "K") -> None:
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [d_v, d_k], got shape {tuple(W.shape)}")
    if K.dim() != 2 or K.shape[0] != W.shape[1]:
        raise ValueError(f"{name} must be [d_k={W.shape[1]}, n] (keys as columns), got {tuple(K.shape)}")
    if V is not None and (V.dim() != 2 or V.shape != (W.shape[0], K.shape[1])):
        raise ValueError(f"V must be [d_v={W.shape[0]}, n={K.shape[1]}], got {tuple(V.shape)}")
    for t, n in ((K, name), (V, "V")):
        if t is not None and (t.dtype != W.dtype or not t.is_floating_point()):
            raise ValueError(f"{n} has dtype {t.dtype}; W has {W.dtype}: use the same floating dtype")


def _solve_right(B: Tensor, A: Tensor, what: str) -> Tensor:
    """``B A^{-1}`` for a symmetric positive definite ``A``, or a clear error."""
    try:
        L = torch.linalg.cholesky(A)
    except RuntimeError:
        raise ValueError(f"{what} is singular or not positive definite: add regularisation "
                         "(a covariance term or a larger lambda)") from None
    return torch.cholesky_solve(B.T, L).T


def rome(W: Tensor, k: Tensor, v: Tensor, C: Tensor | None = None) -> Tensor:
    r"""ROME's rank-one edit (Meng et al., arXiv 2202.05262, eq. 2):
    ``Delta = (v - W k) (C^{-1} k)^T / ((C^{-1} k)^T k)``, the minimum ``C``-norm change with
    ``(W + Delta) k = v`` exactly. ``k`` ``[d_k]``, ``v`` ``[d_v]``, ``C`` ``[d_k, d_k]`` the key
    covariance (identity if None). Reference: kmeng01/rome ``rome_main.py``."""
    if k.dim() != 1 or v.dim() != 1:
        raise ValueError(f"rome takes one key [d_k] and one value [d_v], got {tuple(k.shape)}, {tuple(v.shape)}")
    _check(W, k[:, None], v[:, None])
    u = k if C is None else torch.linalg.solve(C, k)
    denom = u @ k
    if abs(float(denom)) < 1e-12:
        raise ValueError("C^{-1} k is orthogonal to k: the rank-one system is singular")
    return torch.outer(v - W @ k, u) / denom


def memit(W: Tensor, K: Tensor, V: Tensor, C0: Tensor, lam: float = 1.0) -> Tensor:
    r"""MEMIT's batched edit for one layer (Meng et al., arXiv 2210.07229, eq. 14):
    ``Delta = R K^T (lam C0 + K K^T)^{-1}`` with ``R = V - W K``: least squares on the new pairs
    while keeping ``||Delta K0||`` small, ``C0 = K0 K0^T`` the preserved keys' second moment
    (``lam`` = the authors' ``mom2_update_weight``). Reference: kmeng01/memit ``memit_main.py``."""
    _check(W, K, V)
    if C0.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"C0 must be [d_k, d_k] = {(W.shape[1],) * 2}, got {tuple(C0.shape)}")
    return _solve_right((V - W @ K) @ K.T, lam * C0 + K @ K.T, "lam * C0 + K K^T")


def nullspace_projector(K0: Tensor, threshold: float = 1e-2) -> Tensor:
    r"""``P = U U^T`` with ``U`` the eigenvectors of ``K0 K0^T`` whose eigenvalues are below
    ``threshold`` (AlphaEdit's projector onto the null space of the preserved keys)."""
    evals, evecs = torch.linalg.eigh(K0 @ K0.T)
    U = evecs[:, evals < threshold]
    return U @ U.T


def alphaedit(W: Tensor, K: Tensor, V: Tensor, K0: Tensor, *, K_prev: Tensor | None = None,
              threshold: float = 1e-2, l2: float = 1.0) -> Tensor:
    r"""AlphaEdit (Fang et al., ICLR 2025, arXiv 2410.02355): the edit projected onto the null
    space of the preserved keys, ``Delta = R K^T P (M P + l2 I)^{-1}`` with ``R = V - W K``,
    ``M = K K^T + K_p K_p^T`` (earlier edits' keys ``K_prev``) and ``P`` from
    :func:`nullspace_projector`. In the authors' transposed convention (``[d_k, d_v]``,
    ``AlphaEdit_main.py``): ``(P M + l2 I)^{-1} P K R^T``. Then ``Delta K0 = 0`` exactly
    whenever ``P K0 = 0`` (the keys do not span the key space)."""
    _check(W, K, V)
    _check(W, K0, name="K0")
    P = nullspace_projector(K0, threshold)
    M = K @ K.T
    if K_prev is not None:
        _check(W, K_prev, name="K_prev")
        M = M + K_prev @ K_prev.T
    A = M @ P + l2 * torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
    try:
        return torch.linalg.solve(A.T, ((V - W @ K) @ K.T @ P).T).T
    except RuntimeError:
        raise ValueError("M P + l2 I is singular: use l2 > 0") from None


def sphere_project(W: Tensor, delta: Tensor, beta: float = 0.5, alpha: float = 0.5) -> Tensor:
    r"""SPHERE's projection (Liu et al., ICLR 2026; PlusLabNLP/SPHERE ``project_B_into_soft_dirs``):
    with ``A`` the row-normalised ``W`` and ``C = A^T A / n``, take the top ``r`` eigenvectors
    ``U`` of ``C``, ``r`` = 1 + the number of leading directions whose cumulative energy share
    stays ``<= beta``; return ``delta (I - alpha U U^T)``. ``alpha = 1`` removes the update's
    component along those principal hyperspherical directions; ``alpha = 0`` is the identity."""
    if delta.shape != W.shape:
        raise ValueError(f"delta has shape {tuple(delta.shape)}; W has {tuple(W.shape)}")
    A = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    evals, evecs = torch.linalg.eigh(A.T @ A / A.shape[0])
    evals, evecs = evals.flip(0), evecs.flip(1)
    share = torch.cumsum(evals, 0) / evals.sum().clamp_min(1e-30)
    r = int((share <= beta).sum()) + 1
    U = evecs[:, :r]
    return delta - alpha * (delta @ U) @ U.T


@torch.no_grad()
def apply_delta(layer: nn.Linear, delta: Tensor) -> None:
    """``layer.weight += delta`` (shape- and dtype-checked; the layer is untouched on error)."""
    if delta.shape != layer.weight.shape:
        raise ValueError(f"delta has shape {tuple(delta.shape)}; the layer's weight is {tuple(layer.weight.shape)}")
    layer.weight.add_(delta.to(layer.weight.dtype))


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
