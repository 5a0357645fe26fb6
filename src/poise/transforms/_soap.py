"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner."""

from __future__ import annotations

from itertools import chain as ichain

import torch
from torch import Tensor

from poise.transforms._base import BETAS, EPS, Hyper, State, Transform, Updates, declare

__all__ = ["merge_dims", "scale_by_soap"]

DATA_FORMATS = ("channels_first", "channels_last")


def merge_dims(shape: tuple[int, ...] | torch.Size, max_precond_dim: int) -> list[int]:
    """SOAP's greedy left-to-right merge: adjacent dims are multiplied together while the
    product stays <= ``max_precond_dim``; a dim larger than that stands alone. A fully
    merged shape is ``[prod(shape)]`` (pytorch-optimizer 4.1's version returns ``[1]`` there
    and crashes; see docs/algorithms/soap.md)."""
    new: list[int] = []
    cur = 1
    for sh in shape:
        if cur * sh > max_precond_dim:
            if cur > 1:
                new.append(cur)
                cur = sh
            else:
                new.append(sh)
                cur = 1
        else:
            cur *= sh
    if cur > 1 or not new:
        new.append(cur)
    return new


def scale_by_soap(data_format: str = "channels_first") -> Transform:
    r"""SOAP's direction (Vyas et al., arXiv 2409.11321), replaying nikhilvyas/SOAP
    ``soap.py`` at commit a1e5535.

    For a matrix gradient ``G`` with Kronecker factors ``L <- b_s L + (1-b_s) G G^T`` and
    ``R <- b_s R + (1-b_s) G^T G`` (``b_s`` = ``hyper["shampoo_beta"]``, or ``betas[1]`` when
    negative) and their eigenbases ``Q_L, Q_R``: ``G' = Q_L^T G Q_R``; Adam moments
    ``m, v`` (``hyper["betas"]``, ``hyper["eps"]``) are kept in that eigenbasis and the
    direction is ``Q_L (m / (sqrt(v) + eps)) Q_R^T`` (no bias correction here: see
    :func:`scale_by_bias_correction` with ``step_offset=1``). Tensors of any order get one
    factor per dim (dims above ``max_precond_dim`` are left unrotated); 1-D tensors are plain
    Adam unless ``precondition_1d``.

    The first call only initialises ``L, R`` and computes the bases by ``eigh`` (it returns
    ``None``: no update, as the official code's ``continue``). Every
    ``precondition_frequency`` steps the bases are refreshed by one power iteration and QR,
    with ``v`` permuted to the new eigenvalue order. Hyperparameters read from ``hyper``:
    ``betas, shampoo_beta, eps, precondition_frequency, max_precond_dim, merge_dims,
    precondition_1d``. Factors, bases and moments are float32 whatever the parameter dtype
    (the official code fails on bf16).
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format={data_format!r}; valid choices: {', '.join(DATA_FORMATS)}")

    def shape_of(g: Tensor, hyper: Hyper) -> tuple[list[int] | None, Tensor]:
        """(merged shape or None, g in channels-first order)."""
        if not hyper["merge_dims"] or g.dim() <= 1:
            return None, g
        if data_format == "channels_last" and g.dim() == 4:
            g = g.permute(0, 3, 1, 2)
        return merge_dims(g.shape, hyper["max_precond_dim"]), g

    def n_factors(s: State) -> int:
        return int(s["n_factors"])

    def qs(s: State) -> list[Tensor]:
        return [s[f"Q{i}"] for i in range(n_factors(s))]

    def rotate(g: Tensor, s: State, hyper: Hyper, back: bool) -> Tensor:
        if g.dim() == 2 and not hyper["merge_dims"]:
            ql, qr = s["Q0"], s["Q1"]
            if ql.numel() > 0 and qr.numel() > 0:  # the common case, as two plain matmuls
                return ql @ g @ qr.T if back else ql.T @ g @ qr
        original = g.shape
        merged, g2 = shape_of(g, hyper)
        permuted = g2.shape
        if merged is not None:
            g2 = g2.reshape(merged)
        for q in qs(s):
            if q.numel() > 0:
                g2 = torch.tensordot(g2, q, dims=[[0], [1 if back else 0]])
            else:
                g2 = g2.permute([*range(1, g2.dim()), 0])
        if merged is not None:
            if data_format == "channels_last" and len(original) == 4:
                g2 = g2.reshape(permuted).permute(0, 2, 3, 1)
            else:
                g2 = g2.reshape(original)
        return g2

    def init_factors(g: Tensor, s: State, hyper: Hyper) -> None:
        mpd = hyper["max_precond_dim"]
        if g.dim() == 1:
            dims = [g.shape[0] if hyper["precondition_1d"] and g.shape[0] <= mpd else 0]
        else:
            merged, g2 = shape_of(g, hyper)
            dims = [sh if sh <= mpd else 0 for sh in (merged or list(g2.shape))]
        s["n_factors"] = torch.tensor(len(dims))
        for i, d in enumerate(dims):
            s[f"GG{i}"] = torch.zeros(d, d, device=g.device)
            s[f"Q{i}"] = torch.zeros(0, device=g.device)

    def accumulate(g: Tensor, s: State, hyper: Hyper, beta: float) -> None:
        if g.dim() == 1:
            if s["GG0"].numel() > 0:
                s["GG0"].lerp_(g.unsqueeze(1) @ g.unsqueeze(0), 1 - beta)
            return
        merged, g2 = shape_of(g, hyper)
        if merged is not None:
            g2 = g2.reshape(merged)
        if g2.dim() == 2:  # G G^T and G^T G as plain matmuls
            for i, gram in ((0, lambda: g2 @ g2.T), (1, lambda: g2.T @ g2)):
                if s[f"GG{i}"].numel() > 0:
                    s[f"GG{i}"].lerp_(gram(), 1 - beta)
            return
        for i in range(g2.dim()):
            gg = s[f"GG{i}"]
            if gg.numel() > 0:
                other = [*ichain(range(i), range(i + 1, g2.dim()))]
                gg.lerp_(torch.tensordot(g2, g2, dims=[other] * 2), 1 - beta)

    def eigenbases(s: State) -> None:
        for i in range(n_factors(s)):
            m = s[f"GG{i}"]
            if m.numel() == 0:
                continue
            eye = torch.eye(m.shape[0], device=m.device)
            try:
                _, q = torch.linalg.eigh(m + 1e-30 * eye)
            except RuntimeError:
                _, q = torch.linalg.eigh(m.double() + 1e-30 * eye.double())
                q = q.float()
            s[f"Q{i}"] = torch.flip(q, [1])

    def refresh(s: State, hyper: Hyper) -> None:
        v = s["exp_avg_sq"]
        merged, v2 = shape_of(v, hyper)
        permuted = v2.shape
        if merged is not None:
            v2 = v2.reshape(merged)
        for i in range(n_factors(s)):
            m, o = s[f"GG{i}"], s[f"Q{i}"]
            if m.numel() == 0:
                continue
            est = torch.diag(o.T @ m @ o)
            idx = torch.argsort(est, descending=True)
            v2 = v2.index_select(i, idx)
            s[f"Q{i}"], _ = torch.linalg.qr(m @ o[:, idx])
        if merged is not None:
            v2 = v2.reshape(permuted)
            if data_format == "channels_last" and v.dim() == 4:
                v2 = v2.permute(0, 2, 3, 1)
        s["exp_avg_sq"] = v2

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        b1, b2 = hyper["betas"]
        sb = hyper["shampoo_beta"] if hyper["shampoo_beta"] >= 0 else b2
        out: Updates = []
        for u, s in zip(updates, states, strict=True):
            if u is None:
                out.append(None)
                continue
            g = u.float()
            if "n_factors" not in s:  # first call: factors and bases only, no update
                s["exp_avg"] = torch.zeros_like(g)
                s["exp_avg_sq"] = torch.zeros_like(g)
                init_factors(g, s, hyper)
                accumulate(g, s, hyper, sb)
                eigenbases(s)
                out.append(None)
                continue
            t = int(s["step"]) - 1  # the official counter: the first call is not counted
            gp = rotate(g, s, hyper, back=False)
            m, v = s["exp_avg"], s["exp_avg_sq"]
            m.mul_(b1).add_(gp, alpha=1.0 - b1)
            v.mul_(b2).add_(gp.square(), alpha=1.0 - b2)
            denom = v.sqrt().add_(hyper["eps"])
            direction = rotate(torch.div(m, denom, out=denom), s, hyper, back=True)
            # update the preconditioner with this gradient, after it was used
            accumulate(g, s, hyper, sb)
            due = t > 0 and t % hyper["precondition_frequency"] == 0
            s["refreshed"] = torch.tensor(float(due))
            if due:
                # m lives in the eigenbasis: take it out with the old bases, back in with the
                # new ones (the authors do this round trip every step; between refreshes it is
                # the identity up to rounding, so it is done only when the bases change)
                s["exp_avg"] = rotate(m, s, hyper, back=True)
                refresh(s, hyper)
                s["exp_avg"] = rotate(s["exp_avg"], s, hyper, back=False)
            out.append(direction)
        return out

    return Transform(lambda p, h: {}, update, "soap", reads=declare(
        "soap", betas=BETAS, eps=EPS, shampoo_beta=(-1, "SOAP preconditioner EMA rate (-1: betas[1])"),
        precondition_frequency=(10, "SOAP eigenbasis refresh interval"),
        max_precond_dim=(10000, "SOAP largest preconditioned dim"), merge_dims=(False, "SOAP: merge small dims"),
        precondition_1d=(False, "SOAP: precondition 1-D tensors")))
