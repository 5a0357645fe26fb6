"""GaLore-AdamW as a chain of transforms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from torch import Tensor

from poise._registry import register
from poise.optim import _check
from poise.optim._lowrank import LowRankOptimizer
from poise.transforms import add_decayed_weights, chain, project_low_rank, scale_by_adam, scale_by_learning_rate

__all__ = ["GaLoreAdamW"]


@register("optimizer", "galore_adamw")
class GaLoreAdamW(LowRankOptimizer):
    r"""GaLore-AdamW (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient
    Low-Rank Projection", arXiv 2403.03507), replaying ``galore_torch.GaLoreAdamW``
    (jiaweizzhao/GaLore, pip galore-torch 1.0)::

        chain(project_low_rank(scale_by_adam("hf")),   # Adam on P^T G (or G P^T), projected back x scale
              scale_by_learning_rate(),
              add_decayed_weights("after"))

    Projected parameters are the tensors of 2 or more dims in param groups with ``rank`` (and
    ``update_proj_gap``, ``scale``, ``proj_type``), as in the authors' API; other groups, and
    1-D tensors in a projected group, get plain (HF-style) AdamW. The group keys are declared
    in ``group_keys`` and are also keyword arguments, defaults for every projected group:
    ``GaLoreAdamW(model.parameters(), rank=8)`` projects every matrix (the way Hugging Face's
    ``Trainer(optimizer_cls_and_kwargs=(GaLoreAdamW, {"rank": 8}))`` builds it);
    :func:`poise.optim.low_rank_groups` builds the groups from a model (linear weights only).
    With no projected tensor the constructor raises ``ValueError`` (it would be plain AdamW)
    unless ``allow_unprojected=True``, which warns. ``projected_summary()`` says what is
    projected.

    Defaults are the authors': ``lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0,
    update_proj_gap=200, scale=1.0, proj_type="std"``. ``fused=True`` (default) lets the
    projection apply the update itself (back projection, ``-lr * scale`` and the addition in
    one ``addmm_``), tested equal to the chain; ``fused=False`` runs the chain as written.
    """

    shard_safe = False  # needs whole tensors (projections, bases or norms): DTensor parameters are gathered
    group_keys: ClassVar[dict[str, Any]] = {"rank": None, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, fused: bool = True,
                 nonfinite: str = "raise", diagnostics: bool = False,
                 max_consecutive_skips: int | None = None, *, rank: int | None = None, update_proj_gap: int = 200,
                 scale: float = 1.0, proj_type: str = "std", allow_unprojected: bool = False):
        _check.common(lr, eps, weight_decay)
        _check.betas(betas)
        self._init_low_rank(dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type))
        t = chain(project_low_rank(scale_by_adam("hf"), apply=fused), scale_by_learning_rate(),
                  add_decayed_weights("after"), name="galore_adamw")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias), t, nonfinite, diagnostics, max_consecutive_skips)
        self._refuse_unprojected(allow_unprojected)
