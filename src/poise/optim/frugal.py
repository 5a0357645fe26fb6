"""FRUGAL as a chain of transforms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from poise._registry import register
from poise.optim import _check
from poise.optim._adapter import TransformOptimizer
from poise.transforms import add_decayed_weights, chain, scale_by_adam, scale_by_learning_rate
from poise.transforms._frugal import MODES, RULES, split_frugal

__all__ = ["FRUGAL"]


@register("optimizer", "frugal")
class FRUGAL(TransformOptimizer):
    r"""FRUGAL (Zmushko et al., arXiv 2411.07837) =
    ``chain(split_frugal(scale_by_adam("torch")), scale_by_learning_rate(), add_decayed_weights("before"))``:
    AdamW on a subspace redrawn every ``update_gap`` steps (``mode`` ``"block"``: a
    ``density`` share of the tensors; ``"rows"``: of each matrix's rows), and a state-free
    ``inactive_update_rule`` (``sign_sgd``, ``sgd``, ``no``) on the rest. Arguments as the
    authors': ``lr, betas, eps, weight_decay, density, update_gap, proj_params_lr_scale,
    inactive_update_rule, inactive_lr_scale, reset_statistics``, plus ``mode`` and ``seed``."""

    shard_safe = False  # needs whole tensors (projections, bases or norms): DTensor parameters are gathered

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, density: float = 0.25, update_gap: int = 200,
                 proj_params_lr_scale: float = 1.0, inactive_update_rule: str = "sign_sgd",
                 inactive_lr_scale: float = 1.0, reset_statistics: bool = True, mode: str = "block", seed: int = 0,
                 nonfinite: str = "raise", diagnostics: bool = False,
                 max_consecutive_skips: int | None = None):
        _check.common(lr, eps, weight_decay)
        _check.betas(betas)
        _check.in_range("density", density, 0.0, 1.0, hi_open=False)
        _check.positive_int("update_gap", update_gap)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; valid choices: {', '.join(MODES)}")
        if inactive_update_rule not in RULES:
            raise ValueError(f"inactive_update_rule={inactive_update_rule!r}; valid choices: {', '.join(RULES)}")
        t = chain(split_frugal(scale_by_adam("torch")), scale_by_learning_rate(), add_decayed_weights("before"),
                  name="frugal")
        super().__init__(params, dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, density=density, update_gap=update_gap,
            proj_params_lr_scale=proj_params_lr_scale, inactive_update_rule=inactive_update_rule,
            inactive_lr_scale=inactive_lr_scale, reset_statistics=reset_statistics, mode=mode, seed=seed),
            t, nonfinite, diagnostics, max_consecutive_skips)
