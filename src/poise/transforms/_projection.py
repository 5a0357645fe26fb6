"""Orthogonal projection of updates onto the complement of a given subspace."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from poise.transforms._base import Hyper, State, Transform, Updates

__all__ = ["project_orthogonal", "project_out"]


def project_out(g: Tensor, basis: Tensor) -> Tensor:
    r"""``(I - U^T U) g`` for a basis ``U`` with orthonormal rows (shape ``(r, n)``)."""
    return g - basis.T @ (basis @ g)


def project_orthogonal(basis: Callable[[Tensor], Tensor | None]) -> Transform:
    r"""``u <- (I - U^T U) u`` per tensor, where ``U = basis(param)`` has orthonormal rows
    (shape ``(r, numel)``) spanning directions the update must not move along (OGD/OGPSA's
    reference subspace, arXiv 2602.07892; a null space to protect); ``None`` leaves that
    tensor's update as it is. ``basis`` is called at every step, so the subspace can be
    refreshed outside the optimizer (as :class:`poise.continual.OGPSA` does). Under SGD the
    step is then exactly orthogonal to ``U``; after Adam scaling only the projected stage is.
    Records ``removed_frac`` (``\|u - \tilde u\| / \|u\|``).
    """

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        out: Updates = []
        for u, s, p in zip(updates, states, params, strict=True):
            U = None if u is None else basis(p)
            if U is None:
                out.append(u)
                continue
            flat = u.reshape(-1)
            kept = project_out(flat, U)
            s["removed_frac"] = (flat - kept).norm() / flat.norm().clamp_min(1e-30)
            out.append(kept.view_as(u))
        return out

    return Transform(lambda p, h: {}, update, "orthogonal")
