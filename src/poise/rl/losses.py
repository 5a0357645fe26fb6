"""Policy-gradient surrogates for language models, as pure functions of per-token tensors.

Every loss takes ``logp`` (log pi_theta of the sampled tokens, ``[B, T]``, with grad),
the other log-probs it needs (detached), the advantages (``[B]`` per sequence or
``[B, T]``) and the response ``mask`` ``[B, T]``, and returns :class:`LossOut`: per-token
values (to *minimise*, zero on masked tokens) and detached metrics. Aggregation into a
scalar is :func:`poise.rl.aggregate`, a separate step with global counts.

Every clipped surrogate has the plain policy-gradient gradient ``-A grad logp`` at ratio 1,
and exactly zero gradient in its clipped regions (tests/rl/test_losses.py).

Masked positions contribute exactly nothing, in value and in gradient, whatever their
log-probs or advantages hold (``-inf`` on padding is common): inputs are zeroed there with
``torch.where`` before any arithmetic (:func:`poise.rl._common.masked_zero`). Shapes are
checked against the mask (``ValueError`` naming the tensor). ``convention`` picks the numerical
guards (:data:`poise.rl.correction.CONVENTIONS`: ``"verl"``, the default, or ``"trl"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from poise._registry import register
from poise.rl._common import LossOut, broadcast, check_shapes, masked_mean, masked_zero, stats
from poise.rl.correction import Convention, log_ratio, sequence_log_ratio
from poise.rl.correction import convention as _convention

__all__ = ["cispo_loss", "decoupled_ppo_loss", "gspo_loss", "kl_penalty", "minirl_loss", "pacs_loss", "pg_loss",
           "ppo_clip_loss", "sapo_loss"]


def _adv(adv: Tensor, mask: Tensor) -> Tensor:
    return broadcast(adv, mask).detach()


def _clean(mask: Tensor, adv: Tensor | None = None, **tokens: Tensor | None) -> list[Tensor | None]:
    """Check shapes against ``mask`` and zero every token tensor where ``mask == 0``."""
    check_shapes(mask, adv=adv, **tokens)
    return [None if x is None else masked_zero(x, mask) for x in tokens.values()]


def _ratio_metrics(lr: Tensor, mask: Tensor) -> dict[str, Tensor]:
    r = torch.exp(lr.detach())
    return {**stats("ratio", r, mask), "approx_kl_k1": masked_mean(-lr.detach(), mask),
            "approx_kl_k3": masked_mean(torch.exp(-lr.detach()) - 1 + lr.detach(), mask)}


@register("loss", "pg")
def pg_loss(logp: Tensor, adv: Tensor, mask: Tensor, weights: Tensor | None = None) -> LossOut:
    r"""REINFORCE / plain policy gradient: ``l_t = -sg[w_t] A_t logp_t`` (``w`` optional
    detached importance weights, e.g. from :func:`poise.rl.is_weights`: the Qwen paper's
    on-policy "PG + token IS" objective, arXiv 2512.01374)."""
    logp, w = _clean(mask, adv, logp=logp, weights=None if weights is None else weights.detach())
    a = _adv(adv, mask)
    w = torch.ones_like(logp) if w is None else w
    vals = -w * a * logp * mask
    return LossOut(vals, {"adv/mean": masked_mean(a, mask).detach()})


def _clip_metrics(r: Tensor, a: Tensor, mask: Tensor, lo: float, hi: float) -> dict[str, Tensor]:
    m = mask.bool()
    high = (a > 0) & (r > hi) & m
    low = (a < 0) & (r < lo) & m
    n = m.sum().clamp_min(1)
    return {"clip_frac/high": high.sum() / n, "clip_frac/low": low.sum() / n,
            "clip_frac/region": (high | low).sum() / n}


@register("loss", "ppo_clip")
def ppo_clip_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, eps_low: float = 0.2,
                  eps_high: float | None = None, dual_clip: float | None = None,
                  weights: Tensor | None = None, convention: str | Convention = "verl") -> LossOut:
    r"""PPO's clipped surrogate (Schulman et al., arXiv 1707.06347) with asymmetric bounds
    (DAPO "clip-higher", arXiv 2503.14476) and dual clip (Ye et al., arXiv 1912.09729).

    ``r = exp(logp - old_logp)`` (log-ratio clamped to +-20 under ``convention="verl"``, not
    under ``"trl"``); ``l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``; with
    ``dual_clip = c > 1``, for ``A < 0``: ``l = min(l, -c A)``. ``eps_high=None`` means
    ``eps_low``; ``weights`` multiply the loss (decoupled / TIS correction). Matches verl
    ``vanilla`` and TRL's token-level clipped term (``loss_type`` grpo/bnpo/dr_grpo/dapo/luspo).

    TRL's ``delta`` (INTELLECT-2, arXiv 2505.07291: ``r`` capped at ``delta`` before the min) is
    ``dual_clip=delta`` exactly when ``delta >= 1 + eps_high``; for a smaller ``delta`` TRL's
    cap also binds on ``A > 0`` tokens and the two objectives differ.

    Metrics: ``ratio/*``, ``approx_kl_k1``, ``approx_kl_k3``, ``clip_frac/{high,low,region}``
    (A-sign aware: the fractions where the clip removed the gradient), ``clip_frac/dual``.
    """
    eps_high = eps_low if eps_high is None else eps_high
    conv = _convention(convention)
    logp, old_logp, weights = _clean(mask, adv, logp=logp, old_logp=old_logp,
                                     weights=None if weights is None else weights.detach())
    a = _adv(adv, mask)
    lr = log_ratio(logp, old_logp, conv.log_ratio_clamp)
    r = torch.exp(lr)
    l1 = -a * r
    l2 = -a * r.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(l1, l2)
    metrics = {**_ratio_metrics(lr, mask), **_clip_metrics(r.detach(), a, mask, 1 - eps_low, 1 + eps_high)}
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip={dual_clip} must be > 1")
        dual = torch.minimum(loss, -a * dual_clip)
        hit = (a < 0) & (loss > -a * dual_clip) & mask.bool()
        loss = torch.where(a < 0, dual, loss)
        metrics["clip_frac/dual"] = hit.sum() / mask.sum().clamp_min(1)
    if weights is not None:
        loss = loss * weights
    return LossOut(loss * mask, metrics)


@register("loss", "gspo")
def gspo_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, eps_low: float = 3e-4,
              eps_high: float = 4e-4, convention: str | Convention = "verl") -> LossOut:
    r"""GSPO (Zheng et al., arXiv 2507.18071): the sequence ratio
    ``s_i = exp(mean_t (logp - old_logp))`` clipped as PPO: ``l = max(-A s, -A clip(s, 1-eps_low,
    1+eps_high))``; the value is ``l_i`` on every valid token. Aggregate with
    ``seq_mean_token_mean`` to get the paper's ``mean_i l_i`` and its gradient.

    The per-token gradient form is the convention's ``gspo_grad``: ``convention="verl"``
    (default) is verl's ``s_{i,t} = sg[s_i] exp(logp_t - sg[logp_t])`` (log clamped at 10), so
    token ``t`` carries ``s_i grad logp_t``; ``"trl"`` is TRL's ``importance_sampling_level=
    "sequence"``: ``s_i`` as one function of the whole sequence on every token. Both give the
    paper's gradient under a per-sequence mean; with uneven per-token weights within a sequence
    (an entropy mask, token IS weights) only ``"trl"`` has TRL's gradient. Defaults: the paper's eps."""
    conv = _convention(convention)
    logp, old_logp = _clean(mask, adv, logp=logp, old_logp=old_logp)
    a = _adv(adv, mask)
    m = mask.to(logp.dtype)
    seq = sequence_log_ratio(logp - old_logp, m, "mean")
    if conv.gspo_grad == "token":
        log_s = seq.detach()[:, None] + logp - logp.detach()
    else:
        log_s = seq[:, None].expand_as(logp)
    if conv.seq_log_ratio_max is not None:
        log_s = log_s.clamp(max=conv.seq_log_ratio_max)
    s_tok = torch.exp(log_s)
    l1 = -a * s_tok
    l2 = -a * s_tok.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(l1, l2)
    metrics = {**stats("seq_ratio", torch.exp(seq.detach())[:, None].expand_as(m), mask),
               **_clip_metrics(s_tok.detach(), a, mask, 1 - eps_low, 1 + eps_high)}
    return LossOut(loss * mask, metrics)


CISPO_BOUNDS = ("two_sided", "upper_abs")


@register("loss", "cispo")
def cispo_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, eps_low: float = 0.2,
               eps_high: float = 0.2, bounds: str = "two_sided", convention: str | Convention = "verl") -> LossOut:
    r"""CISPO (MiniMax-M1, arXiv 2506.13585): clip the importance weight, not the update:
    ``l_t = -sg[clip(r_t)] A_t logp_t``. ``bounds="two_sided"`` (default; the paper and verl
    ``cispo``): ``clip(r, 1 - eps_low, 1 + eps_high)``; ``"upper_abs"`` (TRL ``cispo``):
    ``min(r, eps_high)`` with ``eps_high`` an absolute cap (TRL docs suggest 5.0). No official
    code exists; the difference is documented in docs/algorithms/rl.md."""
    if bounds not in CISPO_BOUNDS:
        raise ValueError(f"bounds={bounds!r}; valid choices: {', '.join(CISPO_BOUNDS)}")
    conv = _convention(convention)
    logp, old_logp = _clean(mask, adv, logp=logp, old_logp=old_logp)
    a = _adv(adv, mask)
    lr = log_ratio(logp, old_logp, conv.log_ratio_clamp)
    r = torch.exp(lr.detach())
    w = r.clamp(1 - eps_low, 1 + eps_high) if bounds == "two_sided" else r.clamp(max=eps_high)
    metrics = {**_ratio_metrics(lr, mask), "cispo_clip_frac": ((w != r) & mask.bool()).sum() / mask.sum().clamp_min(1)}
    return LossOut(-w * a * logp * mask, metrics)


@register("loss", "decoupled_ppo")
def decoupled_ppo_loss(logp: Tensor, prox_logp: Tensor, behav_logp: Tensor, adv: Tensor, mask: Tensor, *,
                       eps_low: float = 0.2, eps_high: float | None = None, dual_clip: float | None = None,
                       max_weight: float | None = 5.0, convention: str | Convention = "verl") -> LossOut:
    r"""Decoupled PPO (Hilton et al., arXiv 2110.00641; AReaL, arXiv 2505.24298,
    ``ppo_actor_loss_fn``): the clip acts on the staleness ratio ``u = pi_theta/pi_prox`` and
    the behaviour correction is a separate weight ``w = pi_prox/mu``:
    ``l = w * max(-A u, -A clip(u, 1-eps_low, 1+eps_high))``, with ``w`` masked to 0 above
    ``max_weight`` (AReaL's rejection default: ratio upper 5.0; None keeps all). The kept
    denominator is the caller's: AReaL divides by the *original* token count."""
    conv = _convention(convention)
    prox_logp, behav_logp = _clean(mask, adv, logp=logp, prox_logp=prox_logp, behav_logp=behav_logp)[1:]
    lr_b = log_ratio(prox_logp, behav_logp, conv.log_ratio_clamp).detach()
    w = torch.exp(lr_b)
    if max_weight is not None:
        w = torch.where(w <= max_weight, w, torch.zeros_like(w))
    out = ppo_clip_loss(logp, prox_logp, adv, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                        weights=w, convention=conv)
    metrics = dict(out.metrics)
    metrics.update(stats("behav_weight", w, mask))
    metrics["behav_filtered_frac"] = ((w == 0) & mask.bool()).sum() / mask.sum().clamp_min(1)
    return LossOut(out.values, metrics)


@register("loss", "minirl")
def minirl_loss(logp: Tensor, old_logp: Tensor, behav_logp: Tensor, adv: Tensor, mask: Tensor, *,
                eps_low: float = 0.2, eps_high: float = 0.28, rho_max: float | None = None,
                convention: str | Convention = "verl") -> LossOut:
    r"""The MiniRL objective of "Stabilizing RL with LLMs" (Qwen, arXiv 2512.01374, sec. 4.1):
    ``l_t = -M_t sg[rho_t r_t] A_t logp_t`` with the token IS weight ``rho = pi_old/mu``
    (optionally truncated at ``rho_max``), the staleness ratio ``r = pi_theta/pi_old`` and the
    PPO-style mask ``M_t = 0`` iff ``(A > 0 and r > 1 + eps_high) or (A < 0 and r < 1 - eps_low)``.
    No per-sequence length normalisation (aggregate with ``token_sum`` divided by the number
    of sequences, i.e. ``seq_mean_token_sum``). The paper has no public code; this follows
    its equations."""
    conv = _convention(convention)
    logp, old_logp, behav_logp = _clean(mask, adv, logp=logp, old_logp=old_logp, behav_logp=behav_logp)
    a = _adv(adv, mask)
    lr = log_ratio(logp, old_logp, conv.log_ratio_clamp)
    r = torch.exp(lr.detach())
    rho = torch.exp(log_ratio(old_logp, behav_logp, conv.log_ratio_clamp).detach())
    if rho_max is not None:
        rho = rho.clamp(max=rho_max)
    keep = ~(((a > 0) & (r > 1 + eps_high)) | ((a < 0) & (r < 1 - eps_low)))
    metrics = {**_ratio_metrics(lr, mask), **stats("rho", rho, mask),
               "masked_frac": ((~keep) & mask.bool()).sum() / mask.sum().clamp_min(1)}
    return LossOut(-(keep * rho * r) * a * logp * mask, metrics)


@register("loss", "sapo")
def sapo_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, tau_pos: float = 1.0,
              tau_neg: float = 1.05, convention: str | Convention = "verl") -> LossOut:
    r"""SAPO (arXiv 2511.20347): a smooth gate instead of a clip, ``l = -g(r) A`` with
    ``g(r) = sigmoid(tau (r - 1)) 4 / tau``, ``tau = tau_pos`` if ``A > 0`` else ``tau_neg``
    (verl ``sapo``, TRL ``sapo``). ``g'(1) = 1``: on-policy gradient = policy gradient."""
    conv = _convention(convention)
    logp, old_logp = _clean(mask, adv, logp=logp, old_logp=old_logp)
    a = _adv(adv, mask)
    lr = log_ratio(logp, old_logp, conv.log_ratio_clamp)
    tau = torch.where(a > 0, torch.full_like(a, tau_pos), torch.full_like(a, tau_neg))
    g = torch.sigmoid(tau * (torch.exp(lr) - 1)) * 4 / tau
    return LossOut(-g * a * mask, _ratio_metrics(lr, mask))


KL_KINDS = ("k1", "k2", "k3")


@register("loss", "kl")
def kl_penalty(logp: Tensor, ref_logp: Tensor, mask: Tensor, *, kind: str = "k3",
               convention: str | Convention = "verl") -> LossOut:
    r"""Per-token KL estimators against a reference policy (Schulman, "Approximating KL
    divergence"; verl ``kl_penalty``) with ``d = logp - ref_logp``: ``k1 = d``;
    ``k2 = d^2 / 2``; ``k3 = exp(-d) + d - 1``. Add ``beta * aggregate(...)`` of it to the loss.

    ``convention="verl"`` (default): k3 as verl's ``low_var_kl``, ``-d`` clamped to +-20 inside
    and the value to +-10 (zero gradient where a clamp binds). ``"trl"``: no clamp, which is
    TRL's ``beta`` term ``exp(ref - logp) - (ref - logp) - 1`` (TRL then multiplies it by the
    ratio ``pi_theta/pi_old`` when ``use_bias_correction_kl``; :class:`poise.integrations.trl.
    PoiseGRPOTrainer` does that)."""
    if kind not in KL_KINDS:
        raise ValueError(f"kind={kind!r}; valid choices: {', '.join(KL_KINDS)}")
    conv = _convention(convention)
    logp, ref_logp = _clean(mask, logp=logp, ref_logp=ref_logp)
    d = logp - ref_logp
    if kind == "k1":
        v = d
    elif kind == "k2":
        v = 0.5 * d * d
    else:
        dc = -d if conv.kl_log_ratio_clamp is None else (-d).clamp(-conv.kl_log_ratio_clamp, conv.kl_log_ratio_clamp)
        v = torch.exp(dc) - dc - 1
        if conv.kl_max is not None:
            v = v.clamp(-conv.kl_max, conv.kl_max)
    return LossOut(v * mask, {f"kl_{kind}": masked_mean(v.detach(), mask)})


@register("loss", "pacs")
def pacs_loss(logp: Tensor, old_logp: Tensor, rewards: Tensor, group_id: Tensor, mask: Tensor, *,
              beta: float = 1.0, balanced: bool = True) -> LossOut:
    r"""PACS (arXiv 2509.02522, code ritzz-ai/PACS ``compute_pacs_loss``): RLVR as supervised
    learning. ``psi_i = beta sum_t (logp - old_logp)``; ``hat psi_i = psi_i - mean_{j != i} psi_j``
    over the group (RLOO); loss ``BCEWithLogits(hat psi_i, r_i)`` for binary ``r``, weighted
    per group by class balance (``n / (2 n_c)`` when both classes occur, else 1). The
    per-sequence loss is spread evenly over its tokens, so ``aggregate(..., "seq_mean_token_sum")``
    is the mean over sequences."""
    from poise.rl.advantages import group_advantage

    logp, old_logp = _clean(mask, logp=logp, old_logp=old_logp)
    m = mask.to(logp.dtype)
    psi = beta * ((logp - old_logp) * m).sum(-1)
    psi_hat = group_advantage(psi, group_id, center="loo", scale="none")
    r = rewards.to(logp.dtype)
    w = torch.ones_like(r)
    if balanced:
        for g in torch.unique(group_id):
            sel = group_id == g
            n, pos = sel.sum(), (r[sel] > 0.5).sum()
            if 0 < pos < n:
                w[sel] = torch.where(r[sel] > 0.5, n / (2.0 * pos), n / (2.0 * (n - pos)))
    per_seq = F.binary_cross_entropy_with_logits(psi_hat, r, weight=w, reduction="none")
    vals = per_seq[:, None] * m / m.sum(-1, keepdim=True).clamp_min(1)
    return LossOut(vals, {"psi_hat/mean": psi_hat.detach().mean(), "bce": per_seq.detach().mean()})
