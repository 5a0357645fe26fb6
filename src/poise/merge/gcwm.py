r"""Geometry conflict and Geometry-Conflict Wasserstein Merging (GCWM).

Wang et al., "Geometry Conflict: Explaining and Controlling Forgetting in LLM Continual
Post-Training", arXiv 2605.09608; reference code wyy-code/GCWM ``merging/merging_methods/gcwm.py``
(merge) and ``analysis/bridge_analyzer_fast_sharded.py`` (conflict between a merged state and a task).

Per weight matrix ``tau_t`` (``[out, in]``; a task's parameter delta, see :mod:`poise.merge.task`):

1. *Geometry.* Truncated right SVD ``tau_t ~ U_r S_r V_r^T`` keeping the fewest ``r <= rank``
   directions whose energy ``sum S^2`` reaches ``energy``. Union basis ``Q`` = QR of
   ``[V_r^{(1)}, ..., V_r^{(T)}]`` (columns with ``|R_ii| <= eps`` dropped). Projected covariance
   ``B_t = Q^T V_r S_r^2 V_r^T Q + reg I`` (the covariance ``tau_t^T tau_t`` seen in ``Q``).
2. *Conflict.* Bures distance ``d^2(A, B) = tr A + tr B - 2 tr (A^{1/2} B A^{1/2})^{1/2}`` (the
   2-Wasserstein distance between centred Gaussians); the conflict of a set is the mean over pairs
   of ``d^2(B_i, B_j) / (tr B_i + tr B_j + reg)`` (weighted by ``w_i w_j`` when weights are given),
   in ``[0, 1]``: 0 for identical geometries, about 1 for updates on orthogonal input directions.
   The *state-relative* conflict of a new update is that score for the pair
   (model state delta ``theta - theta_0``, new update).
3. *Shared metric.* Gaussian-W2 barycenter ``B*`` of the ``B_t`` with weights ``w_t``: fixed point
   ``B <- B^{-1/2} (sum_t w_t (B^{1/2} B_t B^{1/2})^{1/2})^2 B^{-1/2}`` from the weighted mean.
4. *Gate.* ``alpha = a_min + (a_max - a_min) sigmoid(s (conflict - c_0))`` (reference defaults
   ``c_0 = 0.12``, ``s = 12``, ``a_min = 0.15``, ``a_max = 0.95``): the weight of the geometry-aware
   merge. Compatible updates (low conflict) are merged mostly plainly; conflicting ones get the
   geometry-aware correction.
5. *Merge.* ``m`` minimises ``sum_t w_t ||(m - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2``
   (:func:`interference_merge`), once on the raw deltas (``m_plain``) and once on the deltas
   whitened by the shared metric, ``tau_t M`` with ``M = Q B*^{-1/2} Q^T + reg^{-1/2}(I - Q Q^T)``,
   then recoloured by ``M^{-1}`` (``m_geo``). Output ``alpha m_geo + (1 - alpha) m_plain``.

Symbols -> arguments: ``rank`` (reference 16), ``energy`` (0.9), ``reg`` (``cov_reg`` 1e-6),
``w_t`` = ``weights``, ``c_0, s, a_min, a_max`` = ``gate_threshold, gate_sharpness, gate_min,
gate_max``; barycenter ``bary_iters`` (30), ``bary_tol`` (1e-5).

Departures (see docs/algorithms/gcwm.md): ``solver="closed_form"`` offers the exact minimiser of
the merge objective beside the reference's Adam loop (the default: lr 1e-5, 300 steps from
``sum_t tau_t``). All linear algebra in float64. The reference
skips one branch when ``alpha`` is within 0.05 of 0 or 1; here both branches are always blended.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "bures_distance_sq",
    "conflict_gate",
    "gcwm_merge",
    "gcwm_merge_tensor",
    "geometry_conflict",
    "interference_merge",
    "projected_covariances",
    "psd_sqrt",
    "right_geometry",
    "state_conflict",
    "union_basis",
    "wasserstein_barycenter",
]

D = torch.float64


def _sym(A: Tensor) -> Tensor:
    return 0.5 * (A + A.T)


def _as_matrix(t: Tensor) -> Tensor:
    """A parameter delta as a matrix: 2-D as is, 1-D as one row, higher as ``[out, -1]``."""
    if t.dim() == 0:
        return t.reshape(1, 1).to(D)
    if t.dim() == 1:
        return t.reshape(1, -1).to(D)
    return t.reshape(t.shape[0], -1).to(D)


def psd_sqrt(A: Tensor, inverse: bool = False, eps: float = 0.0) -> Tensor:
    """Symmetric square root (or inverse square root) of a PSD matrix by ``eigh``; eigenvalues are
    clamped at ``eps`` (must be > 0 for the inverse)."""
    if inverse and eps <= 0:
        raise ValueError(f"inverse square root needs eps > 0, got eps={eps}")
    evals, evecs = torch.linalg.eigh(_sym(A.to(D)))
    evals = evals.clamp(min=eps)
    root = evals.rsqrt() if inverse else evals.sqrt()
    return (evecs * root) @ evecs.T


def right_geometry(delta: Tensor, rank: int = 16, energy: float | None = 0.9) -> tuple[Tensor, Tensor]:
    """Truncated right singular basis ``V_r`` ``[in, r]`` and singular values ``S_r`` of a delta:
    the fewest ``r <= rank`` leading directions whose energy fraction ``sum_{i<r} S_i^2 / sum S^2``
    reaches ``energy`` (``None``: exactly ``min(rank, len(S))``)."""
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy={energy} must be in (0, 1] or None")
    M = _as_matrix(delta)
    _, S, Vh = torch.linalg.svd(M, full_matrices=False)
    n = S.numel()
    if energy is None:
        r = min(rank, n)
    else:
        cum = torch.cumsum(S**2, 0) / (S.pow(2).sum() + 1e-300)
        r = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=D)).item()) + 1
        r = max(1, min(r, rank, n))
    return Vh[:r].T.contiguous(), S[:r].contiguous()


def union_basis(bases: Sequence[Tensor], eps: float = 1e-8) -> Tensor:
    """Orthonormal basis of the span of the given column bases: QR of their concatenation, columns
    with ``|R_ii| <= eps`` dropped (as the reference; at least one column is kept)."""
    if not bases:
        raise ValueError("union_basis needs at least one basis")
    Q, R = torch.linalg.qr(torch.cat([b.to(D) for b in bases], 1), mode="reduced")
    keep = R.diagonal().abs() > eps
    return Q[:, keep] if bool(keep.any()) else Q[:, :1]


def projected_covariances(deltas: Sequence[Tensor], rank: int = 16, energy: float | None = 0.9,
                          reg: float = 1e-6) -> tuple[Tensor, list[Tensor]]:
    """The union basis ``Q`` of the deltas' truncated right geometries and each delta's projected
    covariance ``B_t = Q^T V_r S_r^2 V_r^T Q + reg I``."""
    if not deltas:
        raise ValueError("projected_covariances needs at least one delta")
    if reg < 0:
        raise ValueError(f"reg={reg} must be >= 0")
    geo = [right_geometry(t, rank, energy) for t in deltas]
    Q = union_basis([V for V, _ in geo])
    covs = []
    for V, S in geo:
        P = Q.T @ V
        covs.append(_sym((P * S**2) @ P.T) + reg * torch.eye(Q.shape[1], dtype=D))
    return Q, covs


def bures_distance_sq(A: Tensor, B: Tensor) -> Tensor:
    """``d^2(A, B) = tr A + tr B - 2 tr (A^{1/2} B A^{1/2})^{1/2}`` (clamped at 0), float64."""
    A, B = _sym(A.to(D)), _sym(B.to(D))
    rA = psd_sqrt(A)
    cross = psd_sqrt(rA @ B @ rA).trace()
    return (A.trace() + B.trace() - 2 * cross).clamp(min=0.0)


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} entries for {n} deltas")
    if any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
        raise ValueError(f"weights={w} must be finite, >= 0 and not all 0")
    s = sum(w)
    return [x / s for x in w]


def geometry_conflict(covs: Sequence[Tensor], weights: Sequence[float] | None = None, reg: float = 1e-6) -> float:
    """Mean over pairs ``i < j`` of ``d^2(B_i, B_j) / (tr B_i + tr B_j + reg)``, weighted by
    ``w_i w_j`` when ``weights`` are given; 0 for fewer than two covariances or two zero ones."""
    n = len(covs)
    if n < 2:
        return 0.0
    w = _check_weights(weights, n) if weights is not None else [1.0] * n
    num = den = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            tr = float(covs[i].trace() + covs[j].trace()) + reg
            c = float(bures_distance_sq(covs[i], covs[j])) / tr if tr > 0 else 0.0
            num += w[i] * w[j] * c
            den += w[i] * w[j]
    return num / den if den > 0 else 0.0


def wasserstein_barycenter(covs: Sequence[Tensor], weights: Sequence[float] | None = None, iters: int = 30,
                           tol: float = 1e-5, eps: float = 1e-12) -> Tensor:
    """Gaussian 2-Wasserstein (Bures) barycenter of SPD matrices: the fixed point
    ``B <- B^{-1/2} (sum_t w_t (B^{1/2} C_t B^{1/2})^{1/2})^2 B^{-1/2}`` started from ``sum_t w_t C_t``,
    stopped when the relative Frobenius change is below ``tol`` or after ``iters`` iterations."""
    if not covs:
        raise ValueError("wasserstein_barycenter needs at least one covariance")
    w = _check_weights(weights, len(covs))
    C = [_sym(c.to(D)) for c in covs]
    B = _sym(sum(wi * ci for wi, ci in zip(w, C, strict=True)))
    for _ in range(iters):
        rB, irB = psd_sqrt(B), psd_sqrt(B, inverse=True, eps=eps)
        T = sum(wi * psd_sqrt(rB @ ci @ rB) for wi, ci in zip(w, C, strict=True))
        B_next = _sym(irB @ T @ T @ irB)
        change = float((B_next - B).norm() / (B.norm() + eps))
        B = B_next
        if change < tol:
            break
    return B


def conflict_gate(conflict: float, threshold: float = 0.12, sharpness: float = 12.0, gate_min: float = 0.15,
                  gate_max: float = 0.95) -> float:
    """``alpha = a_min + (a_max - a_min) sigmoid(s (conflict - c_0))``: the weight of the
    geometry-aware merge (reference ``_blend_factor_from_conflict``)."""
    if not 0 <= gate_min <= gate_max <= 1:
        raise ValueError(f"need 0 <= gate_min <= gate_max <= 1, got gate_min={gate_min}, gate_max={gate_max}")
    z = sharpness * (conflict - threshold)
    sig = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
    return min(gate_max, max(gate_min, gate_min + (gate_max - gate_min) * sig))


def interference_merge(deltas: Sequence[Tensor], weights: Sequence[float] | None = None, solver: str = "adam",
                       steps: int = 300, lr: float = 1e-5) -> Tensor:
    r"""The merge ``m`` minimising ``sum_t w_t ||(m - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2`` (GCWM's
    inner objective; ``tau_t`` matrices ``[out, in]``, zero deltas ignored).

    ``solver="adam"`` (default, the reference's loop): Adam(``lr``) for ``steps`` steps from
    ``sum_t tau_t``; with the reference's small ``lr`` (1e-5) this is an early-stopped descent that
    stays near task arithmetic. ``solver="closed_form"``: the exact minimiser
    ``m = (sum_t a_t tau_t G_t)(sum_t a_t G_t)^+``, ``G_t = tau_t^T tau_t``, ``a_t = w_t/||tau_t||^2``
    (the limit of that descent: every row of ``tau_t`` lies in the range of ``sum_t G_t``); it is
    ill-conditioned when the tasks' row spaces overlap at small angles (measured on split-digits:
    a merged delta 5-40x larger than the inputs), so it is for analysis and exact tests.
    ``weights`` are normalised to sum 1 in both."""
    if solver not in ("closed_form", "adam"):
        raise ValueError(f"solver={solver!r}; valid choices: closed_form, adam")
    if not deltas:
        raise ValueError("interference_merge needs at least one delta")
    shape = deltas[0].shape
    if any(t.shape != shape for t in deltas):
        raise ValueError(f"all deltas must have one shape; got {[tuple(t.shape) for t in deltas]}")
    w = _check_weights(weights, len(deltas))
    T = [_as_matrix(t) for t in deltas]
    norms = [float(t.pow(2).sum()) for t in T]
    live = [(wi, t, n) for wi, t, n in zip(w, T, norms, strict=True) if n > 0 and wi > 0]
    if not live:
        return torch.zeros(shape, dtype=deltas[0].dtype)
    if solver == "closed_form":
        A = sum((wi / n) * (t.T @ t) for wi, t, n in live)
        Bm = sum((wi / n) * (t @ (t.T @ t)) for wi, t, n in live)
        evals, evecs = torch.linalg.eigh(_sym(A))
        cut = evals.max() * 1e-10
        inv = torch.where(evals > cut, 1.0 / evals.clamp(min=1e-300), torch.zeros_like(evals))
        m = Bm @ ((evecs * inv) @ evecs.T)
    else:
        # Adam (torch defaults beta 0.9/0.999, eps 1e-8) on the analytic gradient
        # d/dm sum_t c_t ||(m - tau_t) tau_t^T||^2 = 2 sum_t c_t (m - tau_t) G_t, c_t = w_t/||tau_t||^2
        A = sum((wi / n) * (t.T @ t) for wi, t, n in live)
        Bm = sum((wi / n) * (t @ (t.T @ t)) for wi, t, n in live)
        m = sum(T).clone()
        mom, var = torch.zeros_like(m), torch.zeros_like(m)
        b1, b2 = 0.9, 0.999
        for k in range(1, steps + 1):
            grad = 2 * (m @ A - Bm)
            mom.mul_(b1).add_(grad, alpha=1 - b1)
            var.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = (var / (1 - b2**k)).sqrt_().add_(1e-8)
            m.addcdiv_(mom, denom, value=-lr / (1 - b1**k))
    return m.reshape(shape).to(deltas[0].dtype)


def gcwm_merge_tensor(deltas: Sequence[Tensor], weights: Sequence[float] | None = None, rank: int = 16,
                      energy: float | None = 0.9, reg: float = 1e-6, metric: str = "barycenter", bary_iters: int = 30,
                      bary_tol: float = 1e-5, gate_threshold: float = 0.12, gate_sharpness: float = 12.0,
                      gate_min: float = 0.15, gate_max: float = 0.95, solver: str = "adam",
                      steps: int = 300, lr: float = 1e-5) -> tuple[Tensor, dict[str, float]]:
    """GCWM for one weight (steps 1-5 of the module doc). Returns the merged delta and
    ``{"conflict", "alpha", "union_rank", "plain_norm", "geo_norm"}``."""
    if metric not in ("barycenter", "mean"):
        raise ValueError(f"metric={metric!r}; valid choices: barycenter, mean")
    if reg <= 0:
        raise ValueError(f"reg={reg} must be > 0 for the merge (it whitens by B^{{-1/2}})")
    w = _check_weights(weights, len(deltas))
    Q, covs = projected_covariances(deltas, rank, energy, reg)
    conflict = geometry_conflict(covs, weights, reg)
    alpha = conflict_gate(conflict, gate_threshold, gate_sharpness, gate_min, gate_max)
    if metric == "barycenter":
        B = wasserstein_barycenter(covs, w, bary_iters, bary_tol, eps=reg)
    else:
        B = _sym(sum(wi * c for wi, c in zip(w, covs, strict=True)))
    n_in = Q.shape[0]
    P_orth = torch.eye(n_in, dtype=D) - Q @ Q.T
    whiten = Q @ psd_sqrt(B, inverse=True, eps=reg) @ Q.T + reg**-0.5 * P_orth
    recolour = Q @ psd_sqrt(B, eps=reg) @ Q.T + reg**0.5 * P_orth
    shape, dtype = deltas[0].shape, deltas[0].dtype
    mats = [_as_matrix(t) for t in deltas]
    zero = torch.zeros_like(mats[0])
    plain = _as_matrix(interference_merge(mats, w, solver, steps, lr)) if alpha < 1 else zero
    geo = zero
    if alpha > 0:
        geo = _as_matrix(interference_merge([t @ whiten for t in mats], w, solver, steps, lr)) @ recolour
    merged = alpha * geo + (1 - alpha) * plain
    stats = {"conflict": conflict, "alpha": alpha, "union_rank": float(Q.shape[1]),
             "plain_norm": float(plain.norm()), "geo_norm": float(geo.norm())}
    return merged.reshape(shape).to(dtype), stats


def _matrix_keys(deltas: Sequence[Mapping[str, Tensor]], keys: Sequence[str] | None) -> list[str]:
    common = [k for k in deltas[0] if all(k in d for d in deltas[1:])]
    if keys is None:
        return [k for k in common if torch.is_floating_point(deltas[0][k]) and deltas[0][k].dim() >= 2]
    bad = [k for k in keys if k not in common]
    if bad:
        raise ValueError(f"keys {bad} are not in every delta; valid choices: {common}")
    return list(keys)


def gcwm_merge(deltas: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None,
               keys: Sequence[str] | None = None, **kw: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """GCWM over state-dict deltas (any ``nn.Module``): :func:`gcwm_merge_tensor` on every floating
    tensor of dimension >= 2 (or the given ``keys``); every other floating tensor (biases, norms) by
    the plain :func:`interference_merge` on it as one row. Returns the merged delta and
    ``{"layers": {key: stats}, "conflict": mean, "alpha": mean}``. Continual use (the reference's
    ``current_anchor`` memory): ``gcwm_merge([state_delta, new_delta], weights=[old, new])``."""
    if not deltas:
        raise ValueError("gcwm_merge needs at least one delta")
    _check_weights(weights, len(deltas))
    mkeys = set(_matrix_keys(deltas, keys))
    out: dict[str, Tensor] = {}
    layers: dict[str, dict[str, float]] = {}
    solver = {k: kw[k] for k in ("solver", "steps", "lr") if k in kw}
    for k, v in deltas[0].items():
        if not all(k in d for d in deltas[1:]) or not torch.is_floating_point(v):
            continue
        if k in mkeys:
            out[k], layers[k] = gcwm_merge_tensor([d[k] for d in deltas], weights, **kw)
        else:
            out[k] = interference_merge([d[k] for d in deltas], weights, **solver)
    conf = [s["conflict"] for s in layers.values()]
    alph = [s["alpha"] for s in layers.values()]
    return out, {"layers": layers, "conflict": sum(conf) / len(conf) if conf else 0.0,
                 "alpha": sum(alph) / len(alph) if alph else 0.0}


def state_conflict(state_delta: Mapping[str, Tensor], update: Mapping[str, Tensor], keys: Sequence[str] | None = None,
                   rank: int = 16, energy: float | None = 0.9, reg: float = 1e-6) -> dict[str, Any]:
    """State-relative geometry conflict of a new update: per weight matrix, the conflict of the pair
    (current model's delta from its base, ``state_delta``; the new ``update``), each in its own
    union basis (reference ``_pair_metrics_from_cache``). Returns ``{"layers": {key: c}, "mean": c}``."""
    keys_ = _matrix_keys([state_delta, update], keys)
    if not keys_:
        raise ValueError("no weight matrix (floating tensor of dimension >= 2) common to both deltas")
    layers = {}
    for k in keys_:
        _, covs = projected_covariances([state_delta[k], update[k]], rank, energy, reg)
        layers[k] = geometry_conflict(covs, reg=reg)
    return {"layers": layers, "mean": sum(layers.values()) / len(layers)}
