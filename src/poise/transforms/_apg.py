"""Adaptive projected guidance (APG) as an update transform, and as classifier-free guidance.

Sadat, Hilliges & Weber, *Eliminating Oversaturation and Artifacts of High Guidance Scales in
Diffusion Models*, ICLR 2025, arXiv 2410.02416 (Algorithm 1, Sec. 4-5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from poise.transforms._base import Hyper, State, Transform, Updates, declare

__all__ = ["MomentumBuffer", "apg_guidance", "apg_project", "scale_by_apg"]


def _check_hyper(eta: float, r: float, beta: float) -> None:
    if not torch.isfinite(torch.tensor(float(eta))):
        raise ValueError(f"apg eta={eta} is out of range; valid: a finite number (the paper uses [0, 1])")
    if not r >= 0:
        raise ValueError(f"apg norm threshold r={r} is out of range; valid: [0, inf) (0 turns rescaling off)")
    if not -1 < beta < 1:
        raise ValueError(f"apg momentum beta={beta} is out of range; valid: (-1, 1) (the paper's is negative)")


def apg_project(d: Tensor, ref: Tensor, eta: float, dims: Sequence[int] | None = None,
                what: str = "reference") -> tuple[Tensor, Tensor]:
    r"""``(d_par, d_perp + eta d_par)``: APG's split of ``d`` relative to ``ref`` (arXiv 2410.02416, Eq. 5-7).

    ``d_par = <d, ref> / <ref, ref> ref`` and ``d_perp = d - d_par``, the inner products taken
    over ``dims`` (all dimensions when ``None``; per sample in :func:`apg_guidance`). A
    reference of zero norm (over any slice) raises ``ValueError`` naming its index: the
    paper's code normalises it with ``F.normalize`` (eps 1e-12), i.e. it silently treats the
    whole of ``d`` as orthogonal; poise refuses instead (issue 17).
    """
    dims = list(range(d.ndim)) if dims is None else list(dims)
    norm2 = (ref * ref).sum(dim=dims, keepdim=True)
    bad = (norm2 == 0).reshape(-1).nonzero()
    if bad.numel():
        raise ValueError(f"apg: {what} direction {int(bad[0])} has zero norm (0.0); the parallel/orthogonal "
                         f"split needs a nonzero reference")
    par = (d * ref).sum(dim=dims, keepdim=True) / norm2 * ref
    return par, d - par + eta * par


@dataclass
class MomentumBuffer:
    r"""APG's (reverse) momentum (arXiv 2410.02416, Sec. 5): ``running <- d + beta running``,
    starting from 0. ``beta`` < 0 (the paper's choice) pushes away from the previous guidance
    direction. One buffer per sampling trajectory; pass it at every denoising step."""

    beta: float
    running: Tensor | None = None

    def update(self, d: Tensor) -> Tensor:
        _check_hyper(0.0, 0.0, self.beta)
        self.running = d.clone() if self.running is None else d + self.beta * self.running
        return self.running


def apg_guidance(cond: Tensor, uncond: Tensor, scale: float, eta: float = 0.0, r: float = 0.0,
                 momentum_buffer: MomentumBuffer | None = None, dims: Sequence[int] | None = None) -> Tensor:
    r"""Adaptive projected guidance: classifier-free guidance with the update split, rescaled and
    momentum-averaged (Sadat et al., arXiv 2410.02416, Algorithm 1).

    With ``D_c`` = ``cond``, ``D_u`` = ``uncond``, ``w`` = ``scale``:

    * ``Delta D = D_c - D_u``; with a momentum buffer ``Delta D <- Delta D + beta Delta D_prev`` (Sec. 5);
    * rescale: ``Delta D <- Delta D min(1, r / ||Delta D||)`` when ``r`` > 0 (Eq. 9);
    * split relative to ``D_c``: ``Delta D_par = <Delta D, D_c>/<D_c, D_c> D_c``,
      ``Delta D_perp = Delta D - Delta D_par`` (Eq. 5-6);
    * ``D_w = D_c + (w - 1) (Delta D_perp + eta Delta D_par)`` (Eq. 7).

    ``eta = 1, r = 0`` and no buffer is plain CFG ``D_u + w (D_c - D_u)``. Norms and inner
    products are per sample, over ``dims`` (default: every dimension but the first, the batch);
    computed in float64 as the paper's code, returned in ``cond``'s dtype. A sample whose
    ``cond`` has zero norm raises ``ValueError`` (see :func:`apg_project`).
    """
    _check_hyper(eta, r, 0.0 if momentum_buffer is None else momentum_buffer.beta)
    if cond.shape != uncond.shape:
        raise ValueError(f"apg_guidance: cond shape {tuple(cond.shape)} != uncond shape {tuple(uncond.shape)}")
    dims = list(range(1, cond.ndim)) if dims is None else list(dims)
    c, u = cond.double(), uncond.double()
    d = c - u
    if momentum_buffer is not None:
        d = momentum_buffer.update(d)
    if r > 0:
        n = d.norm(p=2, dim=dims, keepdim=True)
        d = d * torch.minimum(torch.ones_like(n), r / n)
    _, normalized = apg_project(d, c, eta, dims, what="cond prediction (sample)")
    return (c + (scale - 1) * normalized).to(cond.dtype)


def scale_by_apg(reference: Callable[[Tensor], Tensor | None] | None = None) -> Transform:
    r"""APG's update rule applied to a parameter update (Sadat et al., arXiv 2410.02416, Algorithm 1):
    the guidance difference ``Delta D`` becomes the incoming update ``u``, the conditional
    prediction ``D_c`` becomes a reference direction ``v`` per tensor.

    * momentum: ``m <- u + beta m`` (state ``buf``; ``u <- m``), with ``beta`` = ``hyper["apg_beta"]``
      (negative: the paper's reverse momentum; 0: off, no state kept);
    * rescale: ``u <- u min(1, r / ||u||)`` with ``r`` = ``hyper["apg_r"]`` (0: off);
    * split: ``u_par = <u, v>/<v, v> v``, ``u <- (u - u_par) + eta u_par`` with ``eta`` = ``hyper["apg_eta"]``.

    The order is the paper's (momentum, rescale, project). ``reference(param)`` returns ``v``
    (same shape as the parameter) or ``None`` to pass that tensor's update through untouched;
    the default (``reference=None``) is the parameter itself, the weight-space analogue of
    ``D_c``: the parallel part of an update only grows or shrinks ``||theta||`` (the
    "oversaturation" of weights), the orthogonal part turns it. A reference of zero norm
    (e.g. a zero-initialised bias under the default) raises ``ValueError`` naming the tensor;
    return ``None`` for such tensors. Put a learning-rate stage after it:
    ``chain(scale_by_apg(), scale_by_learning_rate())``. Records ``parallel_frac``
    (``||u_par|| / ||u||``, i.e. ``|cos(u, v)|``, after rescaling) and ``rescale`` (the factor
    applied, when ``r`` > 0).
    """

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        eta, r, beta = hyper["apg_eta"], hyper["apg_r"], hyper["apg_beta"]
        _check_hyper(eta, r, beta)
        refs = [None if u is None else (p if reference is None else reference(p))
                for u, p in zip(updates, params, strict=True)]
        for i, (u, v) in enumerate(zip(updates, refs, strict=True)):  # refuse before any state changes
            if v is not None:
                if v.shape != u.shape:
                    raise ValueError(f"apg: reference for tensor {i} has shape {tuple(v.shape)}, "
                                     f"the update {tuple(u.shape)}")
                if not bool(v.any()):
                    raise ValueError(f"apg: reference direction of tensor {i} (shape {tuple(v.shape)}) has zero "
                                     f"norm (0.0); pass reference=... returning None for it")
        out: Updates = []
        for u, s, v in zip(updates, states, refs, strict=True):
            if u is None or v is None:
                out.append(u)
                continue
            d = u.float()
            if beta != 0 or "buf" in s:
                if "buf" not in s:
                    s["buf"] = torch.zeros_like(d)
                d = s["buf"].mul_(beta).add_(d).clone()
            if r > 0:
                n = d.norm()
                f = torch.clamp(r / n, max=1.0)
                d = d * f
                s["rescale"] = f.detach()
            par, new = apg_project(d, v.float(), eta)
            s["parallel_frac"] = (par.norm() / d.norm().clamp_min(1e-30)).detach()
            out.append(u.copy_(new))
        return out

    return Transform(lambda p, h: {}, update, "apg", False, declare(
        "scale_by_apg",
        apg_eta=(0.0, "APG weight eta of the parallel component"),
        apg_r=(0.0, "APG norm threshold r (0: no rescaling)"),
        apg_beta=(0.0, "APG momentum beta (negative: the paper's reverse momentum)")))
