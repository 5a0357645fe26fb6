"""Clipping and normalisation: global norm, Stable-SPAM's spike clipping and norm
normalisation, RMS normalisation."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from poise.transforms._base import EPS, REQUIRED, Hyper, State, Transform, Updates, compiling, declare

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
        return [None if u is None else u.mul_(coef) for u in updates]

    return Transform(lambda p, h: {}, update, "clip_global_norm",
                     reads=declare("clip_global_norm", max_norm=(REQUIRED, "global-norm clipping bound")))


def _scalars(states: list[State], key: str, device: torch.device) -> Tensor:
    """Stack one 0-d state entry of every parameter into a vector (created as zeros)."""
    for s in states:
        if key not in s:
            s[key] = torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([s[key] for s in states])


def _store(states: list[State], key: str, values: Tensor) -> None:
    torch._foreach_copy_([s[key] for s in states], list(values.unbind()))


def clip_spikes_by_max_ema() -> Transform:
    r"""Stable-SPAM's adaptive spike clipping (Huang et al., arXiv 2502.17055, Alg. 1;
    TianjinYellow/StableSPAM ``stablespam.py``).

    ``M <- theta M + (1 - theta) max|g|``, ``\hat M = M / (1 - theta^t)``; entries with
    ``|g_i| > \hat M`` become ``g_i / max|g| * \hat M``. ``theta`` = ``hyper["gamma3"]``,
    ``t`` the shared step. State: ``m_max_t``; records ``clipped_frac``. The per-tensor
    scalars of the whole group are updated as one vector; only tensors that hold a spike
    are touched elementwise beyond the max (under torch.compile: every tensor, branch-free).
    """

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        theta = hyper["gamma3"]
        live = [i for i, u in enumerate(updates) if u is not None]
        if not live:
            return updates
        us = [updates[i] for i in live]
        sts = [states[i] for i in live]
        gmax = _max_abs(us)  # max|g| per tensor
        m = _scalars(sts, "m_max_t", us[0].device).mul_(theta).add_(gmax, alpha=1 - theta)
        _store(sts, "m_max_t", m)
        steps = torch.stack([s["step"] for s in sts]).to(m.device)
        m_hat = m / (1 - torch.pow(theta, steps))
        out: Updates = list(updates)
        if compiling():  # branch-free: every tensor masked (no host sync, no graph break)
            for j, i in enumerate(live):
                u, s = us[j], sts[j]
                a = u.abs() > m_hat[j]
                s["clipped_frac"] = a.float().mean()
                out[i] = u.copy_(torch.where(a, u * (m_hat[j] / gmax[j]), u))
            return out
        spikes = (gmax > m_hat).tolist()  # one host sync for the group (the authors sync per tensor)
        zeros = torch.zeros(len(live), device=us[0].device).unbind()  # one allocation for the spike-free tensors
        for j, i in enumerate(live):
            u, s = us[j], sts[j]
            if spikes[j]:
                a = u.abs().gt_(m_hat[j])  # 0/1 mask of the spikes
                s["clipped_frac"] = a.mean()
                # spikes become g / max|g| * M_hat: multiply by 1 + mask * (M_hat / max|g| - 1)
                out[i] = u.mul_(a.mul_(m_hat[j] / gmax[j] - 1).add_(1))
            else:
                s["clipped_frac"] = zeros[j]
        return out

    return Transform(lambda p, h: {}, update, "spike_clip",
                     reads=declare("clip_spikes_by_max_ema", gamma3=(REQUIRED, "Stable-SPAM max|g| EMA rate theta")))


def _max_abs(us: list[Tensor]) -> Tensor:
    """``max|g|`` of each tensor, as one vector (exact: a max rounds nothing). On CPU from each
    tensor's ``aminmax`` (one read; ``torch._foreach_norm(ord=inf)`` is 4-10x slower there, measured
    on 52 tensors of 0.3M-3M parameters); elsewhere and under torch.compile, ``_foreach_norm``."""
    if compiling() or not us[0].is_cpu or any(u.numel() == 0 for u in us):  # aminmax refuses an empty tensor
        return torch.stack(torch._foreach_norm(us, float("inf")))
    lo, hi = zip(*(torch.aminmax(u) for u in us), strict=True)
    return torch.maximum(torch.stack(lo).abs(), torch.stack(hi).abs())


def normalize_by_norm_ema() -> Transform:
    r"""Stable-SPAM's norm normalisation (arXiv 2502.17055): with ``n = \|g\|_2``,
    ``m <- g1 m + (1 - g1) n``, ``v <- g2 v + (1 - g2) n^2``, and
    ``g <- g / n * \hat m / (sqrt(\hat v) + eps)`` (bias-corrected by the shared step;
    unchanged when ``n = 0``). ``g1`` = ``hyper["gamma1"]`` times the shared
    ``momentum_scale`` if a schedule sets one, ``g2`` = ``hyper["gamma2"]``, ``eps`` =
    ``hyper["eps"]``. State: ``m_norm_t``, ``v_norm_t``; the group's scalars are updated as
    one vector.
    """

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        g2, eps = hyper["gamma2"], hyper["eps"]
        live = [i for i, u in enumerate(updates) if u is not None]
        if not live:
            return updates
        us = [updates[i] for i in live]
        sts = [states[i] for i in live]
        dev = us[0].device
        if compiling():  # the schedule's scale stays a tensor (no host sync)
            g1 = torch.stack([(hyper["gamma1"] * s["momentum_scale"]).to(dev, torch.float32) if "momentum_scale" in s
                              else torch.tensor(float(hyper["gamma1"]), device=dev) for s in sts])
        else:
            g1 = torch.tensor([hyper["gamma1"] * (float(s["momentum_scale"]) if "momentum_scale" in s else 1.0)
                               for s in sts], device=dev)
        steps = torch.stack([s["step"] for s in sts]).to(dev)
        n = torch.stack(torch._foreach_norm(us))
        m = _scalars(sts, "m_norm_t", dev)
        v = _scalars(sts, "v_norm_t", dev)
        m = g1 * m + (1 - g1) * n
        v = g2 * v + (1 - g2) * n * n
        _store(sts, "m_norm_t", m)
        _store(sts, "v_norm_t", v)
        c = (m / (1 - torch.pow(g1, steps))) / (torch.sqrt(v / (1 - torch.pow(g2, steps))) + eps)
        factor = torch.where(n > 0, c / n, torch.ones_like(n))
        if compiling():
            for u, f in zip(us, factor.unbind(), strict=True):
                u.mul_(f)
        else:
            torch._foreach_mul_(us, factor.tolist())
        out: Updates = list(updates)
        for j, i in enumerate(live):
            out[i] = us[j]
        return out

    return Transform(lambda p, h: {}, update, "norm_ema",
                     reads=declare("normalize_by_norm_ema", gamma1=(REQUIRED, "Stable-SPAM norm EMA rate gamma1"),
                                   gamma2=(REQUIRED, "Stable-SPAM squared-norm EMA rate gamma2"), eps=EPS))


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
        if compiling():
            for u, s in zip(updates, states, strict=True):
                if u is not None:
                    s["momentum_scale"] = eta + (1 - eta) * (1 + torch.cos(math.pi * s["clock"] / (T + 1))) / 2
            return updates
        for u, s in zip(updates, states, strict=True):
            if u is not None:
                c = float(s["clock"])
                s["momentum_scale"] = torch.tensor(eta + (1 - eta) * (1 + math.cos(math.pi * c / (T + 1))) / 2)
        return updates

    return Transform(lambda p, h: {}, update, "momentum_schedule", True,
                     declare("cosine_momentum_schedule", total_T=(None, "Stable-SPAM momentum schedule length T"),
                             eta_min=(0.5, "Stable-SPAM momentum schedule floor", "total_T")))


def normalize_by_rms(eps: float = 1e-30) -> Transform:
    """``u <- u / (eps + rms(u))`` per tensor (SOAP's ``normalize_grads``)."""

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        return [None if u is None else u.div_(eps + torch.mean(u**2) ** 0.5) for u in updates]

    return Transform(lambda p, h: {}, update, "rms_normalize")
