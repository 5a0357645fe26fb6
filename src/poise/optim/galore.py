"""GaLore-AdamW as a chain of transforms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from poise._registry import register
from poise.optim import _check
from poise.optim._adapter import TransformOptimizer
from poise.transforms import add_decayed_weights, chain, project_low_rank, scale_by_adam, scale_by_learning_rate
from poise.transforms._lowrank import PROJ_TYPES

__all__ = ["GaLoreAdamW"]


@register("optimizer", "galore_adamw")
class GaLoreAdamW(TransformOptimizer):
    r"""GaLore-AdamW (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient
    Low-Rank Projection", arXiv 2403.03507), replaying ``galore_torch.GaLoreAdamW``
    (jiaweizzhao/GaLore, pip galore-torch 1.0)::

        chain(project_low_rank(scale_by_adam("hf")),   # Adam on P^T G (or G P^T), projected back x scale
              scale_by_learning_rate(),
              add_decayed_weights("after"))

    Projected parameters are those of param groups with ``rank`` (and ``update_proj_gap``,
    ``scale``, ``proj_type``), as in the authors' API; other groups get plain (HF-style)
    AdamW. Defaults are the authors': ``lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
    weight_decay=0``. ``fused=True`` (default) lets the projection apply the update itself
    (back projection, ``-lr * scale`` and the addition in one ``addmm_``), tested equal to
    the chain; ``fused=False`` runs the chain as written.
    """

    shard_safe = False  # needs whole tensors (projections, bases or norms): DTensor parameters are gathered

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, fused: bool = True,
                 nonfinite: str = "raise", diagnostics: bool = False,
                 max_consecutive_skips: int | None = None):
        _check.common(lr, eps, weight_decay)
        _check.betas(betas)
        t = chain(project_low_rank(scale_by_adam("hf"), apply=fused), scale_by_learning_rate(),
                  add_decayed_weights("after"), name="galore_adamw")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias), t, nonfinite, diagnostics, max_consecutive_skips)
        for i, g in enumerate(self.param_groups):
            if "rank" in g:
                _check.positive_int(f"param_groups[{i}].rank", g["rank"])
                _check.positive_int(f"param_groups[{i}].update_proj_gap", g.setdefault("update_proj_gap", 200))
                g.setdefault("scale", 1.0)
                if g.setdefault("proj_type", "std") not in PROJ_TYPES:
                    raise ValueError(f"param_groups[{i}].proj_type={g['proj_type']!r}; "
                                     f"valid choices: {', '.join(PROJ_TYPES)}")
