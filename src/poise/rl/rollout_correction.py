r"""Rollout correction as verl 0.9.1 does it (``verl/trainer/ppo/rollout_corr_helper.py``): IS
weights of the trainer against the sampler with optional batch normalisation, rejection of
tokens or sequences by k1/k2/k3 divergences (token, sequence sum, mean or max), and -- the
choice verl leaves implicit -- whether rejected tokens stay in the loss denominator.

``log_ratio = trainer_logp - sampler_logp`` is ``log(pi_train / mu)`` per token (``pi_train`` the
trainer's log-probs of the sampled tokens: ``old_logp`` in decoupled mode, ``logp`` in verl's
bypass mode; ``mu`` the inference engine's). Masked positions may hold ``+-inf``/NaN: they are
replaced by 0 before use. No paper defines these exact rules; verl's references are
"When Speed Kills Stability" (Yao, Li et al., 2025 blog, richardli.xyz/rl-collapse) and IcePop /
TIS (arXiv 2512.01374 discusses both).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from poise.rl._common import masked_mean

__all__ = ["REJECTION_RULES", "Correction", "is_batch_normalize", "rejection_mask", "rollout_correction"]

SAFETY_BOUND = 20.0
REJECTION_RULES = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
                   "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
DENOMINATORS = ("kept", "all")


def _clean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _bounds(rule: str, threshold: float | tuple[float, float]) -> tuple[float | None, float]:
    if rule.endswith("k1"):
        if isinstance(threshold, tuple):
            lo, hi = float(threshold[0]), float(threshold[1])
        else:
            hi = float(threshold)
            lo = 1.0 / hi
        if lo <= 0 or hi <= 0 or lo > hi:
            raise ValueError(f"rule {rule!r}: thresholds must satisfy 0 < lower <= upper; got {threshold!r}")
        return math.log(lo), math.log(hi)
    if isinstance(threshold, tuple):
        raise ValueError(f"rule {rule!r} takes one upper bound, not {threshold!r}")
    if threshold <= 0:
        raise ValueError(f"rule {rule!r}: threshold must be > 0; got {threshold}")
    return None, float(threshold)


def rejection_mask(log_ratio: Tensor, mask: Tensor,
                   rules: dict[str, float | tuple[float, float]]) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Hard trust-region rejection (verl ``compute_rollout_rejection_mask``, ``rollout_rs``).

    With ``l = clamp(log_ratio, +-20)`` and per token ``k1 = -l``, ``k2 = l^2 / 2``,
    ``k3 = e^l - 1 - l``, each rule ``"{level}_{k}"`` computes a statistic -- per token
    (``token_``), or per sequence as the sum (``seq_sum_``), mean (``seq_mean_``) or max
    (``seq_max_``, k2/k3 only) over its valid tokens -- and keeps a token (or every token of the
    sequence) when it passes: ``k2``/``k3``: ``stat <= threshold``; ``k1``: ``log lower <= stat <=
    log upper`` with ``threshold = (lower, upper)`` or ``upper`` (then ``lower = 1 / upper``); note
    ``k1 = log(mu / pi_train)``, so the bounds are on the *inverse* ratio, as verl. Every rule in
    ``rules`` must pass. Returns the keep-mask ``[B, T]`` (``mask`` times the passes) and metrics
    ``rs/{rule}/masked_frac`` and ``rs/masked_frac`` (of valid tokens), ``rs/seq_masked_frac``.
    """
    if not rules:
        raise ValueError(f"rules is empty; valid rules: {', '.join(REJECTION_RULES)}")
    bad = [r for r in rules if r not in REJECTION_RULES]
    if bad:
        raise ValueError(f"unknown rejection rule(s) {', '.join(map(repr, bad))}; valid: {', '.join(REJECTION_RULES)}")
    m = mask.to(log_ratio.dtype)
    valid = mask.bool()
    lr = _clean(log_ratio, mask).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    per_tok = {"k1": -lr, "k2": 0.5 * lr ** 2, "k3": torch.exp(lr) - 1.0 - lr}
    keep = torch.ones_like(m)
    metrics: dict[str, Tensor] = {}
    for rule, threshold in rules.items():
        lo, hi = _bounds(rule, threshold)
        level, k = rule.rsplit("_", 1)
        v = per_tok[k]
        if level == "token":
            stat = v
        elif level == "seq_sum":
            stat = (v * m).sum(-1, keepdim=True)
        elif level == "seq_mean":
            stat = (v * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1)
        else:
            stat = v.masked_fill(~valid, float("-inf")).max(-1, keepdim=True).values
            stat = torch.where(torch.isinf(stat), torch.zeros_like(stat), stat)
        ok = (stat <= hi) if lo is None else (stat >= lo) & (stat <= hi)
        ok = ok.expand_as(m).to(m.dtype)
        keep = keep * ok
        metrics[f"rs/{rule}/masked_frac"] = masked_mean(1 - ok, m)
    keep = keep * m
    metrics["rs/masked_frac"] = masked_mean(1 - keep, m)
    rows = valid.any(-1)
    hit = ((keep < 0.5) & valid).any(-1)
    metrics["rs/seq_masked_frac"] = hit[rows].to(m.dtype).mean() if rows.any() else torch.zeros((), dtype=m.dtype)
    return keep, metrics


def is_batch_normalize(weights: Tensor, mask: Tensor, level: str = "token") -> tuple[Tensor, Tensor]:
    r"""Normalise IS weights to mean 1 over the batch (verl ``rollout_is_batch_normalize``):
    ``level="token"``: divide by the mean weight over valid tokens; ``"sequence"``: by the mean
    over non-empty sequences of each sequence's mean weight. A mean ``<= 1e-8`` leaves the
    weights unchanged (factor 1). Under data parallelism the mean must be the global one (verl
    all-reduces): all-reduce before calling. Returns ``(weights, factor)``."""
    m = mask.to(weights.dtype)
    if level == "token":
        mean = (weights * m).sum() / m.sum().clamp_min(1)
    elif level == "sequence":
        n = m.sum(-1)
        seq = (weights * m).sum(-1) / n.clamp_min(1)
        rows = (n > 0).to(weights.dtype)
        mean = (seq * rows).sum() / rows.sum().clamp_min(1)
    else:
        raise ValueError(f"level={level!r}; valid choices: token, sequence")
    if mean > 1e-8:
        return weights / mean, mean.detach()
    return weights, torch.ones((), dtype=weights.dtype, device=weights.device)


class Correction(NamedTuple):
    """Detached IS weights ``[B, T]`` (0 on rejected and masked tokens), the loss mask to
    aggregate with ``[B, T]`` and metrics."""

    weights: Tensor
    loss_mask: Tensor
    metrics: dict[str, Tensor]


def rollout_correction(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, is_level: str | None = "token",
                       is_mode: str = "truncate", is_max: float | None = 2.0, is_min: float | None = None,
                       batch_normalize: bool = False, reject: dict[str, float | tuple[float, float]] | None = None,
                       denominator: str = "kept") -> Correction:
    r"""IS weights, rejection and the loss mask for the train-inference mismatch, in one call
    (verl ``compute_rollout_correction_and_rejection_mask`` plus the denominator choice).

    * IS (``is_level`` ``"token"`` / ``"sequence"``; None: weights 1): ``rho = exp(clamp(l, +-20))``
      per token, or ``exp(clamp(sum_t l, +-20))`` on every token of the sequence, with
      ``l = trainer_logp - sampler_logp``; ``is_mode="truncate"`` (TIS, verl's single threshold):
      ``min(rho, is_max)`` (and ``max(., is_min)`` if given); ``"mask"`` (IcePop, verl's
      ``"lower_upper"`` threshold): ``rho`` inside ``[is_min, is_max]``, else the token is
      rejected (weight 0). ``batch_normalize``: :func:`is_batch_normalize` at ``is_level``.
    * Rejection (``reject``, verl ``rollout_rs``): :func:`rejection_mask`.
    * ``denominator``: ``"kept"`` (default) takes every rejected token out of the loss mask, so
      ``aggregate(values * weights, loss_mask, "token_mean")`` divides by the number of tokens
      that carry a gradient: the mean over the kept sample. ``"all"`` keeps the response mask
      (rejected tokens count in the denominator with weight 0: the loss shrinks as more tokens are
      rejected). Example: 5 tokens, 3 rejected, values ``v`` and weights ``w`` on the 2 kept:
      ``"kept"`` gives ``(w_1 v_1 + w_2 v_2) / 2``, ``"all"`` ``(w_1 v_1 + w_2 v_2) / 5``.

    Metrics: ``is/mean``, ``is/max``, ``is/ess`` (``(sum w)^2 / (n sum w^2)`` over valid tokens),
    ``is/masked_frac`` (IcePop), ``is/batch_norm_factor``, and :func:`rejection_mask`'s ``rs/*``.
    """
    if is_level not in (None, "token", "sequence"):
        raise ValueError(f"is_level={is_level!r}; valid choices: None, token, sequence")
    if is_mode not in ("truncate", "mask"):
        raise ValueError(f"is_mode={is_mode!r}; valid choices: truncate, mask")
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator={denominator!r}; valid choices: {', '.join(DENOMINATORS)}")
    if trainer_logp.shape != sampler_logp.shape or trainer_logp.shape != mask.shape:
        raise ValueError(f"shapes differ: trainer_logp {tuple(trainer_logp.shape)}, sampler_logp "
                         f"{tuple(sampler_logp.shape)}, mask {tuple(mask.shape)}")
    with torch.no_grad():
        m = mask.to(trainer_logp.dtype)
        lr = _clean(trainer_logp, mask) - _clean(sampler_logp, mask)
        keep = m.clone()
        metrics: dict[str, Tensor] = {}
        if is_level is None:
            w = m.clone()
        else:
            if is_level == "token":
                rho = torch.exp(lr.clamp(-SAFETY_BOUND, SAFETY_BOUND))
            else:
                rho = torch.exp((lr * m).sum(-1, keepdim=True).clamp(-SAFETY_BOUND, SAFETY_BOUND)).expand_as(m)
            rho = rho * m
            if is_mode == "truncate":
                w = rho.clamp(min=is_min, max=is_max) if (is_min is not None or is_max is not None) else rho
            else:
                inside = torch.ones_like(rho, dtype=torch.bool)
                if is_min is not None:
                    inside &= rho >= is_min
                if is_max is not None:
                    inside &= rho <= is_max
                w = torch.where(inside, rho, torch.zeros_like(rho))
                keep = keep * inside.to(m.dtype)
                metrics["is/masked_frac"] = masked_mean(1 - inside.to(m.dtype), m)
            w = w * m
            if batch_normalize:
                w, factor = is_batch_normalize(w, mask, is_level)
                metrics["is/batch_norm_factor"] = factor
            metrics["is/mean"] = masked_mean(w, m)
            metrics["is/max"] = w.masked_fill(~mask.bool(), float("-inf")).max() if mask.bool().any() else \
                torch.zeros((), dtype=w.dtype)
            sw, sw2, n = (w * m).sum(), (w * w * m).sum(), m.sum().clamp_min(1)
            metrics["is/ess"] = sw * sw / (n * sw2.clamp_min(1e-30))
        if reject:
            rs_keep, rs_metrics = rejection_mask(lr, mask, reject)
            keep = keep * rs_keep
            metrics.update(rs_metrics)
        w = w * keep
        loss_mask = keep if denominator == "kept" else m
        return Correction(w, loss_mask, metrics)
