r"""StableUN: neighbourhood-aware unlearning (Wu et al., "Beyond Sharp Minima: Robust LLM Unlearning
via Feedback-Guided Multi-Point Optimization", arXiv 2509.20230). No official code was found; this
follows the paper's description (forgetting feedback from perturbed parameters, remembering feedback,
gradient projection when they conflict) -- see docs/algorithms/stableun.md.

One step, with ``L_f`` the forget objective to minimise (e.g. :func:`~poise.edit.grad_ascent_loss`
or :func:`~poise.edit.npo_loss` on a forget batch) and ``L_r`` the retain loss:

1. temporary point ``theta_tau = theta - eta_in grad L_f(theta)`` (one plain unlearning step);
2. forgetting feedback: ``g_F = mean_k grad L_f(theta_tau + delta_k)`` over the neighbourhood
   probes ``delta_0 = rho grad L_f(theta_tau)/||grad L_f(theta_tau)||`` (sharpness-aware, the
   direction that undoes the forgetting fastest) and ``delta_k ~ N(0, sigma^2 I)``, ``k = 1..n_noise``;
3. remembering feedback: ``g_R = grad L_r(theta_tau)``;
4. projection: if ``<g_F, g_R> < 0``, ``g_F <- g_F - (<g_F, g_R>/||g_R||^2) g_R``;
5. the parameters' ``.grad`` is set to ``g_F + alpha g_R`` at the original ``theta``; the caller's
   optimizer steps.

Symbols -> arguments: ``eta_in`` = ``inner_lr``, ``rho``, ``sigma``, ``n_noise``, ``alpha``.
With ``inner_lr = rho = n_noise = 0`` and no conflict the step is GradDiff's gradient
``grad (L_f + alpha L_r)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["project_conflict", "stableun_backward"]


def project_conflict(g_f: Tensor, g_r: Tensor) -> tuple[Tensor, bool]:
    """``g_f - (<g_f, g_r>/||g_r||^2) g_r`` when ``<g_f, g_r> < 0`` (then ``<result, g_r> = 0``),
    else ``g_f`` unchanged; flat vectors. Returns the gradient and whether it was projected."""
    dot = torch.dot(g_f, g_r)
    nr = torch.dot(g_r, g_r)
    if dot < 0 and nr > 0:
        return g_f - (dot / nr) * g_r, True
    return g_f, False


def _flat_grad(loss: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params,
                                                                                                strict=True)])


def _set_(params: Sequence[nn.Parameter], vec: Tensor) -> None:
    i = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(vec[i : i + n].view_as(p))
            i += n


def stableun_backward(params: Sequence[nn.Parameter], forget_loss: Callable[[], Tensor],
                      retain_loss: Callable[[], Tensor] | None, inner_lr: float = 0.0, rho: float = 0.05,
                      sigma: float = 0.0, n_noise: int = 0, alpha: float = 1.0,
                      generator: torch.Generator | None = None) -> dict[str, float]:
    """One StableUN gradient (module doc): writes ``g_F + alpha g_R`` into ``p.grad`` for ``params``
    and leaves the parameters where they were. ``forget_loss``/``retain_loss`` are closures that run
    the model and return scalar losses (``retain_loss=None``: no remembering feedback).
    Returns ``{"forget_loss", "cos_fr", "projected", "n_points"}`` (floats)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("stableun_backward needs at least one parameter with requires_grad")
    for name, v in (("inner_lr", inner_lr), ("rho", rho), ("sigma", sigma), ("n_noise", n_noise)):
        if v < 0:
            raise ValueError(f"{name}={v} must be >= 0")
    theta = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    try:
        l0 = forget_loss()
        g0 = _flat_grad(l0, params)
        if inner_lr > 0:  # temporary point theta_tau
            _set_(params, theta - inner_lr * g0)
            g_tau = _flat_grad(forget_loss(), params)
        else:
            g_tau = g0
        tau = torch.cat([p.detach().reshape(-1) for p in params]).clone()
        probes: list[Tensor] = []
        if rho > 0:
            probes.append(rho * g_tau / (g_tau.norm() + 1e-12))
        for _ in range(n_noise):
            dev = generator.device if generator is not None else tau.device
            noise = torch.randn(tau.shape, generator=generator, dtype=tau.dtype, device=dev)
            probes.append(sigma * noise.to(tau.device))
        if probes:
            g_f = torch.zeros_like(tau)
            for d in probes:
                _set_(params, tau + d)
                g_f += _flat_grad(forget_loss(), params)
            _set_(params, tau)
            g_f /= len(probes)
        else:
            g_f = g_tau
        cos, projected = 0.0, False
        total = g_f
        if retain_loss is not None:
            g_r = _flat_grad(retain_loss(), params)
            cos = float(torch.dot(g_f, g_r) / (g_f.norm() * g_r.norm() + 1e-12))
            g_f, projected = project_conflict(g_f, g_r)
            total = g_f + alpha * g_r
    finally:
        _set_(params, theta)  # back to theta exactly
    i = 0
    for p in params:
        n = p.numel()
        p.grad = total[i : i + n].view_as(p).clone()
        i += n
    return {"forget_loss": float(l0.detach()), "cos_fr": cos, "projected": float(projected),
            "n_points": float(max(1, len(probes)))}
