r"""Policy losses that TRL 1.16 and verl 0.9.1 have beyond the core surrogates of
:mod:`poise.rl.losses`: VESPO, sequence-level SAPO and sequence-level two-sided clipping (delta),
GMPO, Clip-Cov and KL-Cov.

Same contract as :mod:`poise.rl.losses`: positional inputs named as the
:class:`poise.rl.PolicyBatch` fields (``logp``, ``old_logp``, ``behav_logp``, ``adv``, ``mask``),
keyword-only options, ``LossOut(values [B, T], metrics)`` with values zero on masked tokens.
Every input log-prob is replaced by 0 on masked positions before use (``torch.where``), so a
padded ``-inf`` or NaN there gives neither a NaN nor a gradient.

Sequence-level losses (``vespo``, ``seq_sapo``, ``seq_delta``, ``gmpo``) put the sequence's
loss on every valid token; aggregate them with ``"seq_mean_token_mean"`` (TRL's ``grpo`` and
``sapo`` normaliser; verl's ``geo_mean`` mean over sequences, with ``num_seqs=B``) -- except
VESPO, whose values differ per token (``-phi A logp_t``) and which TRL aggregates with the DAPO
normaliser (``"token_mean"`` with the global token count).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from poise._registry import register
from poise.rl._common import LossOut, masked_mean, stats

__all__ = ["clip_cov_loss", "gmpo_loss", "kl_cov_loss", "seq_delta_loss", "seq_sapo_loss", "vespo_loss"]

_LOG_EPS8 = math.log(1e-8)


def _clean(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` on valid tokens, 0 elsewhere (no NaN, no gradient from padded positions)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _token_adv(adv: Tensor, mask: Tensor) -> Tensor:
    a = adv[:, None].expand_as(mask) if adv.dim() == 1 else adv
    return _clean(a.detach().to(torch.promote_types(a.dtype, torch.float32)), mask)


def _kl_metrics(lr: Tensor, mask: Tensor) -> dict[str, Tensor]:
    d = lr.detach()
    return {"approx_kl_k1": masked_mean(-d, mask), "approx_kl_k3": masked_mean(torch.exp(-d) - 1 + d, mask)}


def _seq_mean_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """``mean_t (logp - old_logp)`` per sequence ``[B, 1]`` (with its gradient), 0 for an empty row."""
    m = mask.to(logp.dtype)
    lr = _clean(logp, mask) - _clean(old_logp, mask)
    return ((lr * m).sum(-1) / m.sum(-1).clamp_min(1))[:, None]


IS_MODES = ("truncate", "mask")
IS_LEVELS = ("token", "sequence")


@register("loss", "vespo")
def vespo_loss(logp: Tensor, old_logp: Tensor, behav_logp: Tensor, adv: Tensor, mask: Tensor, *,
               k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0,
               is_level: str = "token", is_mode: str = "truncate", is_min: float | None = None,
               is_max: float | None = None) -> LossOut:
    r"""VESPO, variational sequence-level soft policy optimization (arXiv 2602.10693; TRL 1.16
    ``loss_type="vespo"``, ``GRPOTrainer.get_gamma_weights``).

    A smooth, asymmetric gamma weight of the *sequence* importance ratio replaces the clip:
    ``w_i = exp(clamp(sum_t clamp(logp - old_logp, +-20) + sum_t log rho~_t, log 1e-8, 20))`` and
    ``phi(w) = e^lambda w^k e^{-lambda w}`` (``phi(1) = 1``), computed in log space as
    ``exp(lambda + k log w - lambda w)``; ``k, lambda = k_pos, lambda_pos`` where ``A >= 0``, else
    ``k_neg, lambda_neg`` (``lambda`` floored at 1e-4). The loss is ``l_t = -sg[phi(w_i)] A_t logp_t``.

    ``rho~`` is the train-inference correction TRL folds into ``w`` (its vLLM
    ``importance_sampling_ratio``): ``rho = exp(old_logp - behav_logp)`` per token
    (``is_level="token"``) or per sequence (``"sequence"``, the sum of the token log-ratios),
    truncated to ``[is_min, is_max]`` (``is_mode="truncate"``, TRL ``*_truncate``) or set to 0
    outside it (``"mask"``, TRL ``*_mask``; ``log 0`` is clamped to ``log 1e-8``), each log clamped
    to ``[log 1e-8, 20]``. With ``behav_logp = old_logp`` (no separate engine) ``rho~ = 1``.
    Symbols: ``logp`` = log pi_theta, ``old_logp`` = log pi_old, ``behav_logp`` = log mu, ``adv`` = A.
    Aggregate with ``"token_mean"`` (TRL's normaliser for vespo).
    Metric: ``vespo/phi_seq_mean`` (the mean of ``phi`` over non-empty sequences; TRL: over all rows).
    """
    if is_mode not in IS_MODES:
        raise ValueError(f"is_mode={is_mode!r}; valid choices: {', '.join(IS_MODES)}")
    if is_level not in IS_LEVELS:
        raise ValueError(f"is_level={is_level!r}; valid choices: {', '.join(IS_LEVELS)}")
    m = mask.to(logp.dtype)
    a = _token_adv(adv, mask)
    with torch.no_grad():
        lr = (_clean(logp, mask) - _clean(old_logp, mask)).clamp(-20.0, 20.0)
        seq = (lr * m).sum(-1, keepdim=True)
        d = _clean(old_logp, mask) - _clean(behav_logp, mask)
        if is_level == "sequence":
            d = (d * m).sum(-1, keepdim=True)
        rho = torch.exp(d)
        if is_mode == "truncate":
            if is_min is not None or is_max is not None:
                rho = rho.clamp(min=is_min, max=is_max)
        else:
            out = torch.zeros_like(rho, dtype=torch.bool)
            if is_min is not None:
                out |= rho < is_min
            if is_max is not None:
                out |= rho > is_max
            rho = rho.masked_fill(out, 0.0)
        log_rho = torch.log(rho).clamp(_LOG_EPS8, 20.0)
        seq = seq + (log_rho * m).sum(-1, keepdim=True) if is_level == "token" else seq + log_rho
        log_w = seq.clamp(_LOG_EPS8, 20.0)
        nonneg = a >= 0
        k = torch.where(nonneg, torch.full_like(a, k_pos), torch.full_like(a, k_neg))
        lam = torch.where(nonneg, torch.full_like(a, lambda_pos), torch.full_like(a, lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        n = m.sum(-1)
        rows = n > 0
        phi_seq = ((phi * m).sum(-1)[rows] / n[rows]).mean() if rows.any() else torch.zeros((), dtype=m.dtype)
    vals = -phi * a * _clean(logp, mask) * m
    return LossOut(vals, {**_kl_metrics(lr, mask), "vespo/phi_seq_mean": phi_seq})


@register("loss", "seq_sapo")
def seq_sapo_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, tau_pos: float = 1.0,
                  tau_neg: float = 1.05) -> LossOut:
    r"""Sequence-level SAPO (SAPO, arXiv 2511.20347, with the GSPO sequence ratio of arXiv 2507.18071;
    TRL 1.16 ``loss_type="sapo", importance_sampling_level="sequence"``).

    ``s_i = exp(mean_t (logp - old_logp))`` (the length-normalised sequence ratio, its log clamped
    to +-20), ``g(s) = sigmoid(tau (s - 1)) 4 / tau`` with ``tau = tau_pos`` if ``A > 0`` else
    ``tau_neg``, ``l = -g(s_i) A_i`` on every valid token. The gradient flows through ``s_i``
    itself (TRL's convention: with per-token weights ``w_t`` the gradient is
    ``sum_t w_t/|y| g'(s) s A / |y| sum_u grad logp_u``; verl's ``sg[s] pi/sg[pi]`` form
    would give ``sum_t w_t g'(s) s A grad logp_t / |y|``; the two agree when ``w`` is uniform).
    Aggregate with ``"seq_mean_token_mean"`` (TRL sapo). ``g'(1) = 1``: on-policy, the
    gradient is GSPO's ``A grad mean_t logp_t``. The +-20 clamp only acts where ``g`` is flat
    (TRL has none; values agree to ``sigmoid(-tau) - sigmoid(tau (e^{-20} - 1))``).
    """
    a = _token_adv(adv, mask)
    s = torch.exp(_seq_mean_log_ratio(logp, old_logp, mask).clamp(-20.0, 20.0))
    tau = torch.where(a > 0, torch.full_like(a, tau_pos), torch.full_like(a, tau_neg))
    g = torch.sigmoid(tau * (s - 1)) * 4 / tau
    m = mask.to(logp.dtype)
    return LossOut(-g * a * m, stats("seq_ratio", s.detach().expand_as(m), mask))


@register("loss", "seq_delta")
def seq_delta_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, eps_low: float = 3e-4,
                   eps_high: float = 4e-4, delta: float | None = 4.0) -> LossOut:
    r"""Sequence-level two-sided clipping: INTELLECT-2's ``delta`` bound (arXiv 2505.07291) on the
    GSPO sequence ratio (arXiv 2507.18071); TRL 1.16 ``loss_type="grpo", delta=...,
    importance_sampling_level="sequence"``.

    ``s_i = exp(mean_t (logp - old_logp))`` (log clamped to +-20),
    ``l = -min(min(s_i, delta) A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)`` on every valid
    token: for ``A < 0`` the unbounded ``s A`` term is capped at ``delta A`` (a ratio above
    ``delta`` contributes no gradient). ``delta=None`` is TRL's sequence-level GRPO (GSPO with the
    gradient through ``s_i`` itself, see :func:`seq_sapo_loss`). The result equals
    ``dual_clip``-style capping only when ``delta > 1 + eps_high``. Aggregate with
    ``"seq_mean_token_mean"`` (TRL grpo). Defaults: GSPO's eps, INTELLECT-2's ``delta = 4``.
    """
    if delta is not None and delta <= 0:
        raise ValueError(f"delta={delta} must be > 0 (or None)")
    a = _token_adv(adv, mask)
    s = torch.exp(_seq_mean_log_ratio(logp, old_logp, mask).clamp(-20.0, 20.0))
    s2 = s.clamp(1 - eps_low, 1 + eps_high)
    s1 = s if delta is None else s.clamp(max=delta)
    m = mask.to(logp.dtype)
    loss = -torch.minimum(s1 * a, s2 * a)
    sd = s.detach().expand_as(m)
    hit = ((a > 0) & (sd > 1 + eps_high)) | ((a < 0) & (sd < 1 - eps_low))
    metrics = {**stats("seq_ratio", sd, mask), "clip_frac/region": masked_mean(hit.to(m.dtype), mask)}
    if delta is not None:
        metrics["clip_frac/delta"] = masked_mean(((a < 0) & (sd > delta)).to(m.dtype), mask)
    return LossOut(loss * m, metrics)


@register("loss", "gmpo")
def gmpo_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, eps_low: float = 0.4,
              eps_high: float = 0.4) -> LossOut:
    r"""GMPO, geometric-mean policy optimization (arXiv 2507.20673; verl ``geo_mean``,
    ``compute_policy_loss_geo_mean``, from callsys/GMPO ``train_zero_math_gmpo.py``).

    The token log-ratios ``d_t = logp_t - old_logp_t`` are clipped in log space, the bound chosen
    by the sign of ``A_t``: ``d~_t = sgn(A_t) min(sgn(A_t) d_t, sgn(A_t) clip(d_t, -eps_low, eps_high))``;
    the sequence ratio is their geometric mean ``R_i = exp(mean_t d~_t)`` and the sequence
    advantage ``A_i = mean_t A_t``; ``L_i = -A_i R_i``, put on every valid token. Aggregate with
    ``"seq_mean_token_mean"`` and ``num_seqs=B`` for verl's ``torch.mean`` over rows (verl
    ignores ``loss_agg_mode`` here). Defaults: the paper's ``(e^{-0.4}, e^{0.4})`` range (verl
    reads ``clip_ratio_low/high``). verl divides by ``|y_i| + 1e-8``, poise by ``max(|y_i|, 1)``.
    Metrics: ``clip_frac/high`` (clipped with ``A > 0``), ``clip_frac/low`` (``A < 0``).
    """
    m = mask.to(logp.dtype)
    a = _token_adv(adv, mask)
    d = _clean(logp, mask) - _clean(old_logp, mask)
    sgn = torch.sign(a)
    dc = d.clamp(-eps_low, eps_high)
    dmin = sgn * torch.minimum(sgn * d, sgn * dc)
    n = m.sum(-1).clamp_min(1)
    ratio = torch.exp((dmin * m).sum(-1) / n)
    seq_adv = (a * m).sum(-1) / n
    per_seq = -seq_adv * ratio
    clipped = (d.detach() != dc.detach()).to(m.dtype)
    metrics = {**_kl_metrics(d, mask), **stats("seq_ratio", ratio.detach()[:, None].expand_as(m), mask),
               "clip_frac/high": masked_mean(clipped * (a > 0), mask),
               "clip_frac/low": masked_mean(clipped * (a < 0), mask)}
    return LossOut(per_seq[:, None] * m, metrics)


@register("loss", "clip_cov")
def clip_cov_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, eps_low: float = 0.2,
                  eps_high: float | None = None, clip_cov_ratio: float = 2e-4, clip_cov_lb: float = 1.0,
                  clip_cov_ub: float = 5.0, generator: torch.Generator | None = None) -> LossOut:
    r"""Clip-Cov (Cui et al., "The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617;
    PRIME-RL/Entropy-Mechanism-of-RL, verl ``clip_cov``).

    The PPO clipped surrogate ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` with
    ``r = exp(logp - old_logp)`` (unclamped, as verl), where a random ``max(int(clip_cov_ratio N), 1)``
    of the valid tokens whose centred covariance
    ``C_t = (A_t - mean A)(logp_t - mean sg[logp])`` lies in ``(clip_cov_lb, clip_cov_ub)`` and
    that the PPO clip did not already clip get zero loss and gradient (``N`` = valid tokens,
    means over valid tokens). The draw is ``torch.randperm`` over the candidates in row-major
    order (``generator``; None = the global generator, as verl: same seed, same tokens).
    Metric: ``clip_frac/cov`` (the fraction of valid tokens detached).
    """
    if clip_cov_ratio <= 0:
        raise ValueError(f"clip_cov_ratio={clip_cov_ratio} must be > 0")
    eps_high = eps_low if eps_high is None else eps_high
    m = mask.to(logp.dtype)
    valid = mask.bool()
    a = _token_adv(adv, mask)
    lp = _clean(logp, mask)
    d = lp - _clean(old_logp, mask)
    r = torch.exp(d)
    l1 = -a * r
    l2 = -a * r.clamp(1 - eps_low, 1 + eps_high)
    with torch.no_grad():
        by_clip = (l2 > l1) & valid
        cov = (a - masked_mean(a, m)) * (lp.detach() - masked_mean(lp.detach(), m))
        cand = (cov < clip_cov_ub) & (cov > clip_cov_lb) & valid & ~by_clip
        idx = torch.nonzero(cand)
        n_clip = max(int(clip_cov_ratio * m.sum().item()), 1)
        corr = torch.ones_like(a)
        if len(idx) > 0:
            perm = torch.randperm(len(idx), generator=generator) if generator is not None else torch.randperm(len(idx))
            idx = idx[perm[: min(n_clip, len(idx))]]
            corr[idx[:, 0], idx[:, 1]] = 0
    loss = torch.maximum(l1, l2) * corr
    metrics = {**_kl_metrics(d, mask), "clip_frac/region": masked_mean(by_clip.to(m.dtype), m),
               "clip_frac/cov": masked_mean((corr == 0).to(m.dtype), m)}
    return LossOut(loss * m, metrics)


@register("loss", "kl_cov")
def kl_cov_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, kl_cov_ratio: float = 2e-4,
                ppo_kl_coef: float = 1.0) -> LossOut:
    r"""KL-Cov (Cui et al., arXiv 2505.22617; PRIME-RL/Entropy-Mechanism-of-RL, verl ``kl_cov``).

    ``l_t = -A_t r_t`` with ``r = exp(logp - old_logp)`` (unclamped, as verl); on the
    ``max(1, int(N kl_cov_ratio))`` valid tokens with the largest centred covariance
    ``C_t = (A_t - mean A)(sg[logp_t] - mean sg[logp])`` (``torch.topk``, means over the ``N``
    valid tokens) a KL penalty is added: ``l_t = -A_t r_t + ppo_kl_coef |logp_t - old_logp_t|``.
    No clip. verl's function default ``ppo_kl_coef`` is 1.0 (its ``ActorConfig`` default 0.1).
    Metrics: ``approx_kl_abs`` (verl's ``actor/ppo_kl`` here), ``kl_cov_frac``.
    """
    if kl_cov_ratio <= 0:
        raise ValueError(f"kl_cov_ratio={kl_cov_ratio} must be > 0")
    m = mask.to(logp.dtype)
    valid = mask.bool()
    a = _token_adv(adv, mask)
    lp = _clean(logp, mask)
    d = lp - _clean(old_logp, mask)
    r = torch.exp(d)
    pen = torch.zeros_like(a)
    with torch.no_grad():
        flat = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
        if len(flat) > 0:
            va, vl = a[valid].reshape(-1), lp.detach()[valid].reshape(-1)
            cov = (va - va.mean()) * (vl - vl.mean())
            top = flat[torch.topk(cov, max(1, int(len(cov) * kl_cov_ratio)), largest=True).indices]
            pen.view(-1)[top] = 1.0
    loss = -a * r + ppo_kl_coef * pen * d.abs()
    metrics = {**_kl_metrics(d, mask), "approx_kl_abs": masked_mean(d.detach().abs(), m),
               "kl_cov_frac": masked_mean(pen, m)}
    return LossOut(loss * m, metrics)
