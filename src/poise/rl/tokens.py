"""Token weighting and selection (pure; return detached masks or weights)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["entropy_topk_mask", "steer_weights"]


def entropy_topk_mask(entropy: Tensor, mask: Tensor, ratio: float = 0.2) -> Tensor:
    r"""The "forking tokens" mask of "Beyond the 80/20 rule" (Wang et al., arXiv 2506.01939;
    code ``get_global_entropy_top_mask``): 1 on the ``ceil(ratio * N)`` highest-entropy valid
    tokens of the batch (``N`` = valid tokens), 0 elsewhere. The authors aggregate with
    ``mask * top_mask`` so that the token-mean denominator counts only the selected tokens;
    TRL's ``top_entropy_quantile`` keeps the full denominator: pick by passing
    ``num_tokens`` to :func:`poise.rl.aggregate`."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio={ratio} is out of range; valid: (0, 1]")
    valid = mask.bool()
    n = int(valid.sum())
    out = torch.zeros_like(mask)
    if n == 0:
        return out
    k = math.ceil(ratio * n)
    h = entropy.detach().masked_fill(~valid, float("-inf")).reshape(-1)
    idx = torch.topk(h, k).indices
    out.view(-1)[idx] = 1
    return out


def steer_weights(adv: Tensor, entropy: Tensor, old_logp: Tensor, logp: Tensor, mask: Tensor, *,
                  w_min: float = 0.8, w_max: float = 1.0, linear: bool = False) -> Tensor:
    r"""STEER's entropy-change weights (zz-haooo/STEER ``compute_token_weights``): with
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
        return w * mask + (1 - mask)
