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

from poise.rl._common import masked_mean, masked_zero, stats

__all__ = ["CONVENTIONS", "Convention", "ISWeights", "LOG_RATIO_CLAMP", "convention", "decompose_ratio", "is_weights",
           "log_ratio", "off_policy_mask", "prox_logp_loglinear", "sequence_log_ratio"]

LOG_RATIO_CLAMP = 20.0
LEVELS = ("token", "sequence", "geometric")
MODES = ("truncate", "mask")
GSPO_GRADS = ("token", "sequence")


class Convention(NamedTuple):
    r"""The numerical conventions of a framework's policy losses (docs/algorithms/rl.md,
    "Conventions"). Clamps guard ``exp`` against overflow but zero the gradient wherever they
    bind, so two frameworks with the same equations differ on extreme ratios.

    Fields:
        log_ratio_clamp: ``|logp - old_logp|`` clamp before ``exp`` in the token ratio
            (ppo_clip, cispo, sapo, minirl, decoupled_ppo); ``None``: no clamp.
        seq_log_ratio_max: upper clamp of GSPO's per-token log sequence ratio (verl: 10, i.e.
            ratio <= e^10); ``None``: no clamp.
        kl_log_ratio_clamp: ``|ref_logp - logp|`` clamp inside k3; ``None``: no clamp.
        kl_max: ``|k3|`` clamp of the output; ``None``: no clamp.
        gspo_grad: GSPO's per-token form. ``"token"`` (verl): ``sg[s_i] exp(logp_t - sg[logp_t])``,
            token ``t``'s gradient is ``s_i grad logp_t``; ``"sequence"`` (TRL): ``s_i`` itself on every
            token, so token ``t``'s value carries the whole sequence's gradient
            ``s_i / |y_i| sum_u grad logp_u``. Equal after a uniform per-sequence mean; different
            once per-token weights (an entropy mask, token-level IS) are uneven within a sequence.
    """

    log_ratio_clamp: float | None
    seq_log_ratio_max: float | None
    kl_log_ratio_clamp: float | None
    kl_max: float | None
    gspo_grad: str


#: verl's ``core_algos`` (log-ratio +-20, GSPO log sequence ratio <= 10, k3 inner +-20 and
#: output +-10) and TRL 1.16's ``GRPOTrainer._compute_loss`` (no clamp; GSPO's sequence
#: ratio as one (B, 1) tensor).
CONVENTIONS: dict[str, Convention] = {
    "verl": Convention(LOG_RATIO_CLAMP, 10.0, 20.0, 10.0, "token"),
    "trl": Convention(None, None, None, None, "sequence"),
}


def convention(c: str | Convention) -> Convention:
    """A :class:`Convention` from its preset name (``"verl"``, ``"trl"``) or itself; an unknown
    name raises listing the presets."""
    if isinstance(c, Convention):
        if c.gspo_grad not in GSPO_GRADS:
            raise ValueError(f"gspo_grad={c.gspo_grad!r}; valid choices: {', '.join(GSPO_GRADS)}")
        return c
    if c not in CONVENTIONS:
        raise ValueError(f"convention={c!r}; valid choices: {', '.join(CONVENTIONS)} (or a Convention)")
    return CONVENTIONS[c]


def log_ratio(logp: Tensor, ref_logp: Tensor, clamp: float | None = LOG_RATIO_CLAMP) -> Tensor:
    """``logp - ref_logp``, clamped to ``[-clamp, clamp]`` (default 20, verl's guard against exp
    overflow; ``None``: TRL, no clamp)."""
    d = logp - ref_logp
    return d if clamp is None else d.clamp(-clamp, clamp)


def sequence_log_ratio(lr: Tensor, mask: Tensor, reduce: str = "sum") -> Tensor:
    """Per-sequence log-ratio ``[B]``: ``sum_t`` (sequence IS: the log of the product of token
    ratios) or ``mean_t`` (GSPO, geometric mean). Masked positions add exactly 0."""
    if reduce == "sum":
        return (masked_zero(lr, mask) * mask).sum(-1)
    if reduce == "mean":
        return (masked_zero(lr, mask) * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    raise ValueError(f"reduce={reduce!r}; valid choices: sum, mean")


def off_policy_mask(adv: Tensor, logp: Tensor, behav_logp: Tensor, mask: Tensor, threshold: float) -> Tensor:
    r"""DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556; TRL ``off_policy_mask_threshold``,
    ``GRPOTrainer.get_off_policy_mask``): keep sequence ``i`` iff ``A_i >= 0`` or its mean
    token KL ``mean_t (log mu - sg[log pi_theta])`` is ``<= threshold``. Tokens whose
    ``behav_logp`` is NaN (unscored by the sampler) count as 0, as TRL. Returns a detached
    ``[B, 1]`` keep-mask (1 keep, 0 drop) in ``mask``'s dtype."""
    a = adv if adv.dim() == 2 else adv[:, None]
    kl = torch.nan_to_num(behav_logp - logp.detach(), nan=0.0)
    avg = (masked_zero(kl, mask) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    keep = (a >= 0) | (avg <= threshold)
    return keep.to(mask.dtype).detach()


def decompose_ratio(logp: Tensor, old_logp: Tensor, behav_logp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor,
                                                                                              dict[str, Tensor]]:
    """``(log r, log rho)``: the staleness and mismatch log-ratios per token, and metrics
    (mean/max of each, and the k1/k3 KL of mu from pi_old)."""
    log_r = masked_zero(log_ratio(logp, old_logp), mask)
    log_rho = masked_zero(log_ratio(old_logp, behav_logp), mask)
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
    log_rho = masked_zero(log_rho, m)
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
