"""CLASSP as a chain of transforms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from poise._registry import register
from poise.optim import _check
from poise.optim._adapter import TransformOptimizer
from poise.transforms import chain, scale_by_learning_rate
from poise.transforms._sparse import scale_by_classp

__all__ = ["CLASSP"]


@register("optimizer", "classp")
class CLASSP(TransformOptimizer):
    r"""CLASSP (Ludwig, arXiv 2405.09637) = ``chain(scale_by_classp(), scale_by_learning_rate())``:
    ``w_i <- w_i - lr g_i / (epsilon + G_i)^{1/power}`` only where ``g_i^2 > threshold``, with
    ``G_i`` the sum of ``|g_i|^power`` over the steps where the gate was open (see
    :func:`poise.transforms.scale_by_classp` for how this relates to the paper and to the
    authors' script). Arguments under the authors' names: ``lr, threshold, epsilon, power,
    apply_scaling``, plus ``include_current``."""

    shard_safe = True  # every stage is elementwise: a shard's update is the whole tensor's update, sliced

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 0.2, threshold: float = 0.5,
                 epsilon: float = 1e-5, power: float = 1.0, apply_scaling: bool = True, include_current: bool = True,
                 nonfinite: str = "raise", diagnostics: bool = False,
                 max_consecutive_skips: int | None = None):
        _check.in_range("lr", lr, 0.0, float("inf"))
        _check.in_range("threshold", threshold, 0.0, float("inf"))
        _check.in_range("epsilon", epsilon, 0.0, float("inf"), lo_open=True)
        _check.in_range("power", power, 0.0, float("inf"), lo_open=True)
        t = chain(scale_by_classp(), scale_by_learning_rate(), name="classp")
        super().__init__(params, dict(lr=lr, threshold=threshold, epsilon=epsilon, power=power,
                                      apply_scaling=apply_scaling, include_current=include_current), t, nonfinite,
                         diagnostics, max_consecutive_skips)
