r"""Advantage estimators that verl 0.9.1 and TRL 1.16 have beyond :mod:`poise.rl.advantages`:
REINFORCE++ and its group-baseline form, OPO, GPG, GRPO pass@k, the optimal token baseline and
the normalize-then-sum aggregation of several reward functions (TRL; verl's GDPO).

Conventions: ``rewards`` ``[B]`` (one outcome reward per sequence), ``group_id`` ``[B]`` int64 (the
prompt each sequence answers), ``mask`` ``[B, T]``. Estimators that produce per-token advantages
(REINFORCE++, its baseline form, OTB) return ``[B, T]`` (zero on masked tokens); the others
``[B]``. verl's estimators take ``token_level_rewards`` ``[B, T]`` (the outcome reward on the last
valid token: :func:`outcome_token_rewards`) and ``index`` (numpy group ids); they return
``(advantages, returns)`` with ``[B, T]`` advantages equal to poise's ``[B]`` ones times the mask.
All outputs are detached.
"""

from __future__ import annotations

import torch
from torch import Tensor

from poise._registry import register

__all__ = ["gpg_advantage", "normalize_then_sum_advantage", "opo_advantage", "optimal_token_baseline_advantage",
           "outcome_token_rewards", "passk_advantage", "reinforce_pp_advantage", "reinforce_pp_baseline_advantage",
           "token_whiten"]


def _groups(group_id: Tensor) -> list[Tensor]:
    """Row indices of each group, rows in ascending order (the order verl's loops see them)."""
    ids, inv = torch.unique(group_id, return_inverse=True)
    return [torch.nonzero(inv == g).flatten() for g in range(len(ids))]


def outcome_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """verl's token-level reward tensor ``[B, T]`` for outcome rewards: ``rewards[i]`` on the last
    valid token of row ``i`` (rows without a valid token get nothing)."""
    m = mask.bool()
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    last = (torch.arange(mask.shape[1], device=mask.device)[None, :] * m).argmax(-1)
    has = m.any(-1)
    out[has.nonzero().flatten(), last[has]] = rewards[has]
    return out


def token_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    r"""verl's ``masked_whiten`` over the valid tokens of the batch:
    ``(x - mean) / sqrt(var + eps)`` with the token mean and the *unbiased* token variance
    (``n / (n - 1)``, ``n`` = valid tokens; 0 variance when ``n <= 1``). Every sequence weighs
    by its length. Returns ``[B, T]``, zero on masked tokens."""
    m = mask.to(x.dtype)
    n = m.sum()
    xm = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    mean = xm.sum() / n.clamp_min(1)
    var = (((xm - mean) * m) ** 2).sum() / (n - 1).clamp_min(1)
    return (xm - mean) * torch.rsqrt(var + eps) * m


@register("advantage", "reinforce_pp")
def reinforce_pp_advantage(token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0) -> Tensor:
    r"""REINFORCE++ (Hu, arXiv 2501.03262; verl ``reinforce_plus_plus``,
    ``compute_reinforce_plus_plus_outcome_advantage``): the discounted return
    ``G_t = r_t + gamma G_{t+1}`` over valid tokens (a masked token, e.g. a tool observation,
    passes the running return through unchanged and gets 0), then whitened over all valid tokens
    of the batch (:func:`token_whiten`). ``token_rewards`` ``[B, T]`` (outcome rewards:
    :func:`outcome_token_rewards`); returns ``[B, T]``. Add the KL to the rewards beforehand if the
    recipe uses a reward-side KL (verl ``use_kl_in_reward``)."""
    with torch.no_grad():
        m = mask.to(token_rewards.dtype)
        r = torch.where(mask.bool(), token_rewards, torch.zeros_like(token_rewards))
        returns = torch.zeros_like(r)
        run = torch.zeros_like(r[:, 0])
        for t in reversed(range(r.shape[1])):
            new = r[:, t] + gamma * run
            returns[:, t] = new * m[:, t]
            run = new * m[:, t] + run * (1 - m[:, t])
        return token_whiten(returns, mask)


@register("advantage", "reinforce_pp_baseline")
def reinforce_pp_baseline_advantage(rewards: Tensor, group_id: Tensor, mask: Tensor) -> Tensor:
    r"""REINFORCE++-baseline (arXiv 2501.03262; verl ``reinforce_plus_plus_baseline``): subtract the
    group mean, ``r_i - mean_g`` (a group of one keeps ``r_i``), put it on every valid token and
    whiten over all valid tokens of the batch (:func:`token_whiten`, length-weighted). Returns
    ``[B, T]``."""
    with torch.no_grad():
        a = rewards.clone()
        for rows in _groups(group_id):
            if len(rows) > 1:
                a[rows] = rewards[rows] - rewards[rows].mean()
        return token_whiten(a[:, None].expand(mask.shape).to(rewards.dtype), mask)


@register("advantage", "opo")
def opo_advantage(rewards: Tensor, group_id: Tensor, lengths: Tensor) -> Tensor:
    r"""OPO, on-policy RL with the optimal reward baseline (Hao et al., arXiv 2505.23585; verl ``opo``):
    the length-weighted group baseline ``b_g = sum_{j in g} |y_j| r_j / sum_{j in g} |y_j|`` (the
    variance-minimising baseline when ``||grad log pi(y)||^2`` grows with length),
    ``A_i = r_i - b_g``; a group of one gets ``b = 0``. ``lengths`` ``[B]`` = ``mask.sum(-1)``."""
    with torch.no_grad():
        a = rewards.clone()
        ln = lengths.to(rewards.dtype)
        for rows in _groups(group_id):
            if len(rows) > 1:
                a[rows] = rewards[rows] - (ln[rows] * rewards[rows]).sum() / ln[rows].sum()
        return a


GPG_ALPHAS = ("verl", "paper")


@register("advantage", "gpg")
def gpg_advantage(rewards: Tensor, group_id: Tensor, *, f_norm: float = 1.0, alpha: str | float = "verl") -> Tensor:
    r"""GPG, group policy gradient (Chu et al., arXiv 2504.02546; verl ``gpg``, from
    AMAP-ML/GPG): ``A_i = alpha (r_i - mean_g) / f_norm`` (no std; a group of one gets ``r_i``)
    with the batch-level correction ``alpha``: ``"verl"`` (verl's code) ``B / max(#{i: r_i != 0}, 1)``;
    ``"paper"`` ``B / max(B - M, 1)`` with ``M`` the sequences of groups whose rewards are all
    equal (zero-gradient samples, the paper's definition); or a number. Use with the plain
    policy-gradient loss ``pg`` (verl's ``gpg`` loss is ``-A logp``)."""
    if isinstance(alpha, str) and alpha not in GPG_ALPHAS:
        raise ValueError(f"alpha={alpha!r}; valid choices: {', '.join(GPG_ALPHAS)} or a number")
    with torch.no_grad():
        b = rewards.shape[0]
        groups = _groups(group_id)
        if alpha == "verl":
            al = b / torch.count_nonzero(rewards).clamp(min=1)
        elif alpha == "paper":
            m_eq = sum(len(g) for g in groups if bool((rewards[g] == rewards[g][0]).all()))
            al = torch.as_tensor(b / max(b - m_eq, 1), dtype=rewards.dtype)
        else:
            al = torch.as_tensor(float(alpha), dtype=rewards.dtype)
        a = rewards.clone()
        for rows in groups:
            mean = rewards[rows].mean() if len(rows) > 1 else torch.zeros((), dtype=rewards.dtype)
            a[rows] = al * (rewards[rows] - mean) / f_norm
        return a


@register("advantage", "grpo_passk")
def passk_advantage(rewards: Tensor, group_id: Tensor, *, scale: bool = True, eps: float = 1e-6) -> Tensor:
    r"""GRPO for pass@k (Tang et al., "Optimizing language models for inference time objectives
    using RL", arXiv 2503.19595; verl ``grpo_passk``): in each group only the best sequence gets
    an advantage, ``A = r_max - r_second`` (the leave-one-out gain of the max), divided by the
    group's unbiased std ``+ eps`` when ``scale``; every other sequence gets 0. Ties for the max
    are broken by ``torch.topk`` (as verl). A group of fewer than 2 raises ``ValueError``."""
    with torch.no_grad():
        a = torch.zeros_like(rewards)
        for rows in _groups(group_id):
            r = rewards[rows]
            if r.numel() < 2:
                raise ValueError(f"pass@k needs at least 2 samples per group; group {int(group_id[rows[0]])} has "
                                 f"{r.numel()}")
            top, idx = torch.topk(r, 2)
            adv = top[0] - top[1]
            if scale:
                adv = adv / (r.std() + eps)
            a[rows[idx[0]]] = adv
        return a


@register("advantage", "optimal_token_baseline")
def optimal_token_baseline_advantage(token_rewards: Tensor, mask: Tensor, group_id: Tensor, old_logp: Tensor,
                                     sum_pi_squared: Tensor, *, is_weights: Tensor | None = None,
                                     handle_zero_tail: bool = True, eps: float = 1e-8) -> Tensor:
    r"""The optimal token baseline, OTB (Li et al., arXiv 2602.07078; verl
    ``optimal_token_baseline``, ``compute_optimal_token_baseline_advantage``).

    ``G_t`` = reward-to-go of ``token_rewards`` over valid tokens; the logit-gradient proxy
    ``w_t = 1 - 2 pi_t + sum_v pi(v)^2`` (``pi_t = exp(old_logp_t)``, ``sum_pi_squared`` =
    ``sum_v pi(v|context_t)^2`` per token, from the trainer's distribution), times ``rho~_t^2`` when
    ``is_weights`` (truncated IS weights) are given; ``W_t = sum_{j <= t} w_j`` over valid tokens;
    per group and position ``B_t = sum_i G_{i,t} W_{i,t} m_{i,t} / (sum_i W_{i,t} m_{i,t} + eps)``;
    ``A_{i,t} = (G_{i,t} - B_t) m_{i,t}``. A group of one gets ``B = 0``. ``handle_zero_tail``
    zeroes the baseline of the unique longest sequence of a group beyond the second-longest
    length (no other sequence informs it there). Returns ``[B, T]``.

    ``sum_pi_squared`` is not in a :class:`poise.rl.PolicyBatch`: the caller computes it from the
    logits (``softmax(logits).square().sum(-1)``) in the trainer's forward pass.
    """
    with torch.no_grad():
        m = mask.to(token_rewards.dtype)
        r = torch.where(mask.bool(), token_rewards, torch.zeros_like(token_rewards))
        returns = (r * m).flip(-1).cumsum(-1).flip(-1)
        w = 1 - 2 * torch.exp(torch.where(mask.bool(), old_logp, torch.zeros_like(old_logp))) + sum_pi_squared
        if is_weights is not None:
            w = w * is_weights ** 2
        wc = torch.where(mask.bool(), w, torch.zeros_like(w)).cumsum(-1)
        base = torch.zeros_like(returns)
        for rows in _groups(group_id):
            if len(rows) == 1:
                continue
            g, wg, mg = returns[rows], wc[rows], m[rows]
            base[rows] = ((g * wg * mg).sum(0) / ((wg * mg).sum(0) + eps))[None, :].expand(len(rows), -1)
            if handle_zero_tail:
                lens = mg.sum(-1)
                srt = torch.sort(lens).values
                longest = (lens == srt[-1]).nonzero().flatten()
                if longest.numel() == 1 and srt[-1] > srt[-2]:
                    base[rows[longest[0]], int(srt[-2]):] = 0.0
        return (returns - base) * m


def _nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """TRL's ``nanstd``: unbiased std ignoring NaNs; NaN where fewer than 2 values."""
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=keepdim) if dim is not None else \
        torch.nanmean((x - mean) ** 2)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=keepdim) if dim is not None else (~torch.isnan(x)).sum()
    corr = torch.where(count > 1, count / (count - 1).clamp_min(1), torch.full_like(var, float("nan")))
    return torch.sqrt(var * corr)


NTS_FINALS = ("batch", "none")


@register("advantage", "normalize_then_sum")
def normalize_then_sum_advantage(rewards_per_func: Tensor, group_id: Tensor, *, weights: Tensor | None = None,
                                 eps: float = 1e-4, final: str = "batch") -> Tensor:
    r"""Normalize-then-sum for several reward functions (TRL 1.16
    ``multi_objective_aggregation="normalize_then_sum"``; GDPO, Liu et al., arXiv 2601.05242,
    verl ``gdpo``).

    ``rewards_per_func`` ``[B, K]`` (NaN where a reward function did not score the sample). Per
    group ``g`` and function ``k``: ``z_ik = (r_ik - mean_g r_k) / (std_g r_k + eps)`` (NaN-aware
    mean and unbiased std; a group of one has std 0, so ``z = 0``, as TRL -- verl's GRPO step
    keeps ``r`` there: mean 0, std 1); ``s_i = sum_k w_k z_ik`` (NaN terms skipped;
    NaN if all of the row's rewards are NaN); then ``final="batch"`` (TRL):
    ``A_i = (s_i - mean s) / (std s + eps)`` over the batch (unbiased), NaN advantages set to 0;
    ``final="none"``: ``s`` itself (verl's GDPO then whitens over tokens:
    ``token_whiten(s[:, None] * mask, mask)``, with ``eps = 1e-6``). The alternative,
    sum-then-normalize (TRL's default), is :func:`poise.rl.group_advantage` of the weighted sum.
    """
    if final not in NTS_FINALS:
        raise ValueError(f"final={final!r}; valid choices: {', '.join(NTS_FINALS)}")
    if rewards_per_func.dim() != 2:
        raise ValueError(f"rewards_per_func must be [B, K]; got shape {tuple(rewards_per_func.shape)}")
    with torch.no_grad():
        x = rewards_per_func
        k = x.shape[1]
        w = torch.ones(k, dtype=x.dtype, device=x.device) if weights is None else weights.to(x.dtype)
        z = torch.empty_like(x)
        for rows in _groups(group_id):
            g = x[rows]
            mean = torch.nanmean(g, dim=0, keepdim=True)
            std = _nanstd(g, dim=0, keepdim=True) if len(rows) > 1 else torch.zeros_like(mean)
            z[rows] = (g - mean) / (std + eps)
        s = (z * w[None, :]).nansum(1)
        s[torch.isnan(x).all(1)] = float("nan")
        if final == "none":
            return s
        std = _nanstd(s) if s.numel() > 1 else torch.zeros((), dtype=s.dtype)
        return torch.nan_to_num((s - torch.nanmean(s)) / (std + eps), nan=0.0)
