"""Stable-SPAM as a chain of transforms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from poise._registry import register
from poise.optim import _check
from poise.optim._adapter import TransformOptimizer
from poise.transforms import (
    add_decayed_weights,
    chain,
    clip_spikes_by_max_ema,
    cosine_momentum_schedule,
    fused_adamw,
    normalize_by_norm_ema,
    periodic_reset,
    scale_by_adam,
    scale_by_learning_rate,
)

__all__ = ["StableSPAM"]


@register("optimizer", "stable_spam")
class StableSPAM(TransformOptimizer):
    r"""Stable-SPAM (Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than
    16-Bit Adam", arXiv 2502.17055), replaying TianjinYellow/StableSPAM
    ``galore_torch/stablespam.py`` (commit 6a66da1)::

        chain(cosine_momentum_schedule(),     # beta1, gamma1 *= cosine(clock; total_T, eta_min)
              clip_spikes_by_max_ema(),       # |g| > M_hat (EMA of max|g|, gamma3) -> g/max|g| * M_hat
              normalize_by_norm_ema(),        # g <- g/||g|| * m_hat/(sqrt(v_hat)+eps) (gamma1, gamma2)
              periodic_reset(scale_by_adam("torch"), reset_semantics),  # every update_proj_gap
              scale_by_learning_rate(),
              add_decayed_weights("before"))

    Arguments under the authors' names: ``lr, betas, eps, weight_decay, gamma1`` (-1: use
    ``betas[0]``), ``gamma2, gamma3`` (theta), ``total_T`` (None: no schedule), ``eta_min``,
    ``update_proj_gap`` (the momentum-reset interval, 0 = never). All of them live in the
    param groups, so they can differ per group and appear in ``state_dict``.

    ``reset_semantics="official"`` (default) replays the authors' reset step, which still
    uses the pre-reset moments with the step counter set back to 1; ``"clean"`` zeroes them
    first. The authors' global step counter is an attribute lost by ``state_dict``; here it
    is every parameter's ``clock``, so a resumed run continues its reset schedule.

    ``fused=True`` (default) replaces the last three stages by ``fused_adamw()``, torch's
    one-pass AdamW kernel, tested equal to them; ``fused=False`` runs the chain above.
    """

    shard_safe = False  # needs whole tensors (projections, bases or norms): DTensor parameters are gathered

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, gamma1: float = 0.7, gamma2: float = 0.9,
                 gamma3: float = 0.999, total_T: int | None = None, eta_min: float = 0.5,
                 update_proj_gap: int = 1000, reset_semantics: str = "official", fused: bool = True,
                 nonfinite: str = "raise", diagnostics: bool = False,
                 max_consecutive_skips: int | None = None):
        _check.common(lr, eps, weight_decay)
        _check.betas(betas)
        if gamma1 == -1:
            gamma1 = betas[0]
        _check.in_range("gamma1", gamma1, 0.0, 1.0)
        _check.in_range("gamma2", gamma2, 0.0, 1.0)
        _check.in_range("gamma3", gamma3, 0.0, 1.0)
        _check.in_range("eta_min", eta_min, 0.0, 1.0, hi_open=False)
        _check.positive_int("update_proj_gap", update_proj_gap, allow_zero=True)
        if total_T is not None:
            _check.positive_int("total_T", total_T)
        head = [cosine_momentum_schedule(), clip_spikes_by_max_ema(), normalize_by_norm_ema()]
        if fused:
            t = chain(*head, periodic_reset(fused_adamw(), reset_semantics), name="stable_spam")
        else:
            t = chain(*head, periodic_reset(scale_by_adam("torch"), reset_semantics), scale_by_learning_rate(),
                      add_decayed_weights("before"), name="stable_spam")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      gamma1=gamma1, gamma2=gamma2, gamma3=gamma3, total_T=total_T,
                                      eta_min=eta_min, update_proj_gap=update_proj_gap), t,
            nonfinite, diagnostics, max_consecutive_skips)
