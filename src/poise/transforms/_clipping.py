"""Clipping and normalisation: global norm, Stable-SPAM's spike clipping and norm
normalisation, RMS normalisation."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from poise.transforms._base import Hyper, State, Transform, Updates

__all__ = [
    "clip_by_global_norm",
    "clip_spikes_by_max_ema",
    "cosine_momentum_schedule",
    "normalize_by_norm_ema",
    "normalize_by_rms",
]


def clip_by_global_norm() -> Transform:
    r"""``u <- u * min(1, c / (\|u\|_2 + 1e-6))`` with ``\|u\|_2`` over the whole group and
    ``c`` = ``hyper["max_norm"]`` (torch.nn.utils.clip_grad_norm_'s rule, branch-free).
    Records ``clip_norm`` (the norm before clipping) in each parameter's state."""

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        live = [u for u in updates if u is not None]
        if not live:
            return updates
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(u) for u in live]))
        coef = (hyper["max_norm"] / (norm + 1e-6)).clamp(max=1.0)
        for s in states:
            s["clip_norm"] = norm.detach()
        return [None if u is None else u * coef for u in updates]

    return Transform(lambda p, h: {}, update, "clip_global_norm")


def clip_spikes_by_max_ema() -> Transform:
    r"""Stable-SPAM's adaptive spike clipping (Huang et al., arXiv 2502.17055, Alg. 1;
    TianjinYellow/StableSPAM ``stablespam.py``).

    ``M <- theta M + (1 - theta) max|g|``, ``\hat M = M / (1 - theta^t)``; entries with
    ``|g_i| > \hat M`` become ``g_i / max|g| * \hat M``. ``theta`` = ``hyper["gamma3"]``,
    ``t`` the shared step. State: ``m_max_t``; records ``clipped_frac``.
    """

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        theta = hyper["gamma3"]
        out: Updates = []
        for u, s in zip(updates, states, strict=True):
            if u is None:
                out.append(None)
                continue
            if "m_max_t" not in s:
                s["m_max_t"] = torch.zeros((), dtype=torch.float32, device=u.device)
            gmax = u.abs().max()
            m = s["m_max_t"]
            m.copy_(theta * m + (1 - theta) * gmax)
            m_hat = m / (1 - theta ** float(s["step"]))
            mask = u.abs() > m_hat
            s["clipped_frac"] = mask.float().mean()
            out.append(torch.where(mask, u / gmax * m_hat, u))
        return out

    return Transform(lambda p, h: {}, update, "spike_clip")


def normalize_by_norm_ema() -> Transform:
    r"""Stable-SPAM's norm normalisation (arXiv 2502.17055): with ``n = \|g\|_2``,
    ``m <- g1 m + (1 - g1) n``, ``v <- g2 v + (1 - g2) n^2``, and
    ``g <- g / n * \hat m / (sqrt(\hat v) + eps)`` (bias-corrected by the shared step;
    unchanged when ``n = 0``). ``g1`` = ``hyper["gamma1"]`` times the shared
    ``momentum_scale`` if a schedule sets one, ``g2`` = ``hyper["gamma2"]``, ``eps`` =
    ``hyper["eps"]``. State: ``m_norm_t``, ``v_norm_t``.
    """

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        g2, eps = hyper["gamma2"], hyper["eps"]
        out: Updates = []
        for u, s in zip(updates, states, strict=True):
            if u is None:
                out.append(None)
                continue
            g1 = hyper["gamma1"] * (float(s["momentum_scale"]) if "momentum_scale" in s else 1.0)
            if "m_norm_t" not in s:
                s["m_norm_t"] = torch.zeros((), dtype=torch.float32, device=u.device)
                s["v_norm_t"] = torch.zeros((), dtype=torch.float32, device=u.device)
            t = float(s["step"])
            n = torch.linalg.vector_norm(u)
            m, v = s["m_norm_t"], s["v_norm_t"]
            m.copy_(g1 * m + (1 - g1) * n)
            v.copy_(g2 * v + (1 - g2) * n**2)
            c = (m / (1 - g1**t)) / (torch.sqrt(v / (1 - g2**t)) + eps)
            out.append(torch.where(n > 0, u / n * c, u))
        return out

    return Transform(lambda p, h: {}, update, "norm_ema")


def cosine_momentum_schedule() -> Transform:
    r"""Stable-SPAM's momentum schedule: when ``hyper["total_T"]`` is set, writes the shared
    ``momentum_scale = eta_min + (1 - eta_min)(1 + cos(pi c / (T + 1))) / 2`` with ``c`` the
    shared clock, ``T`` = ``total_T``, ``eta_min`` = ``hyper["eta_min"]`` (the official
    ``CosineDecay(1.0, total_T, eta_min)``, including its lack of a guard past ``T``).
    Does nothing when ``total_T`` is None."""

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        T = hyper.get("total_T")
        if T is None:
            return updates
        eta = hyper["eta_min"]
        for u, s in zip(updates, states, strict=True):
            if u is not None:
                c = float(s["clock"])
                s["momentum_scale"] = torch.tensor(eta + (1 - eta) * (1 + math.cos(math.pi * c / (T + 1))) / 2)
        return updates

    return Transform(lambda p, h: {}, update, "momentum_schedule")


def normalize_by_rms(eps: float = 1e-30) -> Transform:
    """``u <- u / (eps + rms(u))`` per tensor (SOAP's ``normalize_grads``)."""

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        return [None if u is None else u / (eps + torch.mean(u**2) ** 0.5) for u in updates]

    return Transform(lambda p, h: {}, update, "rms_normalize")
