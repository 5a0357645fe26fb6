"""Token weighting and selection (pure; return detached masks or weights)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["bapo_bounds", "capo_mask", "capo_token_kl", "echo_clip_eps", "entropy_topk_mask", "gtpo_conflict_weights",
           "gtpo_entropy_filter", "masked_entropy_stats", "steer_weights"]


TOPK_RULES = ("quantile", "ceil")


def entropy_topk_mask(entropy: Tensor, mask: Tensor, ratio: float = 0.2, *, rule: str = "quantile",
                      pool: Tensor | None = None) -> Tensor:
    r"""The "forking tokens" mask of "Beyond the 80/20 rule" (Wang et al., arXiv 2506.01939):
    1 on the highest-entropy valid tokens of the batch, 0 elsewhere.

    ``rule="quantile"`` (default; TRL 1.16 ``top_entropy_quantile``, ``get_high_entropy_mask``):
    keep ``H_t >= torch.quantile(pool, 1 - ratio)`` (linear interpolation between order
    statistics; ties at the threshold are all kept). Without ties that keeps
    ``N - ceil((N - 1)(1 - ratio))`` of ``N`` tokens (``ratio=0.3``: 7 of 24, 2 of 7).
    ``rule="ceil"``: exactly ``ceil(ratio * N)`` tokens (``torch.topk``; 8 of 24, 3 of 7), the
    count poise used before issue 12. ``ratio=0`` with ``"quantile"`` keeps the maximum (TRL's
    ``top_entropy_quantile=0.0``).

    ``pool`` (1-D) is the population the quantile is taken over; default: this batch's valid
    entropies. Under data parallelism pass the gathered valid entropies of all ranks (TRL gathers
    them and computes the quantile in float32: pass ``pool.float()`` to reproduce it bit for bit).
    The authors aggregate with ``mask * top_mask`` so that the token-mean denominator counts only
    the selected tokens; TRL keeps the full denominator (``num_tokens`` of
    :func:`poise.rl.aggregate`). Non-finite entropies on masked positions are ignored.
    """
    if rule not in TOPK_RULES:
        raise ValueError(f"rule={rule!r}; valid choices: {', '.join(TOPK_RULES)}")
    if not (0 <= ratio <= 1 if rule == "quantile" else 0 < ratio <= 1):
        raise ValueError(f"ratio={ratio} is out of range; valid: {'[0, 1]' if rule == 'quantile' else '(0, 1]'}")
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy has shape {tuple(entropy.shape)}; expected {tuple(mask.shape)} (the mask's)")
    valid = mask.bool()
    h = entropy.detach()
    out = torch.zeros_like(mask)
    if rule == "quantile":
        pool = h[valid] if pool is None else pool.detach().reshape(-1)
        if pool.numel() == 0:
            return out
        thr = torch.quantile(pool, 1 - ratio)
        keep = (torch.where(valid, h, torch.zeros_like(h)) >= thr) & valid
        return keep.to(mask.dtype)
    n = int(valid.sum())
    if n == 0:
        return out
    k = math.ceil(ratio * n)
    idx = torch.topk(h.masked_fill(~valid, float("-inf")).reshape(-1), k).indices
    out.view(-1)[idx] = 1
    return out


def steer_weights(adv: Tensor, entropy: Tensor, old_logp: Tensor, logp: Tensor, mask: Tensor, *,
                  w_min: float = 0.8, w_max: float = 1.0, linear: bool = False) -> Tensor:
    r"""STEER's entropy-change weights (Hao et al., arXiv 2510.10150; zz-haooo/STEER ``compute_token_weights``): with
    ``p = clamp(exp(logp), 1e-8, 1 - 1e-8)`` and ``H`` the token's entropy,
    ``Omega_t = |A_t / pi_old(y_t) * p (1 - p) (log p + H_t)|`` estimates the entropy change a
    step on that token causes; tokens that would change entropy most are down-weighted:
    exponential (default) ``w = clamp(exp(-k Omega), w_min, 1)``, ``k = -ln(w_min) / max(Omega_max, 0.02)``;
    ``linear=True``: ``w = w_max - (Omega - Omega_min)(w_max - w_min)/(Omega_max - Omega_min)``.
    Statistics over the valid tokens of the batch; detached."""
    with torch.no_grad():
        a = adv[:, None].expand_as(logp) if adv.dim() == 1 else adv
        p = torch.exp(logp).clamp(1e-8, 1 - 1e-8)
        pold = torch.exp(old_logp).clamp_min(1e-8)
        omega = (a / pold * p * (1 - p) * (torch.log(p) + entropy)).abs()
        valid = mask.bool()
        if not valid.any():
            return torch.ones_like(logp)
        o = omega[valid]
        if linear:
            lo, hi = o.min(), o.max()
            w = w_max - (omega - lo) * (w_max - w_min) / (hi - lo).clamp_min(1e-12)
            w = w.clamp(w_min, w_max)
        else:
            k = -math.log(w_min) / max(float(o.max()), 0.02)
            w = torch.exp(-k * omega).clamp(w_min, 1.0)
        return torch.where(mask != 0, w * mask + (1 - mask), torch.ones_like(w))


def gtpo_conflict_weights(token_ids: Tensor, adv: Tensor, group_id: Tensor, mask: Tensor, *,
                          w_conflict: float = 2.0) -> Tensor:
    r"""GTPO's conflict-token protection (Simoni et al., arXiv 2508.03772; winstonsmith1897/GTPO
    ``build_conflict_mask``).

    Within a group, position ``t`` is a conflict when its token id appears there in at least
    one positive-advantage and one negative-advantage completion, counting only the
    *initial run* of such positions (left-aligned) and, separately, the final run
    (right-aligned, so shared suffixes count too). Conflict tokens get weight
    ``w_conflict`` in positive completions and 0 in negative ones (protecting shared
    prefixes from being pushed down); other tokens 1. The left and right weights multiply
    (so a token in both runs can reach ``w_conflict^2``, as the authors'). Detached ``[B, T]``.
    """
    with torch.no_grad():
        a = adv if adv.dim() == 1 else adv[:, 0]
        m = mask.bool()

        def side(ids: Tensor, valid: Tensor) -> Tensor:
            w = torch.ones(ids.shape, dtype=mask.dtype, device=ids.device)
            for g in torch.unique(group_id):
                rows = (group_id == g).nonzero().flatten()
                pos, neg = rows[a[rows] > 0], rows[a[rows] < 0]
                if len(pos) == 0 or len(neg) == 0:
                    continue
                for i in rows.tolist():
                    other = neg if a[i] > 0 else pos if a[i] < 0 else None
                    if other is None:
                        continue
                    same = ((ids[other] == ids[i]) & valid[other] & valid[i]).any(0)
                    run = torch.cumprod(same.to(torch.int64), 0).bool()
                    w[i, run] = w_conflict if a[i] > 0 else 0.0
            return w

        left = side(token_ids, m)
        # right-aligned: flip each row's valid part so the last valid token comes first
        lengths = m.sum(-1)
        T = token_ids.shape[1]
        idx = torch.arange(T, device=token_ids.device)[None, :]
        rev = (lengths[:, None] - 1 - idx).clamp_min(0)
        valid_r = idx < lengths[:, None]
        ids_r = torch.gather(token_ids, 1, rev)
        right_r = side(ids_r, valid_r)
        right = torch.ones_like(right_r)
        right.scatter_(1, rev, right_r * valid_r + (~valid_r))
        return (left * right) * mask + (1 - mask)


def gtpo_entropy_filter(adv: Tensor, seq_entropy: Tensor, *, threshold: float = 0.7, scale: float = 0.1) -> Tensor:
    """GTPO's entropy filter: a completion whose mean token entropy exceeds ``threshold`` gets
    advantage 0, others ``A - scale * H`` (per-sequence ``[B]``)."""
    return torch.where(seq_entropy > threshold, torch.zeros_like(adv), adv - scale * seq_entropy)


def bapo_bounds(ratio: Tensor, adv: Tensor, mask: Tensor, *, target: float = 1.0, c_low: float = 0.6,
                c_low_max: float = 0.8, step_low: float = 0.05, c_high: float = 1.2, c_high_max: float = 2.0,
                step_high: float = 0.05, measure: str = "value",
                target_kind: str = "ratio") -> tuple[float, float, dict[str, Tensor]]:
    r"""BAPO's adaptive clipping bounds (Xi et al., arXiv 2510.18927; WooooDyy/BAPO
    ``compute_policy_loss_bapo``).

    The positive/negative contribution ratio ``rho = sum max(e, 0) / (sum max(-e, 0) + 1e-8)`` with
    ``e_t = (A >= 0 ? min(r, c_high) : max(r, c_low)) A`` (``measure="value"``, the authors'
    code) is raised toward ``target``: first ``c_low += step_low`` up to ``c_low_max`` while
    ``rho < target``, then ``c_high += step_high`` up to ``c_high_max``. Returns the bounds to
    use as explicit ratio bounds of a clipped surrogate (``ppo_clip_loss(eps_low=1 - c_low,
    eps_high=c_high - 1)``) and metrics.

    The code and the paper differ (docs/algorithms/rl.md): the code measures loss *values*,
    and raising ``c_low`` makes negative tokens' values larger, so the first loop can only
    lower ``rho``; the paper's intent, that clipped tokens contribute no gradient, is
    ``measure="unclipped"``: ``e_t = r A`` on the tokens the bounds leave unclipped, 0 elsewhere.
    The target also differs: the code compares ``pos / neg`` with ``target``; the paper's
    ``rho_0`` is the positive *share* ``pos / (pos + neg)`` (0.5 there):
    ``target_kind="share"``.
    Needs the global sums under data parallelism: all-reduce before calling (not done here).
    """
    if measure not in ("value", "unclipped"):
        raise ValueError(f"measure={measure!r}; valid choices: value, unclipped")
    if target_kind not in ("ratio", "share"):
        raise ValueError(f"target_kind={target_kind!r}; valid choices: ratio, share")
    r, a = ratio.detach(), adv.detach() if adv.dim() == 2 else adv.detach()[:, None].expand_as(ratio)

    def contribution(lo: float, hi: float) -> Tensor:
        if measure == "value":
            e = torch.where(a >= 0, r.clamp(max=hi), r.clamp(min=lo)) * a
        else:
            active = torch.where(a >= 0, r <= hi, r >= lo)
            e = torch.where(active, r * a, torch.zeros_like(r))
        e = e * mask
        pos, neg = e.clamp_min(0).sum(), (-e).clamp_min(0).sum()
        return pos / neg.add(1e-8) if target_kind == "ratio" else pos / (pos + neg).add(1e-8)

    rho = contribution(c_low, c_high)
    while float(rho) < target and c_low < c_low_max - 1e-12:
        c_low = min(c_low + step_low, c_low_max)
        rho = contribution(c_low, c_high)
    while float(rho) < target and c_high < c_high_max - 1e-12:
        c_high = min(c_high + step_high, c_high_max)
        rho = contribution(c_low, c_high)
    key = "bapo/pos_neg_ratio" if target_kind == "ratio" else "bapo/pos_share"
    return c_low, c_high, {key: rho, "bapo/c_low": torch.tensor(c_low), "bapo/c_high": torch.tensor(c_high)}


def echo_clip_eps(confidence: Tensor, mask: Tensor, *, tail: int = 16, eps_min: float = 0.05, eps_max: float = 0.2,
                  kappa: float = 4.0) -> Tensor:
    r"""ECHO's confidence-adaptive clip range (user683/ECHO ``apply_hybrid_advantage_shaping``):
    with ``C_t`` the token confidence (mean of the top-k probabilities) and ``bar C_i`` its mean
    over the last ``tail`` valid tokens, ``eps_i = eps_min + (eps_max - eps_min) sigmoid(kappa (1 - bar C_i))``:
    confident completions get a tight symmetric clip. Returns ``[B]``; use as
    ``ppo_clip_loss(eps_low=eps[:, None], eps_high=eps[:, None])`` per sequence."""
    m = mask.bool()
    lengths = m.sum(-1)
    idx = torch.arange(mask.shape[1], device=mask.device)[None, :]
    in_tail = m & (idx >= (lengths[:, None] - tail))
    c = (confidence * in_tail).sum(-1) / in_tail.sum(-1).clamp_min(1)
    return eps_min + (eps_max - eps_min) * torch.sigmoid(kappa * (1 - c.detach()))


def capo_token_kl(hidden: Tensor, probs: Tensor, delta_head: Tensor) -> Tensor:
    r"""The second-order (last-layer) prediction of each token's policy KL change under a
    proposed update ``delta_head`` (``[V, d]``) of the LM head, as CAPO's curvature model
    (Melo, Abate, Gal, arXiv 2510.00819): ``dz_t = delta_head h_t`` and
    ``KL_t ~ 1/2 dz_t^T (diag(p_t) - p_t p_t^T) dz_t``. ``hidden`` ``[B, T, d]``, ``probs``
    ``[B, T, V]``. Detached ``[B, T]``."""
    with torch.no_grad():
        dz = hidden @ delta_head.T
        mean = (probs * dz).sum(-1)
        return 0.5 * ((probs * dz * dz).sum(-1) - mean * mean)


def capo_mask(token_kl: Tensor, mask: Tensor, *, kl_max: float, level: str = "sequence") -> tuple[Tensor, dict]:
    r"""CAPO-style masking: drop the samples whose predicted KL change (from
    :func:`capo_token_kl`) exceeds ``kl_max`` -- per token, or per sequence on the sum over
    its tokens -- so the remaining update stays inside a local trust region. Returns the
    keep-mask ``[B, T]`` and ``capo/masked_frac``. (The paper also predicts each sample's
    objective change; this keeps only the KL side, which is what bounds the step.)"""
    if level == "token":
        keep = (token_kl <= kl_max).to(mask.dtype) * mask
    elif level == "sequence":
        seq = (token_kl * mask).sum(-1)
        keep = (seq <= kl_max).to(mask.dtype)[:, None] * mask
    else:
        raise ValueError(f"level={level!r}; valid choices: token, sequence")
    return keep, {"capo/masked_frac": 1 - keep.sum() / mask.sum().clamp_min(1)}


def masked_entropy_stats(entropy: Tensor, mask: Tensor, selected: Tensor | None = None) -> dict[str, Tensor]:
    """``entropy/mean`` over all valid tokens and, with a selection mask, ``entropy/selected_mean``
    and ``selected_frac``."""
    from poise.rl._common import masked_mean

    out = {"entropy/mean": masked_mean(entropy.detach(), mask)}
    if selected is not None:
        sel = selected * mask
        out["entropy/selected_mean"] = masked_mean(entropy.detach(), sel)
        out["selected_frac"] = sel.sum() / mask.sum().clamp_min(1)
    return out
