"""Importance ratios and their correction: train-inference mismatch and staleness.

With ``logp`` = log pi_theta (trainer, now), ``old_logp`` = log pi_old (trainer, the policy
version that generated the batch, recomputed), ``behav_logp`` = log mu (the inference
engine's log-probs for the same version):

``pi_theta / mu = (pi_old / mu) * (pi_theta / pi_old) = rho * r``

``rho`` is the train-inference mismatch factor (same weights, different engine: bf16
sampling, kernels), ``r`` the staleness factor (policy moved since). (Qwen, "Stabilizing
RL with LLMs", arXiv 2512.01374; AReaL's decoupled PPO, arXiv 2505.24298; "Missing Old
Logits", arXiv 2605.12070.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from poise.rl._common import masked_mean, stats

__all__ = ["ISWeights", "LOG_RATIO_CLAMP", "decompose_ratio", "is_weights", "log_ratio", "prox_logp_loglinear",
           "sequence_log_ratio"]

LOG_RATIO_CLAMP = 20.0
LEVELS = ("token", "sequence", "geometric")
MODES = ("truncate", "mask")


def log_ratio(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``logp - ref_logp`` clamped to ``[-20, 20]`` (verl's guard against exp overflow)."""
    return (logp - ref_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def sequence_log_ratio(lr: Tensor, mask: Tensor, reduce: str = "sum") -> Tensor:
    """Per-sequence log-ratio ``[B]``: ``sum_t`` (sequence IS: the log of the product of token
    ratios) or ``mean_t`` (GSPO, geometric mean)."""
    if reduce == "sum":
        return (lr * mask).sum(-1)
    if reduce == "mean":
        return (lr * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    raise ValueError(f"reduce={reduce!r}; valid choices: sum, mean")


def decompose_ratio(logp: Tensor, old_logp: Tensor, behav_logp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor,
                                                                                              dict[str, Tensor]]:
    """``(log r, log rho)``: the staleness and mismatch log-ratios per token, and metrics
    (mean/max of each, and the k1/k3 KL of mu from pi_old)."""
    log_r = log_ratio(logp, old_logp)
    log_rho = log_ratio(old_logp, behav_logp)
    k1 = masked_mean(-log_rho, mask)
    k3 = masked_mean(torch.exp(-log_rho) - 1 + log_rho, mask)
    metrics = {**stats("staleness_log_ratio", log_r, mask), **stats("mismatch_log_ratio", log_rho, mask),
               "mismatch_kl_k1": k1.detach(), "mismatch_kl_k3": k3.detach()}
    return log_r, log_rho, metrics


class ISWeights(NamedTuple):
    """Detached per-token weights ``[B, T]`` to multiply the loss by, a keep-mask ``[B, T]``
    (1 where the sample survives masking), and metrics."""

    weights: Tensor
    keep: Tensor
    metrics: dict[str, Tensor]


def is_weights(log_rho: Tensor, mask: Tensor, *, level: str = "token", mode: str = "truncate",
               lo: float | None = None, hi: float | None = 2.0) -> ISWeights:
    r"""Importance-sampling correction for the train-inference mismatch ``rho = pi_old / mu``.

    ``level``: ``"token"`` (``rho_t``), ``"sequence"`` (``exp(sum_t log rho_t)`` for every
    token of the sequence) or ``"geometric"`` (``exp(mean_t log rho_t)``).
    ``mode``: ``"truncate"`` (TIS: ``w = min(rho, hi)``, and ``max(., lo)`` if ``lo`` is
    given) or ``"mask"`` (MIS / IcePop: ``w = rho`` where ``lo <= rho <= hi``, else the token
    or sequence is dropped: ``w = 0`` and ``keep = 0``). ``hi=None`` means no upper bound.

    Metrics: ``rho/{mean,min,max,std}`` before and ``is_weight/...`` after correction,
    ``truncated_frac`` or ``masked_frac``, and the effective sample size
    ``ess = (sum w)^2 / (n sum w^2)`` (1 for uniform weights).
    """
    if level not in LEVELS:
        raise ValueError(f"level={level!r}; valid choices: {', '.join(LEVELS)}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; valid choices: {', '.join(MODES)}")
    m = mask.to(log_rho.dtype)
    if level == "token":
        lr = log_rho
    else:
        seq = sequence_log_ratio(log_rho, m, "sum" if level == "sequence" else "mean")
        lr = seq.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)[:, None].expand_as(log_rho)
    rho = torch.exp(lr.detach())
    metrics = stats("rho", rho, mask)
    if mode == "truncate":
        w = rho.clamp(min=lo, max=hi) if (lo is not None or hi is not None) else rho
        changed = (w != rho) & mask.bool()
        keep = m.clone()
        metrics["truncated_frac"] = changed.to(m.dtype).sum() / m.sum().clamp_min(1)
    else:
        inside = torch.ones_like(rho, dtype=torch.bool)
        if lo is not None:
            inside &= rho >= lo
        if hi is not None:
            inside &= rho <= hi
        keep = m * inside.to(m.dtype)
        w = rho * keep
        metrics["masked_frac"] = 1 - keep.sum() / m.sum().clamp_min(1)
    w = w * m
    metrics.update(stats("is_weight", w, keep))
    sw, sw2, n = (w * keep).sum(), (w * w * keep).sum(), keep.sum().clamp_min(1)
    metrics["ess"] = (sw * sw / (n * sw2.clamp_min(1e-30))).detach()
    return ISWeights(w.detach(), keep.detach(), metrics)


def prox_logp_loglinear(behav_logp: Tensor, logp: Tensor, versions: Tensor, version: int) -> Tensor:
    r"""AReaL's approximate proximal policy (``prox_logp_method="loglinear"``) when the
    trainer never recomputed ``old_logp``: with per-token generation versions ``v_b``,
    ``alpha = clamp((v_prox - v_b)/(v_theta - v_b), 0, 1)`` where ``v_theta`` = ``version``
    and ``v_prox = v_theta - 1``; ``log pi_prox ~ behav_logp + alpha (sg[logp] - behav_logp)``.
    The "Missing Old Logits" paper (arXiv 2605.12070) motivates such an approximation."""
    v_theta = float(version)
    denom = (v_theta - versions.to(logp.dtype))
    alpha = torch.where(denom > 0, ((v_theta - 1) - versions.to(logp.dtype)) / denom.clamp_min(1e-30),
                        torch.zeros_like(denom)).clamp(0, 1)
    return behav_logp + alpha * (logp.detach() - behav_logp)
